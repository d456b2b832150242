"""Fuzz: generated configs never crash ``validate``, and what it passes, ``fit`` accepts.

Each config starts from a registered type's ``tiny_config`` (so an accepted one builds in
milliseconds) and gets a few keys replaced, removed or turned into another type: numbers,
text, lists, mappings, absurd sizes, ``Infinity``, interpolations.  Seeded: a failure
prints the case number; ``FUZZ_SEED``/``FUZZ_CASES`` reproduce or widen a run.

Every config goes through ``validate`` (the CLI's function) and through fit's pre-training
path in-process (``load_run_config`` -> ``check_train_options`` -> ``build_model`` ->
``LossCalculator.from_config`` -> the learning rate and optimizers -> one generator step on
a crop of ``data.image_size``).  A sample also runs ``python -m train fit --max-steps 1``.

    python -m pytest -q tests/test_fuzz_configs.py
"""
import copy
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from adapters import build_model
from adapters.registry import get_model_type, list_model_types
from losses import LossCalculator
from train.errors import ERROR, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("FUZZ_SEED", "1234"))
CASES = int(os.environ.get("FUZZ_CASES", "300"))

# Where fit stops for the machine it runs on, not for the config: a VGG16 trunk file for
# LPIPS or a DINO teacher checkpoint.  validate warns about these; it cannot know the files.
ENVIRONMENT = ("VGG16 trunk", "teacher")

# Values any key may be given: wrong types, edge numbers, hostile strings.
ODD_VALUES = [0, -1, 1, 2, 3, 7, 33, 1.5, float("inf"), float("nan"), 10 ** 10, 10 ** 6, "8", "0", "x", "no",
              "1e-4", "${oops}", "${train.batch_size}", None, True, False, [], [1, 2], [1, 2, 3], {}, {"a": 1},
              [[1]], {"target": "x"}]
# Keys outside model_args that the schema knows (section, key).
SCHEMA_KEYS = [("train", k) for k in ("use_gan", "learning_rate", "base_learning_rate", "batch_size",
                                       "accumulate_grad_batches", "max_steps", "max_epochs", "disc_update_every",
                                       "grad_clip", "precision", "adam_betas", "weight_decay", "seed",
                                       "init_codebook_from_data", "log_every", "image_every", "ckpt_every",
                                       "max_bad_steps", "num_workers")] + \
              [("data", "image_size"), ("data", "random_crop"), ("teacher", "dtype")]
PRECISIONS = ["fp32", "bf16", "fp16", "fp64", "FP32"]


def _paths(node, prefix=()):
    """Every key path of a nested dict (lists are leaves)."""
    for key, value in node.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


def _set(doc, path, value):
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is _DROP:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


_DROP = object()


def generate(rng: random.Random, case: int):
    """One config (a dict) and the list of changes made to a tiny config."""
    base_type = list_model_types()[case % len(list_model_types())]
    doc = get_model_type(base_type).tiny_config()
    # Accepted configs must be trainable offline: a random LPIPS trunk, a random teacher.
    doc.setdefault("train", {})["allow_random_vgg"] = True
    changes = []
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        roll = rng.random()
        own = [p for p in _paths(doc) if p[0] in ("model_args", "lossconfig")]
        if roll < 0.45 and own:
            path = rng.choice(own)
        elif roll < 0.8:
            path = rng.choice(SCHEMA_KEYS)
        elif roll < 0.9:
            path = (rng.choice(["model_args", "lossconfig", "train", "data", "teacher", "extras"]),)
        else:
            path = rng.choice([("model_type",), ("model_variant",), ("name",), ("lossconfig", "target")])
        if path[-1] == "precision" and rng.random() < 0.6:
            value = rng.choice(PRECISIONS)
        elif path[-1] == "model_variant" and rng.random() < 0.6:
            value = rng.choice(["VQ", "EMAVQ", "Gumbel", "NoDisc", "emavq", "x"])
        else:
            value = rng.choice(ODD_VALUES + [_DROP])
        _set(doc, path, value if value is _DROP else copy.deepcopy(value))
        changes.append((".".join(map(str, path)), "drop" if value is _DROP else value))
    return doc, changes


def fit_checks(path: str):
    """fit's pre-training path in-process; returns the typed config or raises UserError."""
    from train.run_config import load_run_config
    from train.sides import autocast, make_sides
    from train.trainer import check_train_options, learning_rate

    cfg = load_run_config(path).cfg
    device = torch.device("cpu")
    check_train_options(cfg, device)
    model = build_model(cfg)
    calc = LossCalculator.from_config(cfg)
    lr, _ = learning_rate(cfg, 1)
    make_sides(model, calc, cfg.train, lr, cfg.train.precision)
    model.before_step(0)
    size = int(cfg.data.image_size)
    batch = {"image": torch.rand(1, 3, size, size) * 2 - 1}
    spec = get_model_type(cfg.model_type)
    if spec.batch_hook is not None:
        from adapters.dinovq import _dino_dim, student_geometry

        # The features the teacher hook would add (the teacher itself is the machine's file).
        _, grid = student_geometry(cfg)
        batch["dino_features"] = torch.randn(1, grid[0] * grid[1], _dino_dim(cfg))
    with autocast(cfg.train.precision, device):     # the trainer's own context
        out = calc.generator_step(model, batch, 0)
    out.loss.backward()
    if calc.should_update_discriminator(0):
        with autocast(cfg.train.precision, device):
            d_loss = calc.discriminator_step(out, 0)[0]
        d_loss.backward()
    return cfg


def _validate(path):
    from train.validate import validate_file

    try:
        _, findings = validate_file(path)
    except UserError as exc:
        return "unusable", str(exc)
    errors = [f for f in findings if f.level == ERROR]
    return ("fail" if errors else "ok"), "; ".join(f"{f.path}: {f.message}" for f in errors[:3])


def _write(tmp_path, case, doc):
    path = os.path.join(str(tmp_path), f"case{case}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)     # Infinity / NaN are written as JSON's extension, as users do
    return path


def test_fuzzed_configs_never_crash_and_validate_predicts_fit(tmp_path):
    torch.manual_seed(0)
    rng = random.Random(SEED)
    started = time.time()
    outcomes = {"ok": 0, "fail": 0, "unusable": 0}
    problems = []
    for case in range(CASES):
        doc, changes = generate(rng, case)
        path = _write(tmp_path, case, doc)
        where = f"case {case} (FUZZ_SEED={SEED}) changes {changes}"
        try:
            verdict, detail = _validate(path)
        except Exception as exc:   # noqa: BLE001 - the point: no exception may escape
            problems.append(f"{where}: validate raised {type(exc).__name__}: {exc}")
            continue
        outcomes[verdict] += 1
        try:
            fit_checks(path)
            fit_verdict = "ok"
        except UserError as exc:
            fit_verdict = f"refused: {exc}"
        except Exception as exc:   # noqa: BLE001
            problems.append(f"{where}: fit's checks crashed ({verdict} by validate): {type(exc).__name__}: {exc}")
            continue
        if verdict == "ok" and fit_verdict != "ok" and not any(e in fit_verdict for e in ENVIRONMENT):
            problems.append(f"{where}: validate says ok, fit {fit_verdict}")
        if verdict != "ok" and fit_verdict == "ok":
            problems.append(f"{where}: validate {verdict} ({detail}), fit accepts it")
    assert not problems, "\n".join(problems[:20])
    # The generator must reach both sides of the line, or the test proves nothing.
    assert outcomes["ok"] >= CASES // 10 and outcomes["fail"] >= CASES // 3, outcomes
    assert time.time() - started < 120


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4])
def test_fuzzed_sample_through_the_real_cli(tmp_path, case):
    """A few generated configs through ``python -m train fit --max-steps 1``: the exit code
    is the one validate predicts (0 for ok, 2 for errors) and nothing prints a traceback."""
    rng = random.Random(SEED + 1000 + case)
    doc, _ = generate(rng, case)
    if case < 3:
        doc = get_model_type(list_model_types()[case]).tiny_config()   # accepted ones too
        doc.setdefault("train", {})["allow_random_vgg"] = True
    path = _write(tmp_path, case, doc)
    verdict, _ = _validate(path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "train", "fit", path, "--data", "builtin", "--max-steps", "1",
                           "--out", str(tmp_path / f"run{case}"), "--no-bar"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if verdict == "ok" and "teacher" not in proc.stderr:
        assert proc.returncode == 0, proc.stderr[-2000:]
    elif verdict != "ok":
        assert proc.returncode == 2, proc.stderr[-2000:]
