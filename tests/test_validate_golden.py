"""``validate`` prints the same findings, byte for byte, for every config shipped in configs/.

The golden files under ``tests/golden/validate/`` were written before the registry and the
validation rules moved into the adapters; a refactor must not change what users read.
Regenerate them deliberately (after a reviewed behaviour change) with::

    python tests/test_validate_golden.py --regenerate
"""
import contextlib
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "validate")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def shipped_configs():
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        for name in files:
            if name.endswith((".json", ".yaml", ".yml")):
                found.append(os.path.relpath(os.path.join(folder, name), ROOT))
    return sorted(found)


# The cost block's budget defaults to this machine's GPU or RAM; the golden files name one.
BUDGET = ("--memory-budget", "80GiB")


def run_validate(relpath, *flags):
    from train.validate import cli_main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main([relpath, *flags, *BUDGET])
    finally:
        os.chdir(cwd)
    return f"exit {code}\n--- stdout\n{out.getvalue()}--- stderr\n{err.getvalue()}"


def golden_path(relpath, kind):
    return os.path.join(GOLDEN, relpath.replace(os.sep, "__") + f".{kind}.txt")


@pytest.mark.parametrize("relpath", shipped_configs())
@pytest.mark.parametrize("kind", ["text", "json"])
def test_validate_output_is_unchanged(relpath, kind):
    flags = ("--json",) if kind == "json" else ()
    with open(golden_path(relpath, kind), encoding="utf-8") as fh:
        expected = fh.read()
    assert run_validate(relpath, *flags) == expected


def test_every_shipped_config_has_a_golden_file():
    assert shipped_configs(), "configs/ is empty"
    for relpath in shipped_configs():
        for kind in ("text", "json"):
            assert os.path.isfile(golden_path(relpath, kind)), relpath


if __name__ == "__main__" and "--regenerate" in sys.argv:
    os.makedirs(GOLDEN, exist_ok=True)
    for relpath in shipped_configs():
        for kind, flags in (("text", ()), ("json", ("--json",))):
            with open(golden_path(relpath, kind), "w", encoding="utf-8") as fh:
                fh.write(run_validate(relpath, *flags))
    print(f"wrote golden files for {len(shipped_configs())} configs to {GOLDEN}")
