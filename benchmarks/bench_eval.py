"""Benchmark: rFID in one pass (``python -m train eval``) vs the two-step workflow (write the
crops and reconstructions as PNG, then torch-fidelity on the two folders).  Not a test.

    .venv/bin/python benchmarks/bench_eval.py                      # a few minutes on 2 busy cores
    .venv/bin/python benchmarks/bench_eval.py --images 64 --size 256 --repeats 3
    .venv/bin/python benchmarks/bench_eval.py --images 256 --size 256 --device cuda --out benchmarks/results/bench_eval_cuda.txt

Both pipelines start from the same image folder and the same model folder (a tiny vqvae2
saved as ``config.yaml`` + ``model.safetensors``) and use the same Inception weights file
(torch-fidelity's layout, random weights: the standard file cannot be downloaded here; the
cost does not depend on the values):

* one pass: :func:`train.evaluate.evaluate` (crops, reconstructions, Inception features of
  both sides streamed into float64 sums, the distance; PSNR/SSIM/usage on the way);
* two steps: the same crops (``train.data.crop_image``) through the same model, both sides
  written as PNG files, then ``torch_fidelity.calculate_metrics(input1, input2, fid=True)``
  with its defaults (no cache, on the CPU).

They alternate, ``--repeats`` times each; the figures are medians of wall-clock seconds, and
the two rFIDs must agree within 1e-3.  Issue 13's target: one pass <= 0.6x the two steps.
Results go to ``benchmarks/results/bench_eval.txt``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_inputs(folder: str, n: int, size: int):
    """``n`` photo-like images a bit larger than ``size``, a tiny vqvae2 folder, Inception weights."""
    import numpy as np
    import torch
    import yaml
    from PIL import Image

    from adapters import build_model, registry
    from train.atomic import save_safetensors
    from train.config import load_config, save_config
    from train.fid import random_inception_state

    photos = os.path.join(folder, "photos")
    os.makedirs(photos)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = int(size * 1.25) + i % 7, int(size * 1.5)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (5 + i % 9)), np.cos(yy / (7 + i % 5)), np.sin((xx + yy) / 11.0)], axis=-1)
        image = (127.5 + 90 * base + rng.normal(0, 15, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(photos, f"{i:05d}.png"))
    data = registry.get_model_type("vqvae2").tiny_config()
    data["data"] = {"image_size": size}
    with open(os.path.join(folder, "tiny.yaml"), "w") as fh:
        yaml.safe_dump(data, fh)
    cfg = load_config(os.path.join(folder, "tiny.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg)
    model_dir = os.path.join(folder, "model")
    os.makedirs(model_dir)
    save_config(cfg, os.path.join(model_dir, "config.yaml"))
    save_safetensors(model.state_dict(), os.path.join(model_dir, "model.safetensors"))
    inception = os.path.join(folder, "inception.pth")
    torch.save(random_inception_state(), inception)
    return photos, model_dir, inception


def one_pass(photos: str, model_dir: str, inception: str, batch: int, ref_stats=None, save_ref_stats=None,
             device: str = "cpu") -> float:
    from train.evaluate import evaluate

    with contextlib.redirect_stderr(io.StringIO()):    # the "not the standard file" warning
        report = evaluate(model_dir, data=photos, inception=inception, lpips=False, batch_size=batch,
                          ref_stats=ref_stats, save_ref_stats=save_ref_stats, device=device)
    return report["rfid"]


def two_steps(photos: str, model_dir: str, inception: str, batch: int, out: str, cache_root=None,
              device: str = "cpu") -> float:
    """What users do without the one-pass evaluation: reconstructions to disk, then
    torch-fidelity.  With ``cache_root`` the real side comes from torch-fidelity's own
    statistics cache (input1_cache_name "real"), so only reconstructions are written."""
    import numpy as np
    import torch
    import torch_fidelity
    from PIL import Image
    from safetensors.torch import load_file

    from adapters import build_model
    from train.config import load_config
    from train.data import crop_image, list_folder, load_rgb

    cfg = load_config(os.path.join(model_dir, "config.yaml"))
    model = build_model(cfg)
    model.load_state_dict(load_file(os.path.join(model_dir, "model.safetensors")))
    model.eval().to(device)
    size = int(cfg.data.image_size)
    real_dir, rec_dir = os.path.join(out, "real"), os.path.join(out, "rec")
    os.makedirs(real_dir)
    os.makedirs(rec_dir)
    paths = list_folder(photos)
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            crops = np.stack([crop_image(load_rgb(p), size, np.random.default_rng(0), False, (1.0, 1.0))
                              for p in paths[start:start + batch]])
            x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
            rec = ((model(x)[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for k in range(len(crops)):
                if cache_root is None or not os.path.isdir(cache_root):
                    Image.fromarray(crops[k]).save(os.path.join(real_dir, f"{start + k:05d}.png"))
                Image.fromarray(rec[k]).save(os.path.join(rec_dir, f"{start + k:05d}.png"))
    cache = {} if cache_root is None else {"cache": True, "cache_root": cache_root, "input1_cache_name": "real"}
    metrics = torch_fidelity.calculate_metrics(input1=real_dir, input2=rec_dir, fid=True, cuda=device == "cuda",
                                               verbose=False, feature_extractor_weights_path=inception,
                                               **({"cache": False} if cache_root is None else cache))
    return metrics["frechet_inception_distance"]


THEIRS = "inception alone, torch-fidelity's"


def inception_alone(inception: str, n: int, size: int, batch: int = 64, device: str = "cpu"):
    """Seconds for the 2N Inception forwards alone: ``(ours, torch-fidelity's)``, i.e. the
    extractor as ``eval`` loads it (batch norm folded, channels-last) and as torch-fidelity
    builds it from the same file, on the same uint8 images, batches of 64 as both use."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from train.fid import load_inception

    with contextlib.redirect_stderr(io.StringIO()):
        ours, _ = load_inception(inception, torch.device(device))
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=inception).to(device)
    images = torch.randint(0, 256, (2 * n, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    seconds = []
    for net in (ours, theirs):
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, images.shape[0], batch):
                net(images[start:start + batch])
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return tuple(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=128, help="eval crop size in px")
    ap.add_argument("--batch", type=int, default=8, help="images per model forward (both pipelines)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_eval.txt"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    names = ("one pass", "two steps", "one pass, --ref-stats", "two steps, input1 cached")
    times = {name: [] for name in names}
    values = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        photos, model_dir, inception = make_inputs(tmp, args.images, args.size)
        # The saved real sides the cached variants reuse (made once, not timed).
        ref = os.path.join(tmp, "ref.npz")
        one_pass(photos, model_dir, inception, args.batch, save_ref_stats=ref, device=args.device)
        cache_root = os.path.join(tmp, "fidelity_cache")
        two_steps(photos, model_dir, inception, args.batch, os.path.join(tmp, "fill"), cache_root=cache_root,
                  device=args.device)
        runs = {
            "one pass": lambda r: one_pass(photos, model_dir, inception, args.batch, device=args.device),
            "two steps": lambda r: two_steps(photos, model_dir, inception, args.batch, os.path.join(tmp, f"a{r}"),
                                             device=args.device),
            "one pass, --ref-stats": lambda r: one_pass(photos, model_dir, inception, args.batch, ref_stats=ref,
                                                        device=args.device),
            "two steps, input1 cached": lambda r: two_steps(photos, model_dir, inception, args.batch,
                                                            os.path.join(tmp, f"b{r}"), cache_root=cache_root,
                                                            device=args.device),
        }
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                started = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):   # DataLoader worker-count warnings
                    value = runs[name](r)
                times[name].append(time.perf_counter() - started)
                values[name].append(value)
                print(f"  repeat {r}: {name:<25} {times[name][-1]:7.2f} s  rFID {value:.4f}", flush=True)
            alone = inception_alone(inception, args.images, args.size, device=args.device)
            for name, t in zip(("inception alone, ours", THEIRS), alone):
                times.setdefault(name, []).append(t)
            print(f"  repeat {r}: 2N Inception forwards alone: ours {alone[0]:.2f} s, torch-fidelity's "
                  f"{alone[1]:.2f} s", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    gap = max(abs(a - b) for name in names for a, b in zip(values[name], values["two steps"]))
    lines = [
        f"rFID of a tiny vqvae2 over {args.images} images at {args.size} px, batch {args.batch}, "
        + (f"CPU ({args.threads} threads" if args.device == "cpu" else f"{torch.cuda.get_device_name()} ("
           f"{args.threads} CPU threads") + f", torch {torch.__version__}), median of {args.repeats}",
        f"  one pass (python -m train eval)                          {med['one pass']:8.2f} s",
        f"  two steps (PNG folders + torch_fidelity.calculate_metrics) {med['two steps']:8.2f} s",
        f"  one pass, --ref-stats (real side saved once)             {med['one pass, --ref-stats']:8.2f} s",
        f"  two steps, torch-fidelity's input1 statistics cache      {med['two steps, input1 cached']:8.2f} s",
        f"  one pass / two steps: {med['one pass'] / med['two steps']:.2f}x (target <= 0.6x); with saved real "
        f"sides: {med['one pass, --ref-stats'] / med['two steps, input1 cached']:.2f}x; "
        f"max |rFID difference| {gap:.1e}",
        f"  the 2N Inception forwards alone: ours {med['inception alone, ours']:.2f} s (batch norm folded, "
        f"channels-last), torch-fidelity's {med[THEIRS]:.2f} s: "
        f"{med['inception alone, ours'] / med['one pass']:.0%} of the one pass, "
        f"{med[THEIRS] / med['two steps']:.0%} of the two steps",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
