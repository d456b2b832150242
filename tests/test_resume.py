"""Checkpoints and ``--resume``: bit-exact continuation on CPU, migrated folders, atomic writes."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_fit import tiny_config
from train import atomic, checkpoint as ckpt
from train.cli import main as cli
from train.fit import run


def _state(path):
    return torch.load(path, weights_only=True)


def _assert_same_tensors(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"]) == set(b["state"])
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k])), (i, k)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # GAN on from step 0 (both optimizers move), accumulation 2, discriminator every 2nd step,
    # gradient clipping.
    config = tiny_config(tmp_path, use_gan=True, disc_start=0, accumulate_grad_batches=2, disc_update_every=2,
                         ckpt_every=3, grad_clip=0.5)
    full, part = tmp_path / "full", tmp_path / "part"
    assert run([config, "--out", str(full), "--max-steps", "5", "--no-bar"])[0] == 0
    assert run([config, "--out", str(part), "--max-steps", "3", "--no-bar"])[0] == 0
    code, trainer = run(["--resume", str(part), "--max-steps", "5", "--no-bar"])
    assert code == 0 and trainer.resumed_from.endswith("last.ckpt") and trainer.run_dir == str(part)

    a, b = _state(full / "checkpoints" / "last.ckpt"), _state(part / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 5
    _assert_same_tensors(a["model"], b["model"])                  # EMA codebook included
    _assert_same_tensors(a["loss"], b["loss"])                    # discriminator
    for name in ("generator", "discriminator"):
        _assert_same_optimizer(a["optimizers"][name], b["optimizers"][name])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    _assert_same_tensors(load_file(full / "checkpoints" / "last.safetensors"),
                         load_file(part / "checkpoints" / "last.safetensors"))
    # The kept step-3 checkpoint of both runs is the same state too.
    _assert_same_tensors(_state(full / "checkpoints" / "step-3.ckpt")["model"],
                         _state(part / "checkpoints" / "step-3.ckpt")["model"])


def test_resume_from_a_checkpoint_file_and_a_changed_learning_rate(tmp_path, capsys):
    config = tiny_config(tmp_path, ckpt_every=1)
    out = tmp_path / "run"
    assert run([config, "--out", str(out), "--max-steps", "2", "--no-bar"])[0] == 0
    # The config given again names no data: the run's own (recorded) data is used.
    code, trainer = run([config, "--resume", str(out / "checkpoints" / "step-1.ckpt"), "--max-steps", "2",
                         "--no-bar", "train.learning_rate=3e-4", "data.path=null"])
    assert trainer.cfg.data.path == "builtin"
    assert code == 0 and trainer.step == 2 and trainer.run_dir == str(out)
    assert trainer.gen.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    assert "resumed from" in capsys.readouterr().out


def test_resume_from_a_migrated_folder_continues_at_its_step(tmp_path):
    config = tiny_config(tmp_path, use_gan=True, disc_start=0)
    src = tmp_path / "src"
    code, trainer = run([config, "--out", str(src), "--max-steps", "2", "--no-bar"])
    assert code == 0
    # What `python -m train migrate` writes (the contract shared with its engineer).
    migrated = tmp_path / "migrated"
    migrated.mkdir()
    (migrated / "config.yaml").write_text((src / "config.yaml").read_text())
    model_sd = {k: v.clone().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(model_sd, migrated / "model.safetensors")
    disc_sd = {f"discriminator.{k}": v.clone().contiguous() for k, v in trainer.disc.module.state_dict().items()}
    save_file(disc_sd, migrated / "discriminator.safetensors")
    torch.save({"global_step": 7, "epoch": 1,
                "optimizer_states": {"generator": trainer.gen.optimizer.state_dict(),
                                     "discriminator": trainer.disc.optimizer.state_dict()}},
               migrated / "train_state.pt")

    out = tmp_path / "continued"
    code, resumed = run(["--resume", str(migrated), "--out", str(out), "--max-steps", "7", "--no-bar"])
    assert code == 0 and resumed.step == 7
    _assert_same_tensors(load_file(out / "checkpoints" / "last.safetensors"), model_sd)
    state = _state(out / "checkpoints" / "last.ckpt")
    _assert_same_tensors(state["loss"], disc_sd)
    _assert_same_optimizer(state["optimizers"]["generator"], trainer.gen.optimizer.state_dict())

    code, resumed = run(["--resume", str(out), "--max-steps", "8", "--no-bar"])
    assert code == 0 and resumed.step == 8


def test_migrated_folder_without_train_state_starts_at_step_0(tmp_path):
    config = tiny_config(tmp_path, use_gan=False)
    code, trainer = run([config, "--out", str(tmp_path / "src"), "--max-steps", "1", "--no-bar"])
    migrated = tmp_path / "migrated"
    migrated.mkdir()
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, migrated / "model.safetensors")
    code, resumed = run([config, "--resume", str(migrated), "--out", str(tmp_path / "out"), "--max-steps", "1",
                         "--no-bar"])
    assert code == 0 and resumed.step == 1
    assert any("Adam starts fresh" in n for n in resumed.notes)


def test_unusable_resume_targets_exit_2(tmp_path, capsys):
    config = tiny_config(tmp_path)
    out = tmp_path / "run"
    assert run([config, "--out", str(out), "--max-steps", "1", "--no-bar"])[0] == 0
    capsys.readouterr()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    assert cli(["fit", "--resume", str(out), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable training checkpoint" in err and "\n" not in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["fit", config, "--resume", str(empty)]) == 2
    assert "neither checkpoints/last.ckpt" in capsys.readouterr().err

    # Weights for another model size: a clear shape message, not a traceback.
    good = tmp_path / "good"
    assert run([config, "--out", str(good), "--max-steps", "1", "--no-bar"])[0] == 0
    capsys.readouterr()
    assert cli(["fit", config, "--resume", str(good), "--out", str(tmp_path / "other"),
                "model_args.n_embed=32"]) == 2
    err = capsys.readouterr().err
    assert "quantize.embedding" in err and "n_embed" in err


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic.save_torch({"x": torch.ones(3)}, str(path))

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic.save_torch({"x": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.ckpt"]          # no temporary file left behind


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    state = ckpt.capture_rng()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    atomic.save_torch(state, str(tmp_path / "rng.pt"))
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.parametrize("payload, reason", [
    (b"not a checkpoint", "Unsupported operand"),
    ("pickled_os_system", "posix.system"),
])
def test_unreadable_checkpoint_message_names_the_real_reason_not_torchs_unsafe_advice(tmp_path, payload, reason):
    path = tmp_path / "last.ckpt"
    if payload == "pickled_os_system":
        torch.save({"format": ckpt.FORMAT, "hook": os.system}, path)   # never loaded unsafely here
    else:
        path.write_bytes(payload)
    with pytest.raises(ckpt.UserError) as info:
        ckpt.load_state(str(path))
    message = str(info.value)
    assert reason in message, message
    assert "weights_only` set to `False`" not in message and "will likely succeed" not in message, message
