"""``python -m train demo`` (``make demo``): a few minutes of real training on a laptop CPU.

    python -m train demo                       # ~3 minutes, writes logs/<timestamp>_demo_emavq/
    python -m train demo --minutes 1 --out /tmp/demo

Trains a small taming ``TamingVQGAN`` EMAVQ (``configs/demo_emavq.json``) on random crops
of scikit-image's bundled photographs (``--data builtin``), with the same trainer as
``python -m train fit``.  Before and after, it reconstructs crops of two photographs the
training never sees (chelsea, coffee) and prints their PSNR and codebook usage, then where
the run folder and the held-out reconstruction grid are.

The demo needs no downloaded weights: its loss is taming's L1 + codebook loss
(``perceptual_weight: 0``, so no VGG16 file) without the GAN (``use_gan: false``).

The demo config turns on ``train.init_codebook_from_data`` (said when it runs): the EMA
codebook starts from encoder outputs of training crops, each code counted once, instead of
upstream's N(0, 1) codes with zero counts, which collapse to a handful of codes within a
few steps on this data (``adapters/ema_quantizer.py`` explains why).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Dict, List

import torch

from train.errors import UserError
from train.evaluate import psnr  # the metric python -m train eval reports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_emavq.json")
EVAL_CROPS = 16


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"demo: {message} (see python -m train demo --help)")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return parse


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, batch: int = 8):
    """Reconstructions and code indices in eval mode (the EMA codebook does not move)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    recs, codes = [], []
    for i in range(0, images.shape[0], batch):
        xrec, _, idx = model(images[i:i + batch].to(device), return_codes=True)
        recs.append(xrec.float().cpu())
        codes.append(idx[0].reshape(-1).cpu())   # the first codebook
    model.train(was_training)
    return torch.cat(recs), torch.cat(codes)


def summarize(model, images: torch.Tensor) -> Dict[str, float]:
    from train.usage import codebook_stats

    xrec, codes = reconstruct(model, images)
    n_codes = model.codebook_sizes[0]
    stats = codebook_stats(torch.bincount(codes, minlength=n_codes).float())
    return {"psnr": float(psnr(images, xrec).mean()), "codes_used": int((torch.bincount(codes) > 0).sum()),
            "n_codes": n_codes, "perplexity": stats["perplexity"], "reconstructions": xrec}


def save_comparison(path: str, rows: List[torch.Tensor]) -> str:
    """A PNG with one row per tensor (inputs, before, after), images in [-1, 1]."""
    from torchvision.utils import make_grid, save_image

    n = rows[0].shape[0]
    grid = make_grid(((torch.cat(rows).clamp(-1, 1) + 1) / 2), nrow=n, padding=2, pad_value=1.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image(grid, path)
    return path


def cli_main(argv: List[str]) -> int:
    p = _Parser(prog="python -m train demo", description="Train a small EMAVQ on built-in photos for a few minutes.")
    p.add_argument("--out", help="run folder (default logs/<timestamp>_demo_emavq/)")
    p.add_argument("--minutes", type=_positive(float), default=3.0, help="training time budget (default 3)")
    p.add_argument("--max-steps", type=_positive(int), help="stop at this step even within the time budget")
    p.add_argument("--config", default=DEMO_CONFIG, help="demo config (default configs/demo_emavq.json)")
    args = p.parse_args(argv)

    from train.cli import check_out_path
    from train.data import fixed_crops, resolve_data
    from train.fit import default_run_dir
    from train.run_config import load_run_config
    from train.trainer import Trainer

    if args.out is not None:
        check_out_path(args.out, "folder", "demo")     # before the model is built, not minutes later
    overrides = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    cfg = load_run_config(args.config, overrides).cfg
    cfg.data.path = "builtin"
    data = resolve_data(cfg)
    heldout = resolve_data(cfg, split="validation")
    eval_images = fixed_crops(heldout, EVAL_CROPS, seed=0)
    run_dir = args.out or default_run_dir(cfg.name)
    check_out_path(run_dir, "folder", "demo")
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.ckpt")):
        raise UserError(f"--out {run_dir} already holds a run; choose another folder")

    trainer = Trainer(cfg, data, run_dir, time_limit_s=args.minutes * 60)
    print(f"demo: {cfg.model_type} {cfg.model_variant or ''} on built-in photographs "
          f"({len(data.paths)} for training; held out: {', '.join(os.path.basename(x) for x in heldout.paths)})")
    print("demo: loss = L1 + codebook loss; perceptual_weight 0 (no VGG16 file needed), use_gan false")
    if trainer.codebook_init:
        print(f"demo: EMA codebook initialised from {trainer.codebook_init['codes'][0]} of "
              f"{trainer.codebook_init['vectors'][0]} encoder outputs of training crops "
              "(train.init_codebook_from_data; upstream's N(0,1) start collapses)")
    before = summarize(trainer.model, eval_images)
    print(f"demo: training for up to {args.minutes:g} min (or {trainer.max_steps} steps)")
    result = trainer.fit()
    after = summarize(trainer.model, eval_images)
    grid = save_comparison(os.path.join(run_dir, "images", "heldout_before_after.png"),
                           [eval_images[:8], before["reconstructions"][:8], after["reconstructions"][:8]])

    print("")
    print(f"demo results after {result.steps} steps ({result.seconds / 60:.1f} min, "
          f"{result.steps * trainer.images_per_step} training crops):")
    print(f"  held-out PSNR   {before['psnr']:6.2f} dB before -> {after['psnr']:6.2f} dB after "
          f"({EVAL_CROPS} crops of {', '.join(os.path.basename(x) for x in heldout.paths)})")
    print(f"  codebook usage  {before['codes_used']} -> {after['codes_used']} of {after['n_codes']} codes on those "
          f"crops (perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f})")
    print(f"  run folder      {run_dir}")
    print(f"  held-out grid   {grid}  (rows: input, before, after)")
    if result.last_grid:
        print(f"  training grid   {result.last_grid}  (rows: input, reconstruction)")
    print(f"  TensorBoard     tensorboard --logdir {os.path.join(run_dir, 'tb')}")
    if not math.isfinite(after["psnr"]) or after["psnr"] <= before["psnr"]:
        print("demo: warning: held-out PSNR did not improve")
        return 1
    return 0


__all__ = ["cli_main", "psnr", "summarize"]
