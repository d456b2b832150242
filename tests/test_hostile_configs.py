"""Hostile and broken configs (issue 11): each ends with findings (exit 1) or one message
(exit 2), within seconds, never a traceback; ``fit`` refuses what ``validate`` reports.

Every file is written by the test.  The CLI runs in-process (``train.cli.main``), which
is what ``python -m train`` calls, so a traceback would surface as an exception here.
"""
import contextlib
import io
import json
import time

import pytest

from adapters.taming_vqgan import _tiny_config as taming_tiny
from adapters.vqvae2 import _tiny_config as vqvae2_tiny
from train import config as config_module
from train.cli import main
from train.config import parse_override


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    started = time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    assert time.time() - started < 20, "took too long"
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return str(path)


# A 1.7 KB "billion laughs": nine levels of nine aliases expand to 9^9 values.
BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))


def taming_yaml(extra_params="", extra_top=""):
    return ("model:\n  target: taming.models.vqgan.VQModel\n  base_learning_rate: 4.5e-6\n  params:\n"
            "    embed_dim: 8\n    n_embed: 32\n"
            "    ddconfig: {double_z: false, z_channels: 8, resolution: 32, in_channels: 3, out_ch: 3, ch: 32,"
            " ch_mult: [1, 2, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0}\n"
            "    lossconfig:\n      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator\n"
            "      params:\n        disc_start: 0\n" + extra_params + extra_top)


@pytest.mark.parametrize("where", ["lossconfig", "extras"])
def test_alias_bomb_is_refused_quickly(tmp_path, where):
    bomb = "\n".join("        " + line for line in BOMB.splitlines()) + "\n"
    text = taming_yaml(extra_params=bomb) if where == "lossconfig" else \
        taming_yaml(extra_top="junk:\n" + "\n".join("  " + line for line in BOMB.splitlines()) + "\n")
    path = write(tmp_path, "bomb.yaml", text)
    for command in ("validate", "fit"):
        code, _, err = run_cli(command, path)
        assert code == 2 and "aliases" in err, err


def test_alias_bomb_in_an_override_is_refused():
    with pytest.raises(config_module.ConfigFileError, match="aliases"):
        # The same bomb as a YAML flow mapping on the command line.
        parse_override("extras.x={" + BOMB.strip().replace("\n", ", ") + "}")


def test_self_referencing_alias_is_refused(tmp_path):
    path = write(tmp_path, "loop.yaml", taming_yaml(extra_top="junk: &loop [1, *loop]\n"))
    code, _, err = run_cli("validate", path)
    assert code == 2 and ("endless loop" in err or "undefined alias" in err), err


@pytest.mark.parametrize("syntax", ["json", "yaml"])
def test_deep_nesting_is_refused(tmp_path, syntax):
    depth = 5000
    if syntax == "json":
        text = '{"model_type": "vqvae2", "extras": {"x": ' + "[" * depth + "]" * depth + "}}"
    else:
        text = "model_type: vqvae2\nextras:\n  x: " + "[" * depth + "]" * depth + "\n"
    code, _, err = run_cli("validate", write(tmp_path, f"deep.{syntax}", text))
    assert code == 2 and "nested more than" in err, err


@pytest.mark.parametrize("syntax", ["json", "yaml"])
def test_five_thousand_digit_number_is_refused(tmp_path, syntax):
    number = "9" * 5000
    text = '{"model_type": "vqvae2", "model_args": {"n_embed": %s}}' % number if syntax == "json" else \
        f"model_type: vqvae2\nmodel_args:\n  n_embed: {number}\n"
    code, _, err = run_cli("validate", write(tmp_path, f"big.{syntax}", text))
    assert code == 2 and "5000 digits" in err, err


def test_duplicate_keys_are_findings(tmp_path):
    doc = json.dumps(taming_tiny())
    text = doc.replace('"batch_size": 2', '"batch_size": 2, "batch_size": 4')
    code, out, _ = run_cli("validate", write(tmp_path, "dup.json", text))
    assert code == 1 and "train.batch_size is written twice" in out and "[duplicate_key]" in out
    yaml_text = taming_yaml(extra_params="        disc_start: 5\n")
    code, out, _ = run_cli("validate", write(tmp_path, "dup.yaml", yaml_text))
    assert code == 1 and "model.params.lossconfig.params.disc_start is written twice" in out, out


def test_file_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", 1000)
    path = write(tmp_path, "huge.json", '{"model_type": "vqvae2", "extras": {"x": "' + "a" * 2000 + '"}}')
    code, _, err = run_cli("validate", path)
    assert code == 2 and "larger than" in err


def _mod(base, dotted, value):
    doc = base()
    node = doc
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return doc


T, D = "model_args.ddconfig.", "model_args."
# (description, config, code expected among validate's errors)
CASES = [
    ("model_args a list", _mod(taming_tiny, "model_args", [1, 2]), "bad_type"),
    ("lossconfig a list", _mod(taming_tiny, "lossconfig", [1]), "bad_type"),
    ("lossconfig a string", _mod(taming_tiny, "lossconfig", "vq"), "bad_type"),
    ("lossconfig.params a list", _mod(vqvae2_tiny, "lossconfig.params", [1]), "bad_type"),
    ("train a string", _mod(taming_tiny, "train", "fast"), "bad_type"),
    ("extras a number", _mod(taming_tiny, "extras", 7), "bad_type"),
    ("model_type a list", _mod(taming_tiny, "model_type", ["x"]), "bad_type"),
    ("Infinity", _mod(taming_tiny, D + "n_embed", float("inf")), "bad_type"),
    ("NaN decay", _mod(taming_tiny, D + "decay", float("nan")), "bad_value"),
    ("interpolation in train", _mod(taming_tiny, "train.learning_rate", "${oops}"), "interpolation"),
    ("interpolation in extras", _mod(taming_tiny, "extras", {"a": "${oops}"}), "interpolation"),
    ("crop the down-sampling cannot divide", _mod(taming_tiny, "data.image_size", 33), "crop_not_divisible"),
    ("in_channels 1", _mod(taming_tiny, T + "in_channels", 1), "channels_mismatch"),
    ("out_ch 4", _mod(taming_tiny, T + "out_ch", 4), "channels_mismatch"),
    ("vqvae2 in_channel 1", _mod(vqvae2_tiny, D + "in_channel", 1), "channels_mismatch"),
    ("n_embed 1e10", _mod(taming_tiny, D + "n_embed", 10 ** 10), "too_large"),
    ("ch 1e6", _mod(taming_tiny, T + "ch", 999968), "too_large"),
    ("vqvae2 channel 1e6", _mod(vqvae2_tiny, D + "channel", 10 ** 6), "too_large"),
    ("image_size 1e6", _mod(vqvae2_tiny, "data.image_size", 10 ** 6), "too_large"),
    ("batch size as text 0", _mod(taming_tiny, "train.batch_size", "0"), "bad_value"),
    ("no learning rate", _mod(taming_tiny, "train.learning_rate", None), "missing_learning_rate"),
    ("max_epochs 0", _mod(taming_tiny, "train.max_epochs", 0), "bad_value"),
    ("PatchGAN deeper than the crop", _mod(taming_tiny, "lossconfig.params.disc_num_layers", 4), "disc_too_deep"),
    ("disc_ndf 0", _mod(taming_tiny, "lossconfig.params.disc_ndf", 0), "bad_value"),
    ("null loss parameter", _mod(taming_tiny, "lossconfig.params.disc_num_layers", None), "bad_type"),
    ("beta as text", _mod(taming_tiny, D + "beta", "x"), "bad_type"),
    ("attn_resolutions as text", _mod(taming_tiny, T + "attn_resolutions", "x"), "bad_type"),
    ("missing ckpt_path file", _mod(taming_tiny, D + "ckpt_path", "/no/such.ckpt"), "file_not_found"),
    ("Gumbel scheduler with bad params",
     _mod(lambda: _mod(taming_tiny, "model_variant", "Gumbel"), D + "temperature_scheduler_config",
          {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler", "params": {"a": 1}}), "bad_value"),
]


@pytest.mark.parametrize("name,doc,code", CASES, ids=[c[0] for c in CASES])
def test_broken_config_gives_findings_and_fit_refuses(tmp_path, name, doc, code):
    path = write(tmp_path, "c.json", doc)
    exit_code, out, _ = run_cli("validate", path, "--json")
    assert exit_code == 1, out
    codes = [f["code"] for f in json.loads(out)[path]["findings"] if f["level"] == "error"]
    assert code in codes, codes
    exit_code, _, err = run_cli("fit", path, "--data", "builtin", "--max-steps", "1", "--out", str(tmp_path / "run"))
    assert exit_code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
