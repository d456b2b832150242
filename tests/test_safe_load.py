"""train/safe_load.py: legacy checkpoints load without running code from the file."""
import argparse
import collections
import os
import pathlib
import pickle
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from train.errors import UserError
from train.safe_load import (Placeholder, extract_state_dict, load_checkpoint, resolve_global,
                             strip_prefixes, to_plain)


def _lightning_checkpoint(tmp_path, legacy_format=False):
    """A checkpoint shaped like one Lightning 1.x wrote for taming: real callback objects,
    a callback *class* as dict key, OmegaConf hyper-parameters, Namespace, numpy scalars."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    hp = OmegaConf.create({"embed_dim": 8, "n_embed": 32,
                           "ddconfig": {"ch": 16, "ch_mult": [1, 2], "resolution": 32}})
    sd = collections.OrderedDict([("encoder.conv_in.weight", torch.randn(16, 3, 3, 3)),
                                  ("quantize.embedding.weight", torch.randn(32, 8))])
    ckpt = {
        "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25),
                                        "best_model_path": "/old/run/ckpt/epoch=2.ckpt"},
                      "instances": [ModelCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val/rec_loss"),
                                    LearningRateMonitor()]},
        "optimizer_states": [{"state": {0: {"step": 7, "exp_avg": torch.zeros(16, 3, 3, 3)}},
                              "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
        "hyper_parameters": hp,
        "hparams": argparse.Namespace(base_lr=4.5e-6, config=hp),
        "metric": np.float64(0.125),
        "np_array": np.arange(4, dtype=np.int64),
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy_format)
    return path, sd


@pytest.mark.parametrize("legacy_format", [False, True])
def test_lightning_checkpoint_with_callbacks_and_omegaconf_loads_tensors(tmp_path, legacy_format):
    path, sd = _lightning_checkpoint(tmp_path, legacy_format)
    # torch's own safe loader refuses this file: that is the case this module exists for.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    loaded = load_checkpoint(path)
    assert loaded.method == "restricted"
    for key, value in sd.items():
        assert torch.equal(loaded.data["state_dict"][key], value)
    assert loaded.data["global_step"] == 1234 and loaded.data["epoch"] == 3
    opt = loaded.data["optimizer_states"][0]
    assert opt["state"][0]["step"] == 7 and opt["param_groups"][0]["betas"] == (0.5, 0.9)

    dropped = {part.qualname for part in loaded.dropped}
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in dropped
    assert "omegaconf.dictconfig.DictConfig" in dropped
    assert "argparse.Namespace" in dropped
    assert any("ModelCheckpoint" in line and "callbacks" in line for line in loaded.dropped_summary())

    # The hyper-parameters come back as plain data, nothing of OmegaConf's code ran.
    plain = to_plain(loaded.data)
    assert plain["hyper_parameters"] == {"embed_dim": 8, "n_embed": 32,
                                         "ddconfig": {"ch": 16, "ch_mult": [1, 2], "resolution": 32}}
    assert plain["hparams"]["base_lr"] == 4.5e-6
    assert plain["metric"] == 0.125 and plain["np_array"] == [0, 1, 2, 3]
    assert plain["callbacks"]["instances"][0].startswith("<dropped pytorch_lightning")

    got, notes = extract_state_dict(loaded.data)
    assert list(got) == list(sd)


def test_plain_state_dict_takes_the_weights_only_path(tmp_path):
    sd = {"encoder.w": torch.randn(3, 3), "decoder.b": torch.randn(3)}
    torch.save(sd, tmp_path / "plain.pt")
    loaded = load_checkpoint(tmp_path / "plain.pt")
    assert loaded.method == "weights_only" and loaded.dropped == []
    got, notes = extract_state_dict(loaded.data)
    assert torch.equal(got["encoder.w"], sd["encoder.w"]) and "plain state dict" in notes[0]


class _System:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _Eval:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return eval, (f"open({str(self.target)!r}, 'w').write('pwned')",)


class _Open:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


class _Popen:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.target)],)


class _Exec:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.target)!r}).touch()",)


@pytest.mark.parametrize("payload", [_System, _Eval, _Open, _Popen, _Exec])
@pytest.mark.parametrize("legacy_format", [False, True])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, payload, legacy_format):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.w": torch.ones(2)}, "callbacks": {"x": payload(target)}},
               path, _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert not target.exists()
    message = str(err.value)
    assert "refused" in message and "nothing from it was executed" in message
    assert "\n" not in message


def write_marker(path):
    pathlib.Path(path).write_text("this ran")
    return path


class _MarkerCall:
    """A call of an ordinary (not refused) function that creates a file when it runs."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return write_marker, (str(self.target),)


def test_unknown_callable_becomes_inert_placeholder(tmp_path):
    target = tmp_path / "touched.txt"
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"encoder.w": torch.ones(2)}, "hook": _MarkerCall(target)}, path)
    # An ordinary unpickler would run it (proof that the payload is live)...
    torch.load(path, weights_only=False)
    assert target.exists()
    target.unlink()
    # ...the restricted one records the call and runs nothing.
    loaded = load_checkpoint(path)
    assert not target.exists()
    assert isinstance(loaded.data["hook"], Placeholder)
    assert loaded.data["hook"].ph_args == (str(target),)
    assert [p.qualname for p in loaded.dropped] == [f"{write_marker.__module__}.write_marker"]
    assert torch.equal(loaded.data["state_dict"]["encoder.w"], torch.ones(2))


def test_resolve_global_allowlist_placeholders_and_refusals():
    assert resolve_global("collections", "OrderedDict") is collections.OrderedDict
    assert resolve_global("torch", "float16") is torch.float16
    cls = resolve_global("omegaconf.dictconfig", "DictConfig")
    assert issubclass(cls, Placeholder) and cls is resolve_global("omegaconf.dictconfig", "DictConfig")
    # a placeholder records and swallows, it never calls the original class
    obj = cls(1, x=2)
    obj.__setstate__({"_content": {"a": 1}})
    obj["k"] = "v"
    assert obj.ph_args == (1,) and obj.ph_kwargs == {"x": 2} and obj.ph_items == {"k": "v"}
    for module, name in [("os", "system"), ("posix", "system"), ("subprocess", "Popen"),
                         ("builtins", "eval"), ("builtins", "exec"), ("builtins", "__import__"),
                         ("builtins", "getattr"), ("torch.storage", "_load_from_bytes")]:
        with pytest.raises(Exception, match=name):
            resolve_global(module, name)


def test_memory_bomb_bytearray_is_refused(tmp_path):
    # A pickle that asks for bytearray(<huge int>) would exhaust memory before anything else.
    payload = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x7f\x85R."
    path = tmp_path / "bomb.ckpt"
    path.write_bytes(payload)
    with pytest.raises(UserError, match="cannot be read.*bytearray"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    with pytest.raises(UserError, match="TorchScript"):
        load_checkpoint(path)


def test_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"epoch": 1, "notes": "no weights here"}, tmp_path / "empty.ckpt")
    with pytest.raises(UserError, match="no model weights"):
        extract_state_dict(load_checkpoint(tmp_path / "empty.ckpt").data)


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file
    sd = {"encoder.w": torch.randn(2, 2)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.method == "safetensors" and torch.equal(loaded.data["encoder.w"], sd["encoder.w"])


@pytest.mark.parametrize("prefix", ["module.", "model.", "module.model.", "models.taming."])
def test_strip_prefixes(prefix):
    sd = {f"{prefix}encoder.conv_in.weight": torch.ones(1), f"{prefix}quantize.embedding.weight": torch.ones(2),
          f"{prefix}loss.discriminator.main.0.weight": torch.ones(3), "model_ema.decay": torch.ones(1)}
    out, stripped = strip_prefixes(sd, ("encoder", "decoder", "quantize", "loss"))
    assert list(out) == ["encoder.conv_in.weight", "quantize.embedding.weight",
                         "loss.discriminator.main.0.weight", "model_ema.decay"]
    assert stripped == {prefix: 3}


def test_strip_prefixes_refuses_two_models_in_one_file():
    sd = {"model.encoder.w": torch.ones(1), "ema.encoder.w": torch.ones(1)}
    with pytest.raises(UserError, match="more than one model"):
        strip_prefixes(sd, ("encoder",))


def test_deeply_nested_and_cyclic_containers(tmp_path):
    from train.safe_load import find_placeholders, placeholder_class

    # Deeper than the recursion limit (a crafted pickle can nest that deep): the walk is iterative.
    deep = placeholder_class("omegaconf.dictconfig", "DictConfig")()
    for _ in range(5000):
        deep = [deep]
    found = find_placeholders({"deep": deep})
    assert [p.qualname for p in found] == ["omegaconf.dictconfig.DictConfig"]
    assert found[0].path.startswith("deep[0][0]")

    cyclic = {"name": "loop", "cfg": OmegaConf.create({"a": 1})}
    cyclic["self"] = cyclic
    torch.save({"state_dict": {"w": torch.ones(1)}, "cyclic": cyclic}, tmp_path / "cyclic.ckpt")
    loaded = load_checkpoint(tmp_path / "cyclic.ckpt")
    assert loaded.data["cyclic"]["self"] is loaded.data["cyclic"]
    assert [p.path for p in loaded.dropped] == ["cyclic['cfg']"]


def test_tensor_constructor_is_not_callable_from_a_pickle():
    # torch.Tensor(<size>) allocates memory of that size: the restricted unpickler hands out
    # an inert placeholder for it.  (torch's own weights_only loader, tried first, does allow
    # torch.Tensor(<size>); that is a memory, not a code-execution, risk.)
    cls = resolve_global("torch", "Tensor")
    assert issubclass(cls, Placeholder)
    assert isinstance(cls(2 ** 40), Placeholder)
    assert issubclass(resolve_global("torch.nn.parameter", "Parameter"), Placeholder)


class _ForgedDtype:
    """Pickles as a structured dtype with an object field whose "holds objects" flag is cleared."""

    def __reduce__(self):
        _, args, state = np.dtype([("a", "O")]).__reduce__()
        return np.dtype, args, state[:-1] + (0,)


class _ArrayOfForgedPointers:
    """Pickles as an array of that dtype whose 8 data bytes would be read as a PyObject*."""

    def __reduce__(self):
        func, args, state = np.zeros(1, dtype=[("a", "i8")]).__reduce__()
        return func, args, (state[0], state[1], _ForgedDtype(), state[3], (0x41414141).to_bytes(8, "little"))


@pytest.mark.parametrize("payload", [
    {"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"h": _ArrayOfForgedPointers()}},
    {"state_dict": {"w": torch.zeros(2)}, "x": np.array(["2020-01-01"], dtype="datetime64[s]")},
    {"state_dict": {"w": torch.zeros(2)}, "x": np.zeros(1, dtype=[("a", "f4")])},
], ids=["object_field_flag_cleared", "datetime", "structured"])
def test_numpy_dtypes_beyond_numbers_and_objects_are_refused(tmp_path, payload):
    # numpy trusts the flags in a pickled dtype's state: the forged one would turn file bytes
    # into object pointers (a segfault on first access, or code execution with a crafted heap).
    path = tmp_path / "forged.ckpt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="cannot be read.*numpy dtype"):
        load_checkpoint(path)


class _TensorOfSize:
    """A pickle that calls torch.Tensor(<size>): torch's own allowlist hands out the real class."""

    def __reduce__(self):
        return torch.Tensor, (2 ** 20, 2 ** 20)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_size_taking_constructor_calls_are_refused_before_torch_reads_the_file(tmp_path, legacy_format):
    from train.safe_load import UnreadableFile, load_weights_file

    path = tmp_path / "bomb.pt"
    torch.save({"w": _TensorOfSize()}, path, _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(UserError, match=r"cannot be read.*torch\.Tensor\(1048576, 1048576\)"):
        load_checkpoint(path)
    with pytest.raises(UnreadableFile, match="memory bomb") as info:
        load_weights_file(path)
    assert info.value.objects


def test_load_weights_file_reports_torchs_reason_and_maps_zip_files(tmp_path):
    from train.safe_load import UnreadableFile, load_weights_file

    torch.save({"w": torch.arange(4.0)}, tmp_path / "ok.pt")
    assert torch.equal(load_weights_file(tmp_path / "ok.pt")["w"], torch.arange(4.0))
    torch.save({"w": torch.ones(1), "ns": argparse.Namespace(a=1)}, tmp_path / "ns.pt")
    with pytest.raises(UnreadableFile, match="argparse.Namespace") as info:
        load_weights_file(tmp_path / "ns.pt")
    assert info.value.objects and "weights_only` set to `False`" not in str(info.value)
    assert load_weights_file(tmp_path / "ns.pt", allow=[argparse.Namespace])["ns"].a == 1
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(UnreadableFile) as info:
        load_weights_file(tmp_path / "junk.pt")
    assert not info.value.objects
