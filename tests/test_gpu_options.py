"""``train.channels_last`` and ``train.compile`` on CPU with a tiny real TamingVQGAN.

* channels_last: weights and batches train in NHWC; the checkpoint holds the same keys
  and numbers as a plain run's (to float tolerance) and loads into a plain model.
* compile: both networks are compiled in place (``nn.Module.compile``), so checkpoint keys
  do not change, and one step trains to the same weights as without.  Inductor's C++ build
  of even this model takes minutes on a small CPU, so the test traces with torch.compile's
  ``eager`` backend (``train.trainer.COMPILE_BACKEND``); dynamo captures the same graphs.
* no C++ compiler on PATH: ``fit ... train.compile=true`` is one message and exit code 2.
* ``validate``: the keys are booleans; anything else is a finding.
"""
import json
import os

import torch
from omegaconf import OmegaConf

import train.trainer as trainer_module
from tests.test_fit import tiny_config
from train.cli import main as cli
from train.fit import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fit(tmp_path, name, *overrides, use_gan=True):
    config = tiny_config(tmp_path, name=name, use_gan=use_gan, log_every=1, image_every=1000, ckpt_every=1000)
    code, trainer = run([config, "--out", str(tmp_path / name), "--max-steps", "2", "--no-bar", *overrides])
    assert code == 0
    return trainer, torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)


def test_channels_last_trains_and_saves_the_same_checkpoint_keys(tmp_path):
    plain, plain_state = fit(tmp_path, "plain")
    nhwc, nhwc_state = fit(tmp_path, "nhwc", "train.channels_last=true")
    conv = nhwc.model.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nhwc.disc.module.main[0].weight.is_contiguous(memory_format=torch.channels_last)
    # NHWC convolutions sum in another order; Adam (betas 0.5, 0.9) moves a weight by at
    # most 1.6 x lr per step whatever the gradient, so 2 steps stay within 2 x 2 x 1.6 x lr.
    for part in ("model", "loss"):
        assert list(nhwc_state[part]) == list(plain_state[part])
        for k, v in nhwc_state[part].items():
            assert torch.allclose(v.float(), plain_state[part][k].float(), atol=7e-4), k
    assert OmegaConf.create(nhwc_state["config"]).train.channels_last is True
    assert "channels_last: true" in (tmp_path / "nhwc" / "config.yaml").read_text()
    # The NHWC checkpoint loads into a model built without the option.
    plain.model.load_state_dict(nhwc_state["model"])


def test_compile_keeps_state_dict_keys_and_trains_the_same(tmp_path, monkeypatch):
    _, plain_state = fit(tmp_path, "plain", use_gan=False)
    monkeypatch.setattr(trainer_module, "COMPILE_BACKEND", "eager")
    compiled, state = fit(tmp_path, "compiled", "train.compile=true", use_gan=False)
    assert compiled.model._compiled_call_impl is not None       # the model's __call__ is compiled
    assert list(state["model"]) == list(plain_state["model"])
    assert not any("_orig_mod" in k for k in state["model"])
    for k, v in state["model"].items():
        assert torch.allclose(v.float(), plain_state["model"][k].float(), atol=1e-5), k
    assert OmegaConf.create(state["config"]).train.compile is True


def test_compile_without_a_cpp_compiler_exits_2(tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path, use_gan=False)
    monkeypatch.setenv("PATH", str(tmp_path))         # no g++, c++ or clang++ reachable
    monkeypatch.delenv("CXX", raising=False)
    assert cli(["fit", config, "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-bar",
                "train.compile=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert "train.compile" in err and "C++ compiler" in err and "train.compile=false" in err


def test_validate_wants_booleans(tmp_path, capsys):
    config = tiny_config(tmp_path)
    data = json.loads(open(config).read())
    data["train"].update(compile="maybe", channels_last=[1])
    with open(config, "w") as fh:
        json.dump(data, fh)
    assert cli(["validate", config, "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)[config]["findings"]
    bad = {f["path"]: f for f in findings if f["level"] == "error"}
    assert set(bad) == {"train.compile", "train.channels_last"}
    assert all(f["code"] == "bad_type" for f in bad.values())


def test_bench_train_runs_the_three_setups_tiny_on_cpu(tmp_path, monkeypatch):
    """``benchmarks/bench_train.py throughput --tiny`` (what a GPU node runs at full size)."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "benchmarks", "bench_train.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # The benchmark replays batches from memory through the trainer's loader name: put the
    # real one back afterwards.
    monkeypatch.setattr(trainer_module, "make_loader", trainer_module.make_loader)
    monkeypatch.setattr(trainer_module, "COMPILE_BACKEND", trainer_module.COMPILE_BACKEND)
    out = tmp_path / "bench.txt"
    bench.main(["throughput", "--device", "cpu", "--tiny", "--in-process", "--batch", "1", "--warmup", "0",
                "--steps", "1", "--compile-backend", "eager", "--out", str(out)])
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^  (\S+)\s+([\d.]+) images/s", out.read_text(), re.M)}
    assert set(rows) == {"fp32", "bf16", "bf16+compile+channels_last"} and all(v > 0 for v in rows.values())
