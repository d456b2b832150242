"""The data pipeline of issue 12: worker processes by default, uint8 crops scaled on the
training device, JPEG draft decoding, no header scan before training, and batches that do
not depend on the worker count (so resuming stays exact)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from train.data import (DataSpec, ImageCrops, check_usable, crop_image, fixed_crops, load_rgb, loader_workers,
                        make_loader, resolve_data, to_model_range, to_tensor)
from train.errors import ERROR, UserError
from train.fit import run
from train.schema import make_config
from train.validate import validate_file
from tests.test_fit import tiny_config


def cfg_for(**data):
    return OmegaConf.structured(make_config(data={"image_size": 16, **data}))


def smooth_image(width, height, seed):
    """An RGB photograph stand-in with structure at several scales (JPEG and draft decoding
    behave on it as on photos; random noise would not survive either)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * math.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 4, (3, 3))]
    return Image.fromarray((127.5 + 120 * np.stack(channels, -1)).astype(np.uint8))


def write_photos(folder, sizes, ext="jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"photo{i}.{ext}"
        smooth_image(w, h, i).save(path, quality=90) if ext == "jpg" else smooth_image(w, h, i).save(path)
        paths.append(str(path))
    return paths


def batches(spec, workers, start, end, batch_size=3):
    return list(make_loader(spec, 5, batch_size, 2, 1, 0, start_step=start, end_step=end, num_workers=workers))


def test_batches_are_identical_for_any_worker_count_and_on_resume(tmp_path):
    folder = tmp_path / "images"
    write_photos(folder, [(96, 64), (64, 80), (200, 150), (48, 48)])           # JPEGs, some drafted
    write_photos(folder / "png", [(40, 36), (36, 50)], ext="png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")                 # skipped and counted
    spec = resolve_data(cfg_for(path=str(folder)), scan=False)
    assert len(spec.paths) == 7

    single = batches(spec, 0, 0, 6)
    assert all(b["image"].dtype == torch.uint8 and b["image"].shape == (3, 3, 16, 16) for b in single)
    assert sum(int(b["skipped"].sum()) for b in single) > 0
    for workers in (2, "auto"):
        many = batches(spec, workers, 0, 6)
        assert len(many) == len(single) == 12       # 6 steps x 2 accumulated micro-batches
        for a, b in zip(single, many):
            assert torch.equal(a["image"], b["image"]) and a["path"] == b["path"]
            assert torch.equal(a["file_index"], b["file_index"]) and torch.equal(a["skipped"], b["skipped"])
    # A run resumed at step 4 (with workers) reads what the uninterrupted run read.
    resumed = batches(spec, 2, 4, 6)
    for a, b in zip(single[8:], resumed):
        assert torch.equal(a["image"], b["image"]) and a["path"] == b["path"]


def test_a_run_with_workers_resumed_mid_run_ends_with_the_weights_of_one_without(tmp_path, capsys):
    """The real trainer: 0 workers for 3 steps vs 2 workers for 2 steps, resumed with 2 more
    workers to step 3 -- bit-identical weights and codebook."""
    config = tiny_config(tmp_path, use_gan=False, log_every=1, image_every=100, ckpt_every=100)
    plain, split = tmp_path / "plain", tmp_path / "split"
    assert run([config, "--out", str(plain), "--max-steps", "3", "--no-bar", "train.num_workers=0"])[0] == 0
    assert "loading in the training process" in capsys.readouterr().out
    assert run([config, "--out", str(split), "--max-steps", "2", "--no-bar", "train.num_workers=2"])[0] == 0
    assert "2 loader worker(s)" in capsys.readouterr().out
    code, trainer = run(["--resume", str(split), "--max-steps", "3", "--no-bar"])
    assert code == 0 and trainer.step == 3
    a = torch.load(plain / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any("embed_avg" in k for k in a)          # the EMA codebook is part of the comparison


def test_uint8_crops_become_to_tensors_values_on_the_device():
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_model_range(values), to_tensor(values.numpy().reshape(1, 256, 1))[0, 0])
    spec = resolve_data(cfg_for(path="builtin", image_size=24))
    item = ImageCrops(spec, seed=1)[3]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 24, 24)
    assert torch.equal(to_model_range(item["image"]), to_tensor(item["image"].permute(1, 2, 0).numpy()))
    floats = fixed_crops(spec, 2, seed=1)                    # callers outside training get floats
    assert floats.dtype == torch.float32 and floats.min() >= -1 and floats.max() <= 1
    assert to_model_range(floats) is floats                  # already in range: left alone


def test_jpegs_are_drafted_only_when_twice_the_needed_size(tmp_path):
    big, small = write_photos(tmp_path, [(400, 300), (60, 60)])
    assert load_rgb(big).size == (400, 300)
    assert load_rgb(big, draft_short=32).size == (50, 38)         # 1/8: 300 // 32 = 9 >= 8
    assert load_rgb(big, draft_short=100).size == (200, 150)      # 1/2: 300 // 100 = 3
    assert load_rgb(big, draft_short=151).size == (400, 300)      # less than twice: full decode
    assert load_rgb(small, draft_short=32).size == (60, 60)
    png = write_photos(tmp_path / "png", [(400, 300)], ext="png")[0]
    assert load_rgb(png, draft_short=32).size == (400, 300)       # only JPEGs have draft decoding
    # Deterministic, and close to the full decode + bicubic rescale it replaces.
    rng = lambda: np.random.default_rng(0)                        # noqa: E731
    drafted = crop_image(load_rgb(big, draft_short=32), 32, rng(), False, (1.0, 1.0))
    assert np.array_equal(drafted, crop_image(load_rgb(big, draft_short=32), 32, rng(), False, (1.0, 1.0)))
    full = crop_image(load_rgb(big), 32, rng(), False, (1.0, 1.0))
    assert 0 < np.abs(drafted.astype(int) - full).mean() < 2

    # Training keeps the pixels its largest zoom needs: 32 px crops zoomed up to 4x need a
    # 128 px shorter side, so the 400 x 300 JPEG is decoded at 1/2 (200 x 150), not 1/8.
    spec = DataSpec(paths=[big], image_size=32, scale_range=(1.0, 4.0))
    item = ImageCrops(spec, seed=0)[7]
    want = crop_image(load_rgb(big, draft_short=128), 32, np.random.default_rng([0, 1, 7]), True, (1.0, 4.0))
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), want)


def test_fit_opens_no_header_before_training_and_skips_bad_files_when_read(tmp_path):
    good = write_photos(tmp_path / "good", [(40, 36)], ext="png")[0]
    os.mkfifo(tmp_path / "pipe.png")                  # opening it would block: never opened
    missing = [str(tmp_path / f"gone{i}.png") for i in range(200)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([good, str(tmp_path / "pipe.png"), *missing]) + "\n")
    spec = resolve_data(cfg_for(), data_arg=str(listing), scan=False)
    # Nothing was dropped up front: the bad entries are still listed, none reported yet.
    assert len(spec.paths) == 202 and spec.unreadable == [] and spec.problems == {}
    dataset = ImageCrops(spec, seed=0)
    items = [dataset[k] for k in range(0, 202, 20)]
    assert all(i["path"] == good for i in items) and sum(i["skipped"] for i in items) > 0
    # The scan eval keeps drops them before it starts.
    scanned = resolve_data(cfg_for(), data_arg=str(listing))
    assert scanned.paths == [good] and len(scanned.unreadable) == 201


def test_a_data_set_without_a_usable_image_is_refused_before_training(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(UserError, match=r"no readable image in folder .*(a\.png|b\.jpg): cannot be read as an image"):
        resolve_data(cfg_for(path=str(folder)), scan=False)
    # Good files are found wherever the seed's order puts them, reading only until the first.
    write_photos(folder, [(30, 30)], ext="png")
    spec = resolve_data(cfg_for(path=str(folder)), scan=False)
    check_usable(spec, seed=123)
    assert len(spec.paths) == 3


def test_auto_worker_count_follows_the_cpus_and_the_processes_per_node(monkeypatch):
    assert loader_workers("auto", cpus=1, local_processes=1) == 0
    assert loader_workers("auto", cpus=2, local_processes=1) == 1
    assert loader_workers("auto", cpus=16, local_processes=2) == 7
    assert loader_workers("auto", cpus=16, local_processes=16) == 0
    assert loader_workers("auto", cpus=128, local_processes=1) == 8          # capped
    assert loader_workers(3) == 3 and loader_workers(0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                               # torchrun sets it
    assert loader_workers("auto", cpus=32) == 7
    spec = resolve_data(cfg_for(path="builtin"))
    loader = make_loader(spec, 0, 2, 1, 1, 0, 0, 1, num_workers=2)
    assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor >= 2


@pytest.mark.parametrize("value, ok, fix", [
    ("auto", True, None), (0, True, None), (6, True, None),
    (-1, False, "DELETE"), ("x", False, "DELETE"), ("8", False, 8), (10 ** 6, False, "DELETE"), (1.5, False, None),
])
def test_validate_accepts_auto_or_a_count(tmp_path, value, ok, fix):
    from train.errors import DELETE

    path = tmp_path / "c.json"
    doc = json.load(open(tiny_config(tmp_path)))
    doc["train"]["num_workers"] = value
    path.write_text(json.dumps(doc))
    _, findings = validate_file(str(path))
    hits = [f for f in findings if f.path == "train.num_workers" and f.level == ERROR]
    assert (not hits) == ok, findings
    if not ok:
        assert len(hits) == 1 and ("auto" in hits[0].message + hits[0].fix or hits[0].code == "bad_type")
    if fix is not None:
        assert hits[0].ops == [("train.num_workers", DELETE if fix == "DELETE" else fix)]
