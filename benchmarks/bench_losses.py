"""Benchmark: what ``use_gan: false`` and the one-pass GAN iteration save (CPU, not a test).

    .venv/bin/python benchmarks/bench_losses.py                 # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_losses.py --perceptual    # LPIPS on, random VGG16 trunk

A small VQGAN (taming's Encoder/Decoder/VectorQuantizer2, 64 px, ch 32) and taming's default
discriminator (ndf 64, 3 layers).  Every comparison runs its variants in one process,
alternating (the order rotates every round), one timed iteration per sample, and reports
median times and their ratio:

(a) generator step with ``use_gan: false``: ``TamingLossCalculator.generator_step`` vs taming's
    ``VQLPIPSWithDiscriminator`` with ``disc_factor = 0`` (the legacy EMAVQ trainers' approach) vs a loss with
    no GAN term at all (L1 [+ LPIPS] + codebook).  Target: <= 1.05x the GAN-free loss.
(b) one full GAN iteration (generator update + discriminator update) after ``disc_start``:
    ``generator_step`` + ``discriminator_step`` (one generator forward) vs taming's
    Lightning-style iteration (optimizer_idx 0, then a second generator forward for
    optimizer_idx 1, with Lightning's toggling of the other optimizer's parameters).
    Target: <= 0.8x.
(c) the TamingVQGAN adapter's forward/backward vs the bare taming modules wired by hand,
    same weights.  Target: <= 1.02x.

By default ``perceptual_weight`` is 0 (no VGG16 file is needed and LPIPS, identical in all
variants, does not dilute the differences); ``--perceptual`` uses LPIPS with a random VGG16
trunk through the explicit ``allow_random_vgg`` option.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

DDCONFIG = dict(double_z=False, z_channels=64, resolution=64, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
N_EMBED, EMBED_DIM = 256, 64
DISC_START = 0  # the GAN is on from the first step in (b); (a) runs with use_gan false


def make_cfg(use_gan: bool, perceptual: bool):
    from train.schema import make_config

    return make_config(name="bench", model_type="TamingVQGAN", model_variant="VQ",
                       model_args={"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": dict(DDCONFIG)},
                       lossconfig={"params": {"disc_start": DISC_START, "disc_weight": 0.8,
                                              "perceptual_weight": 1.0 if perceptual else 0.0}},
                       train={"use_gan": use_gan, "allow_random_vgg": perceptual})


class Bare(nn.Module):
    """The taming modules wired as taming's VQModel does, with no adapter in between."""

    def __init__(self):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        with contextlib.redirect_stdout(io.StringIO()):   # taming prints shapes when built
            self.encoder = Encoder(**DDCONFIG)
            self.decoder = Decoder(**DDCONFIG)
            self.quantize = VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25)
        self.quant_conv = nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1)

    def forward(self, x):
        quant, qloss, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(quant)), qloss


def taming_reference_loss(calc, perceptual: bool):
    """taming's own VQLPIPSWithDiscriminator with the calculator's weights."""
    from taming.modules.losses import vqperceptual
    from losses.perceptual import build_taming_lpips

    saved = vqperceptual.LPIPS
    vqperceptual.LPIPS = lambda: build_taming_lpips(allow_random_vgg=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ref = vqperceptual.VQLPIPSWithDiscriminator(DISC_START, disc_weight=0.8,
                                                        perceptual_weight=1.0 if perceptual else 0.0)
    finally:
        vqperceptual.LPIPS = saved
    ref.load_state_dict(calc.state_dict(), strict=False)
    return ref


class toggled:
    """Lightning's ``toggle_optimizer``: only the current optimizer's parameters need grad."""

    def __init__(self, frozen):
        self.params = list(frozen.parameters())

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def measure(variants, rounds: int, warmup: int = 2):
    """Median seconds per call of each variant, alternating with a rotating order."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title, medians, num, den, target):
    print(f"\n{title}")
    for name, t in medians.items():
        print(f"  {name:<44s} {t * 1e3:8.1f} ms")
    ratio = medians[num] / medians[den]
    verdict = "ok" if ratio <= target else "ABOVE TARGET"
    print(f"  ratio {num} / {den} = {ratio:.3f}x  (target <= {target}x: {verdict})")
    return ratio


def bench_a(args, model, batch):
    """(a) use_gan false: the generator step."""
    from losses.taming_loss import TamingLossCalculator

    x = batch["image"]
    calc_off = TamingLossCalculator.build(make_cfg(False, args.perceptual))
    ref_zero = taming_reference_loss(calc_off, args.perceptual)
    ref_zero.disc_factor = 0.0   # legacy trainers: taming's loss with disc_factor forced to 0
    perceptual_module = calc_off.perceptual_loss if args.perceptual else None

    def ours_off():
        model.zero_grad(set_to_none=True)
        calc_off.generator_step(model, batch, 10).loss.backward()

    def taming_disc_factor_zero():
        model.zero_grad(set_to_none=True)
        xrec, qloss = model(x)
        with toggled(ref_zero.discriminator):
            loss, _ = ref_zero(qloss, x, xrec, 0, 10, last_layer=model.get_last_layer())
        loss.backward()

    def gan_free():
        model.zero_grad(set_to_none=True)
        xrec, qloss = model(x)
        rec = torch.abs(x - xrec)
        if perceptual_module is not None:
            rec = rec + perceptual_module(x, xrec)
        (rec.mean() + qloss.mean()).backward()

    med = measure({"use_gan false: generator_step": ours_off,
                   "taming, disc_factor=0": taming_disc_factor_zero,
                   "no GAN term at all": gan_free}, args.rounds)
    ratio = report("(a) generator step, use_gan false", med, "use_gan false: generator_step",
                   "no GAN term at all", 1.05)
    print(f"  ratio taming disc_factor=0 / no GAN term = "
          f"{med['taming, disc_factor=0'] / med['no GAN term at all']:.3f}x")
    return ratio


def bench_b(args, model, batch):
    """(b) one full GAN iteration."""
    from losses.taming_loss import TamingLossCalculator

    x = batch["image"]
    calc = TamingLossCalculator.build(make_cfg(True, args.perceptual))
    ref = taming_reference_loss(calc, args.perceptual)
    gen_params = model.generator_parameters()
    opt_g = torch.optim.Adam(gen_params, lr=1e-6, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(calc.discriminator.parameters(), lr=1e-6, betas=(0.5, 0.9))
    ref_opt_g = torch.optim.Adam(gen_params, lr=1e-6, betas=(0.5, 0.9))
    ref_opt_d = torch.optim.Adam(ref.discriminator.parameters(), lr=1e-6, betas=(0.5, 0.9))
    step = DISC_START + 1

    def ours_gan():
        opt_g.zero_grad(set_to_none=True)
        out = calc.generator_step(model, batch, step)
        out.loss.backward()
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        d_loss, _ = calc.discriminator_step(out, step)
        d_loss.backward()
        opt_d.step()

    def taming_two_pass():
        ref_opt_g.zero_grad(set_to_none=True)
        with toggled(ref.discriminator):
            xrec, qloss = model(x)
            loss, _ = ref(qloss, x, xrec, 0, step, last_layer=model.get_last_layer())
            loss.backward()
        ref_opt_g.step()
        ref_opt_d.zero_grad(set_to_none=True)
        with toggled(model):
            xrec, qloss = model(x)     # Lightning's training_step runs the generator again
            d_loss, _ = ref(qloss, x, xrec, 1, step, last_layer=model.get_last_layer())
            d_loss.backward()
        ref_opt_d.step()

    med = measure({"generator_step + discriminator_step": ours_gan,
                   "taming two-pass (Lightning)": taming_two_pass}, args.rounds)
    return report("(b) one GAN iteration (G update + D update)", med,
                  "generator_step + discriminator_step", "taming two-pass (Lightning)", 0.8)


def bench_c(args, model, batch):
    """(c) the adapter vs bare taming modules, same weights."""
    x = batch["image"]
    bare = Bare()
    bare.load_state_dict(model.state_dict(), strict=True)

    def fwd_bwd(net):
        def run():
            net.zero_grad(set_to_none=True)
            xrec, qloss = net(x)
            (torch.abs(x - xrec).mean() + qloss).backward()
        return run

    med = measure({"TamingVQGAN adapter": fwd_bwd(model), "bare taming modules": fwd_bwd(bare)},
                  args.rounds * 2)
    return report("(c) model forward + backward", med, "TamingVQGAN adapter", "bare taming modules", 1.02)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="timed samples per variant")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine more threads only add noise)")
    parser.add_argument("--only", default="abc", help="which comparisons to run, e.g. 'b' or 'ac'")
    parser.add_argument("--perceptual", action="store_true",
                        help="perceptual_weight 1 with a RANDOM VGG16 trunk (allow_random_vgg)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.ERROR)   # the use_gan / random-trunk warnings are expected here
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from adapters import build_model

    print(f"bench_losses: CPU, {args.threads} threads, batch {args.batch} x 3 x 64 x 64, "
          f"{args.rounds} alternating rounds, medians; perceptual_weight "
          f"{'1.0 (RANDOM VGG16 trunk)' if args.perceptual else '0 (no LPIPS)'}")

    model = build_model(make_cfg(True, args.perceptual))
    x = torch.rand(args.batch, 3, 64, 64) * 2 - 1
    batch = {"image": x}
    ratios = {}

    if "a" in args.only:
        ratios["a"] = bench_a(args, model, batch)
    if "b" in args.only:
        ratios["b"] = bench_b(args, model, batch)
    if "c" in args.only:
        ratios["c"] = bench_c(args, model, batch)
    print("\nsummary: " + ", ".join(f"({k}) {v:.3f}x" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
