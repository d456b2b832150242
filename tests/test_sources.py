"""train/sources.py: one answer to "what does this path name" for fit --resume, eval and export;
train/atomic.py: writes that leave the old file or the new one."""
import os

import pytest
import torch
from safetensors.torch import save_file

from train import atomic
from train.checkpoint import FORMAT
from train.errors import UserError
from train.sources import locate, read_state


def _trainer_ckpt(path, step=3):
    torch.save({"format": FORMAT, "version": 1, "global_step": step, "model": {"w": torch.ones(2)}}, path)


def test_locate_recognises_every_kind(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model_type: TamingVQGAN\n")
    _trainer_ckpt(run / "checkpoints" / "last.ckpt")
    src = locate(str(run), "--resume")
    assert (src.kind, src.run_dir, src.config_path) == ("run", str(run), str(run / "config.yaml"))
    assert src.train_state and src.state_path.endswith("last.ckpt")
    assert read_state(src)["global_step"] == 3

    step = locate(str(run / "checkpoints" / "last.ckpt"), "eval:")
    assert step.kind == "checkpoint" and step.run_dir == str(run) and step.config_path == str(run / "config.yaml")
    assert locate(str(run / "checkpoints"), "--export").kind == "run"

    save_file({"w": torch.ones(2)}, str(run / "checkpoints" / "last.safetensors"), metadata={"global_step": "5"})
    weights = locate(str(run / "checkpoints" / "last.safetensors"), "eval:")
    assert weights.kind == "weights" and not weights.train_state and weights.config_path == str(run / "config.yaml")
    assert read_state(weights)["global_step"] == 5

    migrated = tmp_path / "migrated"
    migrated.mkdir()
    save_file({"w": torch.ones(2)}, str(migrated / "model.safetensors"))
    src = locate(str(migrated), "--resume")
    assert src.kind == "migrated" and src.run_dir is None and src.state_path == str(migrated)

    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 9}, tmp_path / "upstream.ckpt")
    src = locate(str(tmp_path / "upstream.ckpt"), "--resume")
    assert src.kind == "upstream"
    with pytest.raises(UserError, match="migrate"):
        read_state(src)


def test_locate_bad_paths(tmp_path):
    with pytest.raises(UserError, match="--resume .*no such file or folder"):
        locate(str(tmp_path / "nope"), "--resume")
    with pytest.raises(UserError, match="holds no checkpoint"):
        locate(str(tmp_path), "eval:")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "report.json"
    atomic.write_text(str(path), "old\n")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic.replacing(str(path)) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half")
            raise Boom()
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["report.json"]
    atomic.write_text(str(path), "new\n")
    assert path.read_text() == "new\n"
