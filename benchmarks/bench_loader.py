"""Benchmark: the training data pipeline (issue 12), side by side in one run (CPU, not a test).

    .venv/bin/python benchmarks/bench_loader.py                      # a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_loader.py --images 300 --workers 4 --big 100000

(a) **Loader throughput.**  ``--images`` JPEGs (quality 90) are made from scikit-image's
colour photographs, each rescaled to a random size between 500 x 375 and 1000 x 750 (either
orientation) and flipped at random, in a temporary folder.  On the same files, in turns
(``--rounds``, medians reported, so that load from other processes on a shared machine hits
both sides alike):

* *single*: plain PIL in this process: open, full decode, RGB, bicubic rescale of the
  shorter side to ``--size``, random crop, numpy array -- what a minimal loader does;
* *loader W*: ``make_loader`` with W workers (default: the CPUs this process may use),
  batches of 16 uint8 crops collated and shipped to this process; timed after its first
  batch (worker start-up is a one-off);
* *loader 0*: ``make_loader`` in this process (what JPEG draft decoding alone gains).

Issue 12's target: loader W >= 0.9 x W x single.

(b) **Time to the first optimizer step.**  A folder of ``--big`` (default 100000) files
and one of 1000, both hard links to 16 of the JPEGs: to the listing they are ordinary
files, as a data set's are (symbolic links would cost a ``stat`` each, which ``os.walk``
needs to tell a linked folder from a file: about 1.7 s more per 100000 here), and a decode
costs per file read, not per file listed.  Timed in this process, each in turns: ``resolve_data`` as ``fit``
calls it (no header scan), a ``Trainer`` of a tiny TamingVQGAN (64 px crops, default
``num_workers``), one optimizer step.  Target: big / 1k <= 1.3.  For contrast, the header scan
``fit`` ran before (``resolve_data(scan=True)``, every header opened) on the big folder.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def make_jpegs(folder: str, count: int, seed: int = 0):
    from train.data import builtin_dir

    rng = np.random.default_rng(seed)
    photos = [Image.open(os.path.join(builtin_dir(), name)).convert("RGB") for name in PHOTOS]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w = int(rng.integers(500, 1001))
        size = (w, w * 3 // 4) if rng.random() < 0.7 else (w * 3 // 4, w)
        im = photo.resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, f"img{i:05d}.jpg")
        im.save(path, quality=90)
        paths.append(path)
    return paths


def single_process_rate(paths, size: int) -> float:
    """Images/s of plain PIL: full decode, rescale the shorter side, random crop."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        x = int(rng.integers(0, im.size[0] - size + 1))
        y = int(rng.integers(0, im.size[1] - size + 1))
        np.asarray(im.crop((x, y, x + size, y + size)))
    return len(paths) / (time.perf_counter() - start)


def loader_rate(paths, size: int, workers: int, batch: int = 16, batches: int = 0) -> float:
    """Images/s out of ``make_loader`` (after its first batch)."""
    from train.data import DataSpec, make_loader

    spec = DataSpec(paths=list(paths), image_size=size, source="bench")
    # Two epochs: the batches ready when the first arrives (W - 1 of them) bias the rate little.
    batches = batches or max(8, 2 * len(paths) // batch)
    it = iter(make_loader(spec, 0, batch, 1, 1, 0, start_step=0, end_step=batches + 1, num_workers=workers))
    next(it)
    start = time.perf_counter()
    n = sum(int(b["image"].shape[0]) for b in it)
    rate = n / (time.perf_counter() - start)
    del it
    return rate


def tiny_config(folder: str) -> str:
    cfg = {"name": "bench", "model_type": "TamingVQGAN", "model_variant": "EMAVQ",
           "model_args": {"embed_dim": 8, "n_embed": 32,
                          "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 64, "in_channels": 3,
                                       "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                       "attn_resolutions": [], "dropout": 0.0}},
           "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                          "params": {"disc_start": 0, "perceptual_weight": 0.0}},
           "train": {"use_gan": False, "learning_rate": 1e-4, "batch_size": 4, "log_every": 1000},
           "data": {"image_size": 64}}
    path = os.path.join(folder, "bench.json")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


def link_folder(folder: str, targets, count: int) -> str:
    """``count`` hard links to ``targets`` in turn (ext4 allows 65000 links per file)."""
    os.makedirs(folder)
    for i in range(count):
        os.link(targets[i % len(targets)], os.path.join(folder, f"f{i:06d}.jpg"))
    return folder


def first_step_seconds(config: str, folder: str) -> float:
    """fit's path to the end of its first optimizer step (nothing written)."""
    from train.data import resolve_data
    from train.run_config import load_run_config
    from train.trainer import Trainer

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):   # run header
        cfg = load_run_config(config, ["train.max_steps=1"]).cfg
        cfg.data.path = folder
        trainer = Trainer(cfg, resolve_data(cfg, scan=False), None, use_bar=False)
        trainer.fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300, help="JPEGs for the throughput comparison")
    parser.add_argument("--size", type=int, default=256, help="crop size of the throughput comparison")
    parser.add_argument("--workers", type=int, default=0, help="loader workers W (0: the usable CPUs)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each measurement (medians reported)")
    parser.add_argument("--big", type=int, default=100_000, help="entries of the large folder in (b)")
    args = parser.parse_args()

    import torch

    from train.data import resolve_data, usable_cpus

    torch.set_num_threads(1)
    workers = args.workers or usable_cpus()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.perf_counter()
        os.makedirs(os.path.join(tmp, "jpegs"))
        paths = make_jpegs(os.path.join(tmp, "jpegs"), args.images)
        made = time.perf_counter() - t0
        sizes = [Image.open(p).size for p in paths]
        drafted = sum(min(s) >= 2 * args.size for s in sizes)
        print(f"(a) loader throughput: {len(paths)} JPEGs 500x375..1000x750 (made in {made:.0f} s; {drafted} are "
              f">= 2x the {args.size} px crop and get draft decoding), {args.size} px crops, "
              f"{usable_cpus()} usable CPU(s), W = {workers}; load average {os.getloadavg()[0]:.1f}")
        single_process_rate(paths, args.size)                    # page cache and code warm
        single, many, zero = [], [], []
        for _ in range(args.rounds):
            single.append(single_process_rate(paths, args.size))
            many.append(loader_rate(paths, args.size, workers))
            zero.append(loader_rate(paths, args.size, 0))
        s, m, z = (statistics.median(x) for x in (single, many, zero))
        for label, value, rounds in (("single process, plain PIL (full decode)", s, single),
                                     (f"make_loader, {workers} workers", m, many),
                                     ("make_loader, 0 workers (in process)", z, zero)):
            print(f"  {label:<42}{value:7.1f} img/s   rounds {[round(x, 1) for x in rounds]}")
        print(f"  loader {workers} workers / ({workers} x single) = {m / (workers * s):.2f}  (target >= 0.90); "
              f"loader 0 / single = {z / s:.2f}")

        config = tiny_config(tmp)
        targets = paths[:16]
        t0 = time.perf_counter()
        small = link_folder(os.path.join(tmp, "small"), targets, 1000)
        big = link_folder(os.path.join(tmp, "big"), targets, args.big)
        linked = time.perf_counter() - t0
        print(f"\n(b) time to the first optimizer step (resolve_data as fit calls it + Trainer of a tiny "
              f"TamingVQGAN, 64 px, num_workers auto + 1 step); folders of hard links to 16 JPEGs "
              f"(made in {linked:.0f} s)")
        first_step_seconds(config, small)                        # imports and caches warm
        t_small, t_big = [], []
        for _ in range(args.rounds):
            t_small.append(first_step_seconds(config, small))
            t_big.append(first_step_seconds(config, big))
        a, b = statistics.median(t_small), statistics.median(t_big)
        for label, value, rounds in (("1000 files", a, t_small), (f"{args.big} files", b, t_big)):
            print(f"  {label:<16}{value:6.2f} s   rounds {[round(x, 2) for x in rounds]}")
        print(f"  {args.big} / 1000 = {b / a:.2f}  (target <= 1.30)")
        from train.run_config import load_run_config

        cfg = load_run_config(config).cfg
        cfg.data.path = big
        t0 = time.perf_counter()
        resolve_data(cfg, scan=True)
        print(f"  for contrast, the header scan fit ran before (every header of the {args.big} files opened): "
              f"{time.perf_counter() - t0:.2f} s on its own")


if __name__ == "__main__":
    main()
