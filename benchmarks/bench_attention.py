"""Benchmark: taming's attention on SDPA (the default) vs upstream's ``AttnBlock`` (CPU, not a test).

    .venv/bin/python benchmarks/bench_attention.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_attention.py --latent 32 --batch 4

One training step (forward, L1 + codebook loss, backward) of a TamingVQGAN whose mid-block
attention covers ``latent x latent`` positions (default 64 x 64 = 4096, issue 12's size):
128 px input, ``ch_mult [1, 2]`` (one down-sampling), ``attn_resolutions []`` (mid blocks
only, encoder and decoder), ch 32.  Each kernel (``model_args.attn_impl: sdpa`` /
``vanilla``) runs in a fresh subprocess so that its peak resident memory is its own: the
figure is the peak (VmHWM) during the first step minus the resident size just before it.
Both build the same weights from the same seed; the losses must agree.  Times are the
median of ``--repeats`` further steps in the same subprocess.  Prints both kernels and the
sdpa / vanilla ratios; issue 12's target is peak memory <= 0.5 x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current resident size.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(impl: str, latent: int, batch: int, repeats: int) -> dict:
    import torch

    from adapters import build_model
    from train.schema import make_config

    torch.manual_seed(0)
    ddconfig = dict(double_z=False, z_channels=8, resolution=2 * latent, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model = build_model(make_config(model_type="TamingVQGAN", model_variant="VQ",
                                    model_args=dict(ddconfig=ddconfig, n_embed=64, embed_dim=8,
                                                    attn_impl=impl)))
    x = torch.rand(batch, 3, 2 * latent, 2 * latent, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def step() -> float:
        model.zero_grad(set_to_none=True)
        rec, qloss = model(x)
        loss = (rec - x).abs().mean() + qloss.mean()
        loss.backward()
        return float(loss)

    _reset_peak()
    before = _status_kib("VmRSS")
    loss = step()
    peak = _status_kib("VmHWM") - before
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "loss": loss, "peak_mib": peak / 1024, "step_s": statistics.median(times),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=64, help="mid-block latent side (positions = latent^2)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=("sdpa", "vanilla"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.latent, args.batch, args.repeats)))
        return

    results = {}
    for impl in ("vanilla", "sdpa"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", impl,
                              "--latent", str(args.latent), "--batch", str(args.batch),
                              "--repeats", str(args.repeats)], check=True, capture_output=True, text=True)
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    v, s = results["vanilla"], results["sdpa"]
    print(f"one training step, mid-block attention over {args.latent}x{args.latent} = {args.latent ** 2} "
          f"positions, batch {args.batch}, CPU ({v['threads']} threads)")
    for r in (v, s):
        print(f"  {r['impl']:8s} peak +{r['peak_mib']:8.1f} MiB   step {r['step_s']:7.3f} s   loss {r['loss']:.7f}")
    print(f"  sdpa / vanilla: peak memory {s['peak_mib'] / v['peak_mib']:.2f}x, "
          f"step time {s['step_s'] / v['step_s']:.2f}x, "
          f"|loss difference| {abs(s['loss'] - v['loss']):.1e}")


if __name__ == "__main__":
    main()
