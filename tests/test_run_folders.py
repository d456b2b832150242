"""Run folders and writes under hostile conditions (issue 11): one writer per folder, damage
detected, independent kept copies, typed checkpoint fields, no leftovers, special files left
alone, clean write failures.  Every file is made in the test; every case ends with exit 2,
one line naming the problem and the fix, and no traceback."""
import contextlib
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from tests.test_fit import tiny_config
from train import atomic, checkpoint as ckpt
from train.cli import main as cli
from train.errors import UserError
from train.fit import run
from train.run_folder import LOCK, open_run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(capsys, *needles):
    """stderr is one ``error:`` line holding every needle, with no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A 2-step run with a kept copy at every step: checkpoints/{last,step-1,step-2}.ckpt."""
    folder = tmp_path_factory.mktemp("trained")
    config = tiny_config(folder, ckpt_every=1, image_every=1000)
    out = folder / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert run([config, "--out", str(out), "--max-steps", "2", "--no-bar"])[0] == 0
    return config, out


@pytest.fixture
def trained(trained_once, tmp_path):
    """This test's own copy of the trained run folder (tests damage it) and config."""
    config, out = trained_once
    shutil.copytree(out, tmp_path / "run", symlinks=True)
    shutil.copy2(config, tmp_path / os.path.basename(config))
    return str(tmp_path / os.path.basename(config)), tmp_path / "run"


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------
# One writer per run folder

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from train.run_folder import open_run_folder
lock = open_run_folder({folder!r})
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    config = tiny_config(tmp_path, image_every=1000)
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, folder=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # The real command line, in its own process: exit 2, one line naming the holder.
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "train", "fit", config, "--out", str(out), "--max-steps", "1",
                               "--no-bar"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip()
        assert "Traceback" not in err and "\n" not in err, err
        assert f"in use by process {holder.pid} on " in err and "choose another --out" in err, err
        assert time.time() - started < 120
        assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()   # nothing mixed in

        # The holder killed with -9 mid-write: its lock goes with it, its temporary is cleaned.
        os.makedirs(out / "checkpoints")
        leftover = out / "checkpoints" / f"last.ckpt.tmp.{holder.pid}"
        leftover.write_bytes(b"half a checkpoint")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert run([config, "--out", str(out), "--max-steps", "1", "--no-bar"])[0] == 0
    assert not leftover.exists()
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def test_the_lock_is_freed_when_a_run_ends_and_refused_within_one_process(tmp_path):
    folder = str(tmp_path / "run")
    lock = open_run_folder(folder)
    with pytest.raises(UserError, match=f"in use by process {os.getpid()} "):
        open_run_folder(folder)
    lock.release()
    open_run_folder(folder).release()


# ----------------------------------------------------------------------------------------
# Checksums: damage inside the weights is found on resume and eval

def scribble(path, nbytes=4096, seed=0):
    """Overwrite ``nbytes`` in the middle of the largest tensor record of a torch zip file
    (the pickle stays readable: only the weights' bytes change)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len
        n = min(nbytes, info.file_size)
        fh.seek(start + (info.file_size - n) // 2)
        fh.write(random.Random(seed).randbytes(n))
    return info.filename


def test_scribbled_weights_are_refused_on_resume_and_eval_naming_the_last_good_copy(trained, capsys):
    config, out = trained
    last = out / "checkpoints" / "last.ckpt"
    scribble(last)
    started = time.time()
    assert cli(["fit", "--resume", str(out), "--max-steps", "3", "--no-bar"]) == 2
    one_line_error(capsys, f"{last} is damaged", "does not match the checksum", "step-2.ckpt",
                   "python -m train fit --resume")
    assert cli(["eval", str(out), "--num-images", "2"]) == 2
    one_line_error(capsys, f"{last} is damaged", "step-2.ckpt")
    assert time.time() - started < 60

    # The kept copy is intact and continues the run.
    code, trainer = run(["--resume", str(out / "checkpoints" / "step-2.ckpt"), "--max-steps", "3", "--no-bar"])
    assert code == 0 and trainer.step == 3


def test_a_damaged_kept_copy_recommends_an_intact_one_never_itself(trained, capsys):
    _, out = trained
    step2 = out / "checkpoints" / "step-2.ckpt"
    scribble(step2)
    assert cli(["fit", "--resume", str(step2), "--max-steps", "3", "--no-bar"]) == 2
    err = one_line_error(capsys, f"{step2} is damaged")
    assert f"instead: {out / 'checkpoints' / 'last.ckpt'}" in err


def test_scribbled_safetensors_weights_are_refused(trained, capsys):
    _, out = trained
    weights = out / "checkpoints" / "last.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata()
    sums = json.loads(meta["checksums"])
    assert meta["checksum_algorithm"] == "crc32" and set(sums) == set(ckpt.load_state(str(out / "checkpoints" /
                                                                                          "last.ckpt"))["model"])
    data = bytearray(weights.read_bytes())
    data[-4096:] = random.Random(1).randbytes(4096)      # the end of the file is tensor data
    weights.write_bytes(bytes(data))
    assert cli(["eval", str(weights), "--num-images", "2"]) == 2
    one_line_error(capsys, f"{weights} is damaged", "does not match the checksum", "last.ckpt")


def test_every_tensor_has_a_checksum(trained):
    _, out = trained
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["version"] == 2 and state["checksums"]["algorithm"] == "crc32"
    paths = dict(ckpt.tensors_in(state))
    assert set(state["checksums"]["tensors"]) == set(paths)
    assert any(p.startswith("optimizers/generator/state/") for p in paths)
    assert any(p.startswith("loss/discriminator.") for p in paths) and "rng/torch" in paths


# ----------------------------------------------------------------------------------------
# Kept copies are independent files

def test_kept_copies_are_independent_files(trained):
    _, out = trained
    folder = out / "checkpoints"
    last, step2 = folder / "last.ckpt", folder / "step-2.ckpt"
    assert os.stat(last).st_nlink == 1 and os.stat(step2).st_nlink == 1
    assert not os.path.samefile(last, step2)
    assert last.read_bytes() == step2.read_bytes()
    scribble(last)
    assert ckpt.load_state(str(step2))["global_step"] == 2      # damage to one is not damage to both
    assert sorted(os.listdir(folder)) == ["last.ckpt", "last.safetensors", "step-1.ckpt", "step-2.ckpt"]


def test_copy_file_falls_back_to_a_plain_copy(tmp_path, monkeypatch):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(os.urandom(3 << 20))
    import fcntl

    def no_clone(*args):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "ioctl", no_clone)
    if hasattr(os, "copy_file_range"):
        monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
    atomic.copy_file(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_ino != os.stat(src).st_ino


# ----------------------------------------------------------------------------------------
# Malformed fields of our own last.ckpt: one message naming the field

def _set(path, value):
    def apply(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return apply


def _drop(key):
    return lambda state: state.pop(key)


MALFORMED = [
    (_set(["global_step"], "5"), "field global_step is str '5'"),
    (_set(["global_step"], -1), "field global_step is int -1"),
    (_set(["global_step"], 1.5), "field global_step"),
    (_drop("global_step"), "field global_step is missing"),
    (_set(["model"], [1, 2]), "field model is list"),
    (_set(["model", "encoder.conv_in.weight"], "w"), "field model"),
    (_set(["optimizers"], [1]), "field optimizers is list"),
    (_set(["optimizers", "generator"], {"state": [], "param_groups": []}), "field optimizers.generator"),
    (_set(["optimizers", "generator", "param_groups"], [{"params": "all"}]), "field optimizers.generator"),
    (_set(["rng"], "seed"), "field rng is str 'seed'"),
    (_set(["rng", "python"], (3, (1, 2), None)), "field rng.python"),
    (_set(["rng", "torch"], torch.zeros(3)), "field rng.torch"),
    (_set(["rng", "numpy", "keys"], torch.zeros(5, dtype=torch.int64)), "field rng.numpy"),
    (_set(["rng_per_rank"], 7), "field rng_per_rank is int 7"),
    (_set(["rng_per_rank"], [{"python": None}]), "field rng_per_rank[0].python"),
    (_set(["counters"], {"bad_steps": "many"}), "field counters"),
    (_set(["data"], {"seed": [1]}), "field data"),
    (_set(["scalers"], [1]), "field scalers"),
    (_set(["world_size"], 0), "field world_size is int 0"),
    (_set(["config"], 42), "field config is int 42"),
    (_set(["epoch"], "one"), "field epoch"),
    (_set(["checksums"], "ok"), "field checksums"),
    (_drop("checksums"), "field checksums is missing"),
    (_set(["version"], "2"), "field version is str"),
]


@pytest.mark.parametrize("change, needle", MALFORMED, ids=[n for _, n in MALFORMED])
def test_malformed_fields_name_the_field(trained, capsys, change, needle):
    _, out = trained
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    change(state)
    torch.save(state, last)
    assert cli(["fit", "--resume", str(out), "--max-steps", "3", "--no-bar"]) == 2
    one_line_error(capsys, f"{last} is damaged: {needle}", "step-2.ckpt")


def test_malformed_migrated_train_state_names_the_field(tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tmp_path / "migrated"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    torch.save({"global_step": "seven", "optimizer_states": {}}, folder / "train_state.pt")
    with pytest.raises(UserError, match="train_state.pt: field global_step is str 'seven'.*re-run"):
        ckpt.load_migrated(str(folder))


# ----------------------------------------------------------------------------------------
# Stale temporaries

def test_stale_temporaries_of_dead_processes_are_cleaned_when_the_folder_is_opened(trained):
    config, out = trained
    gone = dead_pid()
    stale = [out / f"config.yaml.tmp.{gone}", out / "checkpoints" / f"last.ckpt.tmp.{gone}",
             out / "checkpoints" / f"step-9.ckpt.tmp.{gone}", out / "images" / f"step-0000002.png.tmp.{gone}"]
    live = out / "checkpoints" / f"notes.txt.tmp.{os.getppid()}"     # a running process's: kept
    for path in stale + [live]:
        path.write_bytes(b"partial")
    code, trainer = run(["--resume", str(out), "--max-steps", "3", "--no-bar"])
    assert code == 0 and trainer.run_dir == str(out)
    assert not any(p.exists() for p in stale) and live.exists()
    leftovers = [n for _, _, names in os.walk(out) for n in names if ".tmp." in n]
    assert leftovers == [live.name]


# ----------------------------------------------------------------------------------------
# Outputs that are not regular files are refused, never replaced

def test_special_files_are_refused_never_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is a FIFO .*refusing to replace it"):
        atomic.write_text(str(fifo), "x")
    link = tmp_path / "stdout"      # like /dev/stdout -> /proc/self/fd/1 -> a pipe
    os.symlink(fifo, link)
    with pytest.raises(UserError, match=r"stdout \(-> .*pipe\) is a FIFO"):
        atomic.save_torch({"x": 1}, str(link))
    with pytest.raises(UserError, match="is a folder"):
        atomic.write_text(str(tmp_path), "x")
    assert os.path.islink(link) and os.path.exists(fifo)
    import stat

    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe", "stdout"]

    # A symlink to a regular file: the file is rewritten, the link stays a link.
    real = tmp_path / "real.yaml"
    real.write_text("old\n")
    alias = tmp_path / "alias.yaml"
    os.symlink(real, alias)
    atomic.write_text(str(alias), "new\n")
    assert os.path.islink(alias) and real.read_text() == "new\n"


def test_validate_fix_into_a_fifo_exits_2_and_keeps_it(tmp_path, capsys):
    import stat

    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    config = os.path.join(ROOT, "configs", "legacy", "taming_vqvae2_mismatch.json")
    assert cli(["validate", config, "--fix", str(fifo)]) == 2
    one_line_error(capsys, str(fifo), "FIFO", "refusing to replace it")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("kind", ["fifo", "file", "under_a_file"])
def test_fit_out_that_cannot_be_a_folder_exits_2(tmp_path, capsys, kind):
    config = tiny_config(tmp_path)
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.write_text("a file")
    out = target / "run" if kind == "under_a_file" else target
    assert cli(["fit", config, "--out", str(out), "--max-steps", "1", "--no-bar"]) == 2
    one_line_error(capsys, str(out), "--out")


# ----------------------------------------------------------------------------------------
# Write failures

def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path, ckpt_every=1, image_every=1000)
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    started = time.time()
    assert cli(["fit", config, "--out", str(out), "--max-steps", "3", "--no-bar"]) == 2
    monkeypatch.undo()
    one_line_error(capsys, f"cannot write {out / 'checkpoints' / 'last.ckpt'}: No space left on device",
                   "the previous file is unchanged", "free disk space", "training stopped at step 2",
                   f"--resume {out}")
    assert time.time() - started < 120
    assert ckpt.load_state(str(out / "checkpoints" / "last.ckpt"))["global_step"] == 1
    assert not [n for _, _, names in os.walk(out) for n in names if ".tmp." in n]
    # The lock went with the failed run: the run continues from step 1.
    code, trainer = run(["--resume", str(out), "--max-steps", "2", "--no-bar"])
    assert code == 0 and trainer.step == 2


def test_atomic_write_failure_is_one_message_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic.write_text(str(path), "old\n")
    real_open = open

    class FullFile:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda f, mode="r", *a, **k: FullFile(real_open(f, mode, *a, **k))
                        if ".tmp." in str(f) and "w" in mode else real_open(f, mode, *a, **k))
    with pytest.raises(UserError, match="cannot write .*config.yaml: No space left on device "
                                        r"\(the previous file is unchanged\); free disk space"):
        atomic.write_text(str(path), "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["config.yaml"]


# ----------------------------------------------------------------------------------------
# Under torchrun only rank 0 writes: when it is refused, every rank stops with its message

def test_ranks_agree_when_rank_0_is_refused(torchrun_jobs):
    folder = torchrun_jobs / "refused"
    outcomes = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    for outcome in outcomes:
        assert f"in use by process {os.getpid()}" not in outcome["locked"]     # the worker's, not ours
        assert "is in use by process" in outcome["locked"] and "choose another --out" in outcome["locked"]
        assert "No space left on device" in outcome["disk_full"] and "training stopped at step 1" in \
            outcome["disk_full"]
    assert outcomes[0] == outcomes[1]
    assert not (folder / "locked" / "checkpoints").exists()
    assert not [n for _, _, names in os.walk(folder / "full") for n in names if ".tmp." in n]
