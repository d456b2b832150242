"""Benchmark: training speed and memory through the real trainer (not a test).

    .venv/bin/python benchmarks/bench_train.py throughput --device cuda        # on a GPU node
    .venv/bin/python benchmarks/bench_train.py throughput --device cpu --tiny  # what the tests run
    .venv/bin/python benchmarks/bench_train.py overhead                        # CPU, a few minutes

``throughput``: images/s and peak memory of one training step (generator + discriminator,
GAN on from step 0) of the official f16 VQGAN (taming's ``custom_vqgan.yaml`` /
``vqgan_imagenet_f16_1024``: ch 128, ch_mult [1, 1, 2, 2, 4], attention at 16 px, z 256,
``--n-embed`` 1024 or 16384 codes) at 256 px, in three set-ups: fp32, bf16, and bf16 +
``train.compile`` + ``train.channels_last``.  Each set-up runs in its own subprocess
(its peak memory is its own): ``--warmup`` steps (compilation happens there), then the
mean of ``--steps`` timed steps; on a GPU also the synchronising calls during them, as
``torch.cuda.set_sync_debug_mode`` counts them (the trainer aims at one per step).  Peak memory: ``torch.cuda.max_memory_allocated`` on a
GPU, the growth of the resident size (VmHWM) over the steps on CPU.  ``--tiny`` runs a
32 px model of the same shape family (what ``tests/test_gpu_options.py`` runs).  Perceptual
loss is off: no VGG16 file is needed.

``overhead``: ``fit``'s steps/s against a bare loop over the same model, loss, optimizers
and in-memory batches (forward, backward, clip, optimizer steps, nothing else), alternated
in blocks in one process, median of the per-block ratios, by wall-clock time and by the
process's CPU time (steadier on a shared machine); issue 12's target is >= 0.97.
Also the step guard's rollback copy, per step: a fresh clone of every buffer (what it did
before) against a copy into buffers it allocated once (what it does now).

Both feed the trainer batches drawn once from the real loader and replayed from memory, so
neither measures image decoding.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_attention import _reset_peak, _status_kib  # noqa: E402  (the resident-memory readings)

TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
SETUPS = {"fp32": [], "bf16": ["train.precision=bf16"],
          "bf16+compile+channels_last": ["train.precision=bf16", "train.compile=true", "train.channels_last=true"]}


def f16_vqgan(n_embed: int, tiny: bool) -> dict:
    """The f16 VQGAN as a native config dict (``--tiny``: 32 px, ch 32, same layout rules)."""
    if tiny:
        dd = dict(double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32,
                  ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
        embed_dim, n_embed, ndf, layers = 16, 64, 16, 2
    else:
        dd = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                  ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
        embed_dim, ndf, layers = 256, 64, 3
    return {"name": "f16_vqgan", "model_type": "TamingVQGAN", "model_variant": "VQ",
            "model_args": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd},
            "lossconfig": {"target": TAMING_LOSS,
                           "params": {"disc_start": 0, "disc_weight": 0.8, "codebook_weight": 1.0,
                                      "perceptual_weight": 0.0, "disc_ndf": ndf, "disc_num_layers": layers}},
            "train": {"use_gan": True, "learning_rate": 4.5e-6, "batch_size": 8, "log_every": 50,
                      "image_every": 10 ** 9, "ckpt_every": 10 ** 9},
            "data": {"path": "builtin", "image_size": dd["resolution"]}}


def build_trainer(config: dict, overrides, device: str, n_batches: int):
    """A real Trainer writing nothing, whose loader replays ``n_batches`` loader batches from memory."""
    import torch

    import train.trainer as trainer_module
    from train.config import load_config
    from train.data import make_loader, resolve_data

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_train_{os.getpid()}.json")
    with open(path, "w") as fh:
        json.dump(config, fh)
    cfg = load_config(path, list(overrides))
    os.unlink(path)
    data = resolve_data(cfg)
    t = cfg.train
    loader = make_loader(data, t.seed, t.batch_size, t.accumulate_grad_batches, 1, 0, start_step=0,
                         end_step=n_batches)
    batches = list(itertools.islice(iter(loader), n_batches))
    trainer_module.make_loader = lambda *args, **kwargs: itertools.cycle(batches)
    trainer = trainer_module.Trainer(cfg, data, None, device=torch.device(device), use_bar=False)
    return trainer, batches


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------
# throughput: one set-up per subprocess

def throughput_worker(setup: str, device: str, tiny: str, n_embed: str, batch: str, warmup: str,
                      steps: str, backend: str) -> dict:
    """One set-up's figures (arguments as on the worker's command line)."""
    import torch

    tiny, n_embed, batch, warmup, steps = tiny == "1", int(n_embed), int(batch), int(warmup), int(steps)

    import train.trainer as trainer_module

    trainer_module.COMPILE_BACKEND = backend
    config = f16_vqgan(n_embed, tiny)
    config["train"]["batch_size"] = batch
    trainer, _ = build_trainer(config, SETUPS[setup], device, 4)
    marks = {}

    def clock(batch_, step):
        if step in (warmup, warmup + steps) and step not in marks:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)   # the clock's own wait is not the trainer's
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(1)
            marks[step] = time.perf_counter()
        return batch_

    trainer.batch_augmenter = clock
    trainer.max_steps = warmup
    trainer.fit()                                   # compiles (when asked), allocates
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()                               # VmHWM back to the resident size now
        base = _status_kib("VmRSS") * 1024
    trainer.max_steps = warmup + steps + 1
    with warnings.catch_warnings(record=True) as caught:
        # GPU: every synchronising call of the steps warns once (torch.cuda.set_sync_debug_mode).
        warnings.simplefilter("always")
        trainer.fit()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024)
    step_s = (marks[warmup + steps] - marks[warmup]) / steps
    return {"setup": setup, "device": device, "images_per_s": batch / step_s, "step_s": step_s,
            "peak_gib": peak / 2 ** 30, "growth_gib": (peak - base) / 2 ** 30,
            "bad_steps": trainer.guard.total, "syncs": syncs, "synced_steps": steps + 1,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"}


def throughput(args) -> None:
    rows = []
    for setup in args.setups.split(","):
        worker_args = [setup, args.device, str(int(args.tiny)), str(args.n_embed), str(args.batch),
                       str(args.warmup), str(args.steps), args.compile_backend]
        if args.in_process:
            rows.append(throughput_worker(*worker_args))
            continue
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "_worker", *worker_args],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{setup} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    size = "tiny 32 px model" if args.tiny else f"f16 VQGAN 256 px, {args.n_embed} codes"
    lines = [f"training step (generator + discriminator), {size}, batch {args.batch}, {rows[0]['gpu']}"
             + (f", compile backend {args.compile_backend}" if args.compile_backend != "inductor" else "")]
    for r in rows:
        memory = (f"peak {r['peak_gib']:6.2f} GiB allocated   {r['syncs']} host syncs in "
                  f"{r['synced_steps']} steps (set_sync_debug_mode)" if r["device"] == "cuda"
                  else f"resident growth {r['growth_gib'] * 1024:7.1f} MiB")
        lines.append(f"  {r['setup']:<28} {r['images_per_s']:9.2f} images/s   {memory}")
    for r in rows[1:]:
        lines.append(f"  {r['setup']} / fp32: {r['images_per_s'] / rows[0]['images_per_s']:.2f}x images/s")
    report(lines, args.out)


# ----------------------------------------------------------------------------------------
# overhead: fit vs a bare loop, alternated in one process

def bare_steps(trainer, batches, start: int, n: int, marks: dict) -> None:
    """The same work as ``fit``'s steps, nothing else: forward, backward, clip, step."""
    import torch

    from train.sides import autocast

    t = trainer.cfg.train
    stream = itertools.cycle(batches)
    for step in range(start, start + n):
        marks[step] = (time.perf_counter(), time.process_time())
        update_disc = trainer.disc is not None and trainer.calc.should_update_discriminator(step)
        sides = [trainer.gen, trainer.disc] if update_disc else [trainer.gen]
        for side in trainer.sides:
            side.optimizer.zero_grad(set_to_none=True)
        for _ in range(t.accumulate_grad_batches):
            batch = trainer._prepare(next(stream), step)
            with autocast(trainer.precision, trainer.device):
                out = trainer.calc.generator_step(trainer.model, batch, step)
            (out.loss / t.accumulate_grad_batches).backward()
            if update_disc:
                with autocast(trainer.precision, trainer.device):
                    d_loss, _ = trainer.calc.discriminator_step(out, step)
                (d_loss / t.accumulate_grad_batches).backward()
        for side in sides:
            if side.clip is not None:
                torch.nn.utils.clip_grad_norm_(side.params, side.clip)
            side.optimizer.step()
    marks[start + n] = (time.perf_counter(), time.process_time())


def overhead(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    config = f16_vqgan(64, tiny=True)
    config["model_args"]["ddconfig"].update(resolution=args.size, ch=args.ch)
    config["data"]["image_size"] = args.size
    config["train"].update(batch_size=args.batch, log_every=args.log_every, grad_clip=1.0)
    fit_trainer, batches = build_trainer(config, [], "cpu", 8)
    bare_trainer, _ = build_trainer(config, [], "cpu", 8)
    fit_marks, bare_marks = {}, {}

    def clock(batch, step):
        fit_marks.setdefault(step, (time.perf_counter(), time.process_time()))
        return batch

    fit_trainer.batch_augmenter = clock
    ratios = {"wall": [], "cpu": []}
    extra_ms = []
    rates = {"fit": [], "bare": []}
    fit_trainer.max_steps = args.warmup
    fit_trainer.fit()
    bare_steps(bare_trainer, batches, 0, args.warmup, bare_marks)
    for block in range(args.blocks):
        # One extra fit step: its start marks the end of the block's last timed step.
        start = fit_trainer.step
        fit_trainer.max_steps = start + args.block_steps + 1
        fit_trainer.fit()
        bare_steps(bare_trainer, batches, start, args.block_steps, bare_marks)
        end = start + args.block_steps
        for i, clock in enumerate(ratios):
            fit_s = fit_marks[end][i] - fit_marks[start][i]
            bare_s = bare_marks[end][i] - bare_marks[start][i]
            ratios[clock].append(bare_s / fit_s)
            if clock == "cpu":
                extra_ms.append((fit_s - bare_s) / args.block_steps * 1e3)
            if clock == "wall":
                rates["fit"].append(args.block_steps / fit_s)
                rates["bare"].append(args.block_steps / bare_s)
    n_params = sum(p.numel() for p in fit_trainer.model.parameters()) / 1e6
    lines = [f"trainer overhead: fit vs a bare loop, {args.size} px TamingVQGAN ({n_params:.2f}M parameters, ch "
             f"{args.ch}), GAN on, batch {args.batch}, grad_clip 1.0, log_every {args.log_every}, CPU "
             f"({torch.get_num_threads()} threads), {args.blocks} alternating blocks of {args.block_steps} steps",
             f"  bare loop  {statistics.median(rates['bare']):7.2f} steps/s (median of blocks, wall clock)",
             f"  fit        {statistics.median(rates['fit']):7.2f} steps/s (median of blocks, wall clock)"]
    for clock, label in (("wall", "wall-clock time"), ("cpu", "process CPU time")):
        r = ratios[clock]
        lines.append(f"  fit / bare by {label}: {statistics.median(r):.3f}x steps/s (median of per-block ratios; "
                     f"min {min(r):.3f}, max {max(r):.3f})")
    lines.append(f"  fit's own CPU time per step: {statistics.median(extra_ms):+.1f} ms (median of blocks)")
    lines += rollback_lines(args)
    report(lines, args.out)


def rollback_lines(args) -> list:
    """The guard's per-step buffer copy: clone (before) vs copy into buffers allocated once (now)."""
    from adapters import build_model
    from train.schema import make_config
    from train.step_guard import StepGuard

    config = f16_vqgan(args.rollback_codes, tiny=False)
    config["model_variant"] = "EMAVQ"
    model = build_model(make_config(model_type="TamingVQGAN", model_variant="EMAVQ",
                                    model_args=config["model_args"]))
    buffers = list(model.buffers())
    guard = StepGuard(buffers, 5, scaled=False)
    guard.snapshot()

    def clone():
        return [b.detach().clone() for b in buffers]

    def timed(fn):
        times = []
        for _ in range(args.rollback_repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    clone_s, copy_s = timed(clone), timed(guard.snapshot)
    mib = sum(b.numel() * b.element_size() for b in buffers) / 2 ** 20
    return [f"step guard rollback copy, f16 EMAVQ with {args.rollback_codes} codes ({len(buffers)} buffers, "
            f"{mib:.1f} MiB), median of {args.rollback_repeats}",
            f"  clone every step (before)          {clone_s * 1e3:8.3f} ms",
            f"  copy into buffers allocated once   {copy_s * 1e3:8.3f} ms   ({copy_s / clone_s:.2f}x)"]


def report(lines, out) -> None:
    text = "\n".join(lines)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write(text + "\n")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        print(json.dumps(throughput_worker(*argv[1:9])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("throughput", help="images/s and peak memory of the f16 VQGAN, three set-ups")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 32 px model (CPU tests)")
    p.add_argument("--n-embed", type=int, default=1024, help="codebook size (1024 or 16384 as published)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (their mean)")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for train.compile (tests: eager; inductor's CPU build takes minutes)")
    p.add_argument("--in-process", action="store_true",
                   help="run the set-ups one after another in this process (tests: no torch start-up per "
                        "set-up; memory figures are then less separate)")
    p.add_argument("--out", help="also write the report to this file (e.g. benchmarks/results/...)")
    p = sub.add_parser("overhead", help="fit vs a bare loop, steps/s (CPU)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--ch", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--block-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: no OpenMP spinning in the CPU-time figures)")
    p.add_argument("--rollback-codes", type=int, default=16384)
    p.add_argument("--rollback-repeats", type=int, default=50)
    p.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    throughput(args) if args.what == "throughput" else overhead(args)


if __name__ == "__main__":
    main()
