"""Benchmark: the training opt-ins against upstream taming's recipe, side by side (CPU, not a test).

    .venv/bin/python benchmarks/bench_optins.py                    # ~30 min on 2 shared cores
    .venv/bin/python benchmarks/bench_optins.py --steps 300 --batch 8 --seeds 23 24 25

Every row trains ``configs/modern_recipe.yaml``'s model (taming's VQGAN, VectorQuantizer2,
demo size: 64 px crops of the built-in photographs, 256 codes; batch ``--batch``, 4 by
default to fit two shared CPU cores) for the same number of steps and seeds, then evaluates it with ``python -m train eval``'s code on the held-out
built-in photographs (16 seeded 64 px crops; EMA weights where the run kept them):

* ``upstream``: every opt-in off -- taming's lookup, Adam at a constant learning rate,
  hinge GAN with taming's ``-mean(D(x_rec))`` generator loss, random N(0, 1)/n codebook;
* one row per opt-in: that opt-in alone on top of ``upstream``;
* ``recipe``: all of them, as ``configs/modern_recipe.yaml`` sets them.

The GAN is on for the last third of the run (``disc_start``) in every row, so the
adversarial opt-ins act.  Reported per row: held-out PSNR (dB), codebook usage (% of codes the held-out
crops use) and perplexity, each as mean +- standard deviation over the seeds.  No timing
column: on a machine shared with other jobs the seconds per step measure the neighbours.
Results: ``benchmarks/results/bench_optins.txt``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RECIPE = os.path.join(ROOT, "configs", "modern_recipe.yaml")

# Every opt-in off (what an unchanged taming config trains with).
UPSTREAM = ["model_args.codebook_l2_norm=false", "model_args.codebook_embed_dim=null",
            "lossconfig.params.lecam_weight=0", "lossconfig.params.generator_loss=hinge",
            "train.init_codebook_kmeans_iters=0", "train.dead_code_threshold=null", "train.ema_decay=null",
            "train.lr_schedule=constant", "train.warmup_steps=0"]


def rows(steps: int):
    """``(name, overrides)``: each opt-in alone on top of upstream, then the whole recipe."""
    on = {
        "l2 lookup": ["model_args.codebook_l2_norm=true"],
        "low-dim lookup (8)": ["model_args.codebook_embed_dim=8"],
        "k-means start (10 it.)": ["train.init_codebook_kmeans_iters=10"],
        "dead-code restart": ["train.dead_code_threshold=0.1", f"train.dead_code_every={max(steps // 6, 1)}"],
        "weight EMA 0.999": ["train.ema_decay=0.999"],
        "warmup + cosine": ["train.lr_schedule=cosine", f"train.warmup_steps={max(steps // 8, 1)}",
                            "train.min_lr_ratio=0.1"],
        "LeCAM 0.001": ["lossconfig.params.lecam_weight=0.001"],
        "non-saturating G": ["lossconfig.params.generator_loss=non_saturating"],
    }
    recipe = [o for extra in on.values() for o in extra]
    return [("upstream", [])] + list(on.items()) + [("recipe (all)", recipe)]


def train_and_eval(overrides, seed: int, steps: int, batch: int, folder: str):
    from train.data import resolve_data
    from train.evaluate import evaluate
    from train.run_config import load_run_config
    from train.trainer import Trainer

    common = [f"train.max_steps={steps}", f"train.seed={seed}", f"lossconfig.params.disc_start={2 * steps // 3}",
              f"train.batch_size={batch}",
              f"train.ckpt_every={steps}", f"train.image_every={steps * 10}", f"train.log_every={steps}",
              "train.num_workers=0"]
    cfg = load_run_config(RECIPE, UPSTREAM + list(overrides) + common).cfg
    data = resolve_data(cfg, scan=False)
    run_dir = os.path.join(folder, "run")
    trainer = Trainer(cfg, data, run_dir, use_bar=False)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
    report = evaluate(run_dir, data="builtin", num_images=16, lpips=False)
    shutil.rmtree(run_dir)
    book = report["codebooks"][0]
    return {"psnr": report["psnr"], "usage": 100.0 * book["usage"], "perplexity": book["perplexity"],
            "weights": report["weights_used"]}


def mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=4, help="images per step (the recipe's 8 doubles the time)")
    p.add_argument("--seeds", type=int, nargs="+", default=[23, 24, 25])
    p.add_argument("--only", nargs="*", help="row names to run (default: all)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    table = []
    folder = tempfile.mkdtemp(prefix="bench_optins_")
    t0 = time.time()
    try:
        for name, overrides in rows(args.steps):
            if args.only and name not in args.only:
                continue
            runs = [train_and_eval(overrides, seed, args.steps, args.batch, folder) for seed in args.seeds]
            row = {k: mean_sd([r[k] for r in runs]) for k in ("psnr", "usage", "perplexity")}
            row["name"], row["weights"] = name, runs[0]["weights"]
            table.append(row)
            print(f"{name:24s} PSNR {row['psnr'][0]:6.2f} +- {row['psnr'][1]:4.2f} dB | usage "
                  f"{row['usage'][0]:5.1f} +- {row['usage'][1]:4.1f} % | perplexity {row['perplexity'][0]:6.1f} "
                  f"+- {row['perplexity'][1]:5.1f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print()
    print(f"bench_optins: {args.steps} steps (GAN from step {2 * args.steps // 3}) x {len(args.seeds)} seeds "
          f"{args.seeds}, batch {args.batch} x 64 px crops of the "
          "built-in photographs, 256 codes; held-out eval: 16 seeded 64 px crops of the held-out photographs "
          f"(python -m train eval ... --data builtin --num-images 16 --no-lpips); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {time.time() - t0:.0f} s in all")
    print()
    print("| row | held-out PSNR (dB) | codebook usage (%) | perplexity |")
    print("|---|---|---|---|")
    for r in table:
        print(f"| {r['name']}{' (EMA weights)' if r['weights'] == 'ema' else ''} | {r['psnr'][0]:.2f} +- "
              f"{r['psnr'][1]:.2f} | {r['usage'][0]:.1f} +- {r['usage'][1]:.1f} | {r['perplexity'][0]:.1f} +- "
              f"{r['perplexity'][1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
