"""Hostile and unlucky inputs for images, data and the command line (issue 11).

Every case is made here (no stored binaries) and run through the real CLI, in-process
(``train.cli.main``) or as ``python -m train``; each asserts the exit code, the one-line
message and that no traceback was printed:

* image bombs: a 661-byte PNG declaring 200000 x 1 pixels (13 billion once rescaled for a
  crop), a 144-megapixel PNG of zeros; refused from the header, skipped and counted in a
  folder, and the decode path stays within a memory limit (``RLIMIT_AS``);
* 16-bit and float images scaled to 8 bits, not clipped; unscalable ones refused;
* a symbolic-link loop in an image folder; ``--data ""``;
* SIGTERM during start-up; a ``UserError`` raised inside a DataLoader worker;
* ``--device`` values torch does not know, or devices this machine does not have;
* outputs that cannot be written: ``--out`` naming a file, a FIFO or a place under a file,
  and a full disk (a write that fails with ENOSPC), for fit, eval, migrate and
  extract-features; nothing is left half-written.
"""
import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from train.cli import main
from train.data import (DataSpec, ImageCrops, ImageRefused, list_folder, load_rgb, resolve_data,
                        to_model_range)
from train.schema import make_config
from tests.test_data import write_images as write_random_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
TINY_DINOVQ = os.path.join(ROOT, "configs", "dinovq_tiny.yaml")
LEGACY = os.path.join(ROOT, "configs", "legacy", "taming_emavq_nogan.json")
# In-process refusals happen before any model is built: well under this, even on a busy machine.
FAST_S = 20


# ----------------------------------------------------------------------------------------
# Crafted files

def png_bytes(width, height, bit_depth=8, color_type=0, row=None):
    """A PNG written by hand, streamed row by row: PIL would allocate the whole image to write
    one, and some of these are bombs.  ``color_type`` 0 is grey, 2 is RGB; rows are zeros
    unless ``row`` (the bytes of one row) is given."""
    channels = {0: 1, 2: 3}[color_type]
    row = bytes(width * channels * bit_depth // 8) if row is None else row
    z = zlib.compressobj(9)
    data = b"".join(z.compress(b"\0" + row) for _ in range(height)) + z.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def write_images(folder, n, size=(40, 36)):
    return write_random_images(folder, n, size)


def tiny_config(folder, **train):
    """A native JSON config of a 32 px TamingVQGAN EMAVQ without GAN (fast to build)."""
    cfg = {
        "name": "hostile", "model_type": "TamingVQGAN", "model_variant": "EMAVQ",
        "model_args": {"embed_dim": 8, "n_embed": 16,
                       "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3,
                                    "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                    "attn_resolutions": [], "dropout": 0.0}},
        "lossconfig": {"target": TAMING_LOSS, "params": {"disc_start": 0, "perceptual_weight": 0.0}},
        "train": {"use_gan": False, "learning_rate": 1e-4, "batch_size": 2, "log_every": 1, **train},
        "data": {"path": "builtin", "image_size": 32},
    }
    path = os.path.join(str(folder), "hostile.json")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


def cfg_for(**data):
    return OmegaConf.structured(make_config(data={"image_size": 32, **data}))


def run_cli(argv, capsys):
    """``(exit code, stdout, stderr, seconds)`` of ``python -m train ARGV`` in-process."""
    start = time.time()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err, time.time() - start


def assert_one_message(err, *fragments):
    """The clean refusal: one ``error:`` line with every fragment, and no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def python_m_train(args, cwd=ROOT, timeout=600, **popen):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-step run folder to evaluate."""
    folder = tmp_path_factory.mktemp("tiny_run")
    out = folder / "run"
    assert main(["fit", tiny_config(folder), "--out", str(out), "--max-steps", "1", "--no-bar"]) == 0
    return out


# ----------------------------------------------------------------------------------------
# Image bombs

def test_a_661_byte_png_of_200000_x_1_pixels_is_refused_from_its_header(tmp_path, capsys, tiny_run):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(200000, 1))
    assert bomb.stat().st_size < 1000
    out = tmp_path / "run"
    code, _, err, seconds = run_cli(["fit", tiny_config(tmp_path), "--data", str(bomb), "--out", str(out),
                                     "--max-steps", "1", "--no-bar"], capsys)
    assert code == 2 and seconds < FAST_S
    # Its shorter side rescaled to the 32 px crop: 6400000 x 32 pixels.
    assert_one_message(err, f"no readable image in image {bomb}", "200000 x 1", "6400000 x 32",
                       "data.max_image_pixels", "aspect ratio")
    assert not out.exists()

    code, _, err, _ = run_cli(["eval", str(tiny_run), "--data", str(bomb), "--device", "cpu"], capsys)
    assert code == 2
    assert_one_message(err, "eval: no readable image", "200000 x 1", "data.max_image_pixels")


def test_bombs_in_a_folder_are_skipped_and_counted_and_the_limit_is_a_setting(tmp_path, capsys):
    folder = tmp_path / "images"
    good = write_images(folder, 2)
    (folder / "wide.png").write_bytes(png_bytes(200000, 1))
    # 144 megapixels of zeros in 150 KB: over the default limit, and over PIL's own warning
    # threshold (89 M), which must not decide instead of data.max_image_pixels.
    (folder / "zeros.png").write_bytes(png_bytes(12000, 12000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = resolve_data(cfg_for(path=str(folder)))
    assert not [w for w in caught if "DecompressionBomb" in type(w.message).__name__]
    assert spec.paths == good
    assert spec.unreadable == [str(folder / "wide.png"), str(folder / "zeros.png")]
    assert "12000 x 12000 = 144,000,000 pixels is more than data.max_image_pixels (100,000,000)" in \
        spec.problems[str(folder / "zeros.png")]
    # Training reads only the good files.
    dataset = ImageCrops(spec, seed=0)
    assert {dataset[k]["path"] for k in range(4)} == set(good)

    # The limit is data.max_image_pixels: raised, the 144 MP file is accepted (not decoded here).
    raised = resolve_data(cfg_for(path=str(folder), max_image_pixels=200_000_000))
    assert str(folder / "zeros.png") in raised.paths
    # Lowered below the photos' size, nothing is left, and the message names the setting.
    code, _, err, _ = run_cli(["fit", tiny_config(tmp_path), "--data", str(folder), "--out", str(tmp_path / "r"),
                               "data.max_image_pixels=100"], capsys)
    assert code == 2
    assert_one_message(err, "no readable image", "data.max_image_pixels (100)")


def test_the_decode_path_stays_within_a_memory_limit(tmp_path):
    """Under RLIMIT_AS = (address space after import) + 768 MB: the old code would try to
    allocate 13 billion pixels for the 200000 x 1 file, and decode 144 MB for the zeros."""
    write_images(tmp_path / "ok", 1)
    (tmp_path / "wide.png").write_bytes(png_bytes(200000, 1))
    (tmp_path / "zeros.png").write_bytes(png_bytes(12000, 12000))
    script = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from train.data import DataSpec, ImageCrops, ImageRefused, crop_image, load_rgb
        with open("/proc/self/status") as fh:
            vm = [int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:")][0]
        resource.setrlimit(resource.RLIMIT_AS, (vm + (768 << 20), vm + (768 << 20)))
        folder = {str(tmp_path)!r}
        try:
            load_rgb(folder + "/zeros.png")
            sys.exit("zeros.png was decoded")
        except ImageRefused as exc:
            assert "144,000,000 pixels" in str(exc), exc
        wide = load_rgb(folder + "/wide.png")          # 200000 pixels decode fine ...
        try:
            crop_image(wide, 256, np.random.default_rng(0), False, (1.0, 1.0))   # ... the rescale is refused
            sys.exit("the 200000 x 1 image was rescaled")
        except ImageRefused as exc:
            assert "51200000 x 256" in str(exc), exc
        # A listing made before the files were swapped in: refused at load time, skipped, counted.
        spec = DataSpec(paths=[folder + "/wide.png", folder + "/zeros.png", folder + "/ok/img0.png"], image_size=32)
        items = [ImageCrops(spec, seed=0)[k] for k in range(6)]
        assert all(i["path"].endswith("img0.png") for i in items) and sum(i["skipped"] for i in items) > 0
        print("bounded")
    """)
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to read the address-space size")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "bounded" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------
# High bit depth

def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    sixteen = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"       # what PIL gives 16-bit PNGs
    assert np.asarray(load_rgb(str(tmp_path / "grey16.png")))[0, :, 0].tolist() == [0, 4, 128, 255]

    floats = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(floats).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    rgb = np.asarray(load_rgb(str(tmp_path / "float.tif")))
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()

    # 32-bit integer TIFFs holding 16-bit values ("I", as older Pillows open 16-bit PNGs).
    Image.fromarray(sixteen.astype(np.int32)).save(tmp_path / "int32.tif")
    assert Image.open(tmp_path / "int32.tif").mode == "I"
    assert np.asarray(load_rgb(str(tmp_path / "int32.tif")))[0, :, 0].tolist() == [0, 4, 128, 255]

    # 16-bit RGB PNGs open as 8-bit RGB (PIL keeps the high byte): already right.
    row = np.array([[0x8000, 0xFFFF, 0x0101]], dtype=">u2").tobytes()
    (tmp_path / "rgb16.png").write_bytes(png_bytes(1, 1, bit_depth=16, color_type=2, row=row))
    assert np.asarray(load_rgb(str(tmp_path / "rgb16.png")))[0, 0].tolist() == [128, 255, 1]

    # The training path sees the scaled values (no rescale: the crop is the whole image).
    gradient = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "gradient16.png")
    spec = DataSpec(paths=[str(tmp_path / "gradient16.png")], image_size=32, random_crop=False)
    image = to_model_range(ImageCrops(spec, seed=0)[0]["image"])    # uint8 item -> the model's range
    want = torch.from_numpy(((gradient.astype(np.float32) + 128) // 257) / 127.5 - 1.0)
    assert torch.equal(image[0], want) and image.max() > 0.9     # clipping made it all +1


def test_floats_and_integers_without_a_known_scale_are_refused(tmp_path, capsys):
    Image.fromarray(np.array([[0.0, 3.5]], dtype=np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(ImageRefused, match=r"float pixels from 0 to 3.5: only floats in \[0, 1\]"):
        load_rgb(str(tmp_path / "hdr.tif"))
    Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ImageRefused, match="NaN"):
        load_rgb(str(tmp_path / "nan.tif"))
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(ImageRefused, match="0 to 70000"):
        load_rgb(str(tmp_path / "int32.tif"))

    # The only training image is one of them: one message with the reason, exit 2.
    hdr = np.linspace(0, 4, 48 * 48, dtype=np.float32).reshape(48, 48)
    Image.fromarray(hdr).save(tmp_path / "big_hdr.tif")
    code, _, err, _ = run_cli(["fit", tiny_config(tmp_path), "--data", str(tmp_path / "big_hdr.tif"),
                               "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-bar"], capsys)
    assert code == 2
    # Refused before training: fit decodes files in training order until one gives a crop.
    assert_one_message(err, "no readable image in image", "big_hdr.tif", "only floats in [0, 1]")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------
# Listing and the --data value

def test_a_symlink_loop_lists_each_image_once(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 1)
    write_images(folder / "sub", 1)
    os.symlink("..", folder / "sub" / "up")          # back up the tree: a loop
    os.symlink(".", folder / "self")                 # a loop on itself
    os.symlink("sub", folder / "alias")              # the same folder under two names
    os.symlink(str(folder), tmp_path / "outside")    # a link to the whole tree, from outside
    assert list_folder(str(folder)) == [str(folder / "img0.png"), str(folder / "sub" / "img0.png")]
    spec = resolve_data(cfg_for(path=str(folder)))
    assert len(spec.paths) == 2 and spec.source.endswith("(2 image files)")
    # A folder given through a link is listed (links are followed), once.
    assert len(list_folder(str(tmp_path / "outside"))) == 2


def test_special_files_named_like_images_are_skipped_not_opened(tmp_path):
    # Opening a FIFO for reading blocks until someone writes: the listing must not hang.
    folder = tmp_path / "images"
    good = write_images(folder, 1)
    os.mkfifo(folder / "pipe.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{good[0]}\n{folder / 'pipe.png'}\n")
    for where in (str(folder), str(listing)):
        spec = resolve_data(cfg_for(), data_arg=where)
        assert spec.paths == good and spec.unreadable == [str(folder / "pipe.png")]
        assert "not a regular file" in spec.problems[str(folder / "pipe.png")]


def test_an_empty_data_path_is_refused(tmp_path, capsys, monkeypatch, tiny_run):
    # The working directory holds images: "" must not mean "train on everything here".
    write_images(tmp_path / "cwd", 2)
    monkeypatch.chdir(tmp_path / "cwd")
    config = tiny_config(tmp_path)
    code, _, err, seconds = run_cli(["fit", config, "--data", "", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and seconds < FAST_S
    assert_one_message(err, "--data is empty", "image folder")
    assert not (tmp_path / "run").exists()
    code, _, err, _ = run_cli(["fit", config, "data.path=", "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert_one_message(err, "no training data")                   # an empty override is no value
    with open(config) as fh:
        doc = json.load(fh)
    doc["data"]["path"] = ""
    with open(config, "w") as fh:
        json.dump(doc, fh)
    code, _, err, _ = run_cli(["fit", config, "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert_one_message(err, "data.path is empty")
    code, _, err, _ = run_cli(["eval", str(tiny_run), "--data", " "], capsys)
    assert code == 2
    assert_one_message(err, "--data is empty")
    code, _, err, _ = run_cli(["extract-features", TINY_DINOVQ, "--data", "", "--out",
                               str(tmp_path / "c.safetensors")], capsys)
    assert code == 2
    assert_one_message(err, "--data is empty")
    code, _, err, _ = run_cli(["fit", tiny_config(tmp_path), "--out", ""], capsys)
    assert code == 2
    assert_one_message(err, "--out is empty")


# ----------------------------------------------------------------------------------------
# Signals and worker processes

def _sigterm_caught(pid):
    """Whether process ``pid`` has a handler for SIGTERM (bit 15 of SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = [int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:")][0]
    except (OSError, IndexError):
        return False
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def test_sigterm_during_start_up_says_what_happened(tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to see when the handler is in place")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "train", "fit", tiny_config(tmp_path), "--data", "builtin",
                             "--out", str(out), "--no-bar"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # The command line is read and the handler set within milliseconds; importing torch
        # and building the model take seconds.  The signal lands in that start-up.
        deadline = time.time() + 60
        while not _sigterm_caught(proc.pid) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (proc.returncode, stdout, stderr)
    assert_one_message(stderr, "fit: stopped by SIGTERM before training started", "exit code 143")
    assert not (out / "checkpoints").exists()


def test_a_user_error_inside_a_dataloader_worker_is_one_message(tmp_path):
    from train.cli import user_message
    from train.data import make_loader

    folder = tmp_path / "images"
    paths = write_images(folder, 2)
    for path in paths:                      # headers intact, pixel data cut off: fails when decoded
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    # fit decodes in training order until one file gives a crop, so this is refused in the
    # main process before any worker starts.
    proc = python_m_train(["fit", tiny_config(tmp_path, num_workers=1), "--data", str(folder),
                           "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-bar"])
    assert proc.returncode == 2, proc.stderr
    assert "Caught UserError" not in proc.stderr and "worker process" not in proc.stderr
    assert_one_message(proc.stderr, "error: no readable image in folder", "image file is truncated",
                       "not damaged")
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Files that go bad after the start (a listing made before they were damaged): the worker
    # raises, torch re-raises it wrapped in the worker's traceback, the CLI keeps one line.
    spec = DataSpec(paths=paths, image_size=32, source=f"folder {folder}")
    with pytest.raises(Exception) as caught:
        next(iter(make_loader(spec, 0, 2, 1, 1, 0, start_step=0, end_step=1, num_workers=1)))
    assert "worker process" in str(caught.value)
    message = user_message(caught.value)
    assert "\n" not in message and message.startswith(f"no readable image in folder {folder}")
    assert "image file is truncated" in message


# ----------------------------------------------------------------------------------------
# --device

@pytest.mark.parametrize("device, fragment", [
    ("eval", "is not a device name"),
    ("gpu", "is not a device name"),
    ("cuda:x", "is not a device name"),
    ("xpu", "no xpu device here"),
    ("meta", "no meta device here"),
    ("cuda:99", "cuda"),
])
def test_device_values_torch_does_not_know_or_this_machine_lacks(device, fragment, tmp_path, capsys, tiny_run):
    code, _, err, seconds = run_cli(["eval", str(tiny_run), "--device", device], capsys)
    assert code == 2 and seconds < FAST_S
    assert_one_message(err, "eval: --device", device, fragment)
    code, _, err, seconds = run_cli(["extract-features", TINY_DINOVQ, "--device", device, "--data",
                                     str(tmp_path), "--out", str(tmp_path / "c.safetensors")], capsys)
    assert code == 2 and seconds < FAST_S
    assert_one_message(err, "extract-features: --device", device, fragment)
    assert not (tmp_path / "c.safetensors").exists()


# ----------------------------------------------------------------------------------------
# Outputs that cannot be written

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder):
    """Temporary files of the atomic writer (``*.tmp.PID``) and of migrate under ``folder``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        found += [os.path.join(dirpath, n) for n in filenames + dirnames if ".tmp." in n or ".migrating-" in n]
    return found


@pytest.mark.parametrize("kind", ["file", "fifo", "under_a_file", "not_writable"])
def test_fit_refuses_an_out_it_cannot_write_before_start_up(kind, tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path)
    blocker = tmp_path / "blocker"
    if kind == "file":
        blocker.write_text("keep me")
        out, fragment = blocker, "exists and is not a folder"
    elif kind == "fifo":
        os.mkfifo(blocker)
        out, fragment = blocker, "exists and is not a folder"
    elif kind == "under_a_file":
        blocker.write_text("keep me")
        out, fragment = blocker / "run", f"{blocker} is a file, so nothing can be created under it"
    else:
        # Permissions do not bind root (these tests may run as root): the OS says "no".
        (tmp_path / "locked").mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "locked")
                            else real_access(p, mode))
        out, fragment = tmp_path / "locked" / "run", "is not writable"
    code, _, err, seconds = run_cli(["fit", config, "--out", str(out), "--max-steps", "1"], capsys)
    assert code == 2 and seconds < FAST_S
    assert_one_message(err, f"fit: --out {out}", fragment)
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(blocker).st_mode)
    elif kind != "not_writable":
        assert blocker.read_text() == "keep me"


def test_demo_refuses_an_out_it_cannot_write(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    code, _, err, seconds = run_cli(["demo", "--out", str(blocker / "run"), "--max-steps", "1"], capsys)
    assert code == 2 and seconds < FAST_S
    assert_one_message(err, "demo: --out", "is a file, so nothing can be created under it")


def test_fit_on_a_full_disk_leaves_no_partial_checkpoint(tmp_path, capsys, monkeypatch):
    import train.atomic

    def half_then_full(obj, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 1000)
        _no_space()

    monkeypatch.setattr(train.atomic.torch, "save", half_then_full)
    out = tmp_path / "run"
    code, _, err, _ = run_cli(["fit", tiny_config(tmp_path), "--out", str(out), "--max-steps", "1", "--no-bar"],
                              capsys)
    assert code == 2
    assert_one_message(err, "cannot write", "No space left on device", "free disk space")
    assert not (out / "checkpoints" / "last.ckpt").exists() and not _leftovers(out)


@pytest.mark.parametrize("kind", ["folder", "fifo", "under_a_file"])
def test_eval_refuses_an_out_it_cannot_write_before_evaluating(kind, tmp_path, capsys, tiny_run):
    blocker = tmp_path / "report.json"
    if kind == "folder":
        blocker.mkdir()
        out, fragment = blocker, "is a folder"
    elif kind == "fifo":
        os.mkfifo(blocker)
        out, fragment = blocker, "is not a regular file"
    else:
        blocker.write_text("{}")
        out, fragment = blocker / "metrics.json", "is a file, so nothing can be created under it"
    code, stdout, err, seconds = run_cli(["eval", str(tiny_run), "--device", "cpu", "--out", str(out)], capsys)
    assert code == 2 and seconds < FAST_S and "PSNR" not in stdout
    assert_one_message(err, f"eval: --out {out}", fragment)
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(blocker).st_mode)


def test_eval_on_a_full_disk_keeps_the_old_report(tmp_path, capsys, monkeypatch, tiny_run):
    import train.atomic

    report = tmp_path / "report.json"
    report.write_text('{"old": true}\n')
    monkeypatch.setattr(train.atomic, "_fsync_file", _no_space)     # after the data went to the temp file
    code, _, err, _ = run_cli(["eval", str(tiny_run), "--device", "cpu", "--out", str(report)], capsys)
    assert code == 2
    assert_one_message(err, f"cannot write {report}", "No space left on device", "free disk space")
    assert report.read_text() == '{"old": true}\n' and not _leftovers(tmp_path)


def test_migrate_write_failures(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    code, _, err, _ = run_cli(["migrate", LEGACY, "--out", str(blocker)], capsys)
    assert code == 2
    assert_one_message(err, "is a file")
    code, _, err, _ = run_cli(["migrate", LEGACY, "--out", str(blocker / "migrated")], capsys)
    assert code == 2
    assert_one_message(err, "migrate: cannot use", str(blocker))
    assert blocker.read_text() == "keep me"

    import train.atomic

    monkeypatch.setattr(train.atomic, "_fsync_file", _no_space)
    out = tmp_path / "migrated"
    code, _, err, _ = run_cli(["migrate", LEGACY, "--out", str(out)], capsys)
    assert code == 2
    assert_one_message(err, "cannot write", "No space left on device", "free disk space")
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["folder", "fifo", "full_disk"])
def test_extract_features_write_failures(kind, tmp_path, capsys, monkeypatch):
    write_images(tmp_path / "images", 2)
    out = tmp_path / "cache.safetensors"
    if kind == "folder":
        out.mkdir()
        fragment = "is a folder"
    elif kind == "fifo":
        os.mkfifo(out)
        fragment = "is not a regular file"
    else:
        import train.atomic

        monkeypatch.setattr(train.atomic, "_fsync_file", _no_space)
        fragment = "No space left on device"
    code, _, err, _ = run_cli(["extract-features", TINY_DINOVQ, "--data", str(tmp_path / "images"),
                               "--out", str(out), "--device", "cpu"], capsys)
    assert code == 2
    # The --out checks name the option; a write that fails later names the file (train/atomic.py).
    assert_one_message(err, f"cannot write {out}" if kind == "full_disk" else f"--out {out}", fragment)
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(out).st_mode)
    if kind == "full_disk":
        assert not out.exists() and not _leftovers(tmp_path)
