"""Preflight cost (``train/preflight.py``): what ``validate`` and ``fit`` say one training step
costs, checked against what a real step uses.

The accuracy test runs three configs of different shape for real in one subprocess and
compares the estimate with the measured peak.  Both are the same quantity: the most bytes
of tensors alive at once during a training step after the first (weights and buffers of
every network, gradients, Adam's moments, activations saved for backward, temporaries).
Measured as the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident set just before the networks are built, after a warm-up run of the same
config (one-time library buffers fall in the baseline), with glibc's mmap threshold pinned
low so freed tensors go back to the system instead of staying in the heap; under an
address-space limit, so a regression fails instead of exhausting the machine.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from train import preflight
from train.config import canonicalize, normalize_document, to_structured
from train.errors import UserError
from train.validate import cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20


def typed(doc):
    return to_structured(canonicalize(normalize_document(doc, "test").data))


def ddconfig(**changes):
    dd = dict(double_z=False, z_channels=16, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    dd.update(changes)
    return dd


# Three shapes: a taming EMAVQ with its PatchGAN (GAN step, SDPA attention); a VQ-VAE-2 (two
# codebooks, no attention, no GAN); a taming VQ with upstream's attention over 32 x 32 = 1024
# positions (the score matrices) and LPIPS' VGG16 trunk on the loss side.
CONFIGS = {
    "taming_emavq_gan": {
        "model_type": "TamingVQGAN", "model_variant": "EMAVQ",
        "model_args": {"n_embed": 64, "embed_dim": 16, "ddconfig": ddconfig()},
        "lossconfig": {"params": {"disc_start": 0, "perceptual_weight": 0.0, "disc_num_layers": 2, "disc_ndf": 32}},
        "train": {"batch_size": 4, "learning_rate": 1e-4}, "data": {"image_size": 64}},
    "vqvae2": {
        "model_type": "vqvae2",
        "model_args": {"channel": 64, "n_res_block": 2, "n_res_channel": 32, "embed_dim": 32, "n_embed": 128},
        "train": {"batch_size": 8, "learning_rate": 1e-4, "use_gan": False}, "data": {"image_size": 64}},
    "taming_vanilla_attention_lpips": {
        "model_type": "TamingVQGAN",
        "model_args": {"n_embed": 64, "embed_dim": 16, "attn_impl": "vanilla",
                       "ddconfig": ddconfig(ch_mult=[1, 2], attn_resolutions=[])},
        "lossconfig": {"params": {"disc_start": 0, "perceptual_weight": 1.0}},
        "train": {"batch_size": 2, "learning_rate": 1e-4, "use_gan": False, "allow_random_vgg": True},
        "data": {"image_size": 64}},
}

MEASURE = textwrap.dedent("""
    import gc, json, resource, sys
    import torch
    torch.set_num_threads(1)
    from adapters import build_model
    from adapters.registry import get_model_type
    from losses import LossCalculator
    from train.config import canonicalize, normalize_document, to_structured
    from train.preflight import _gan_step
    from train.sides import make_sides

    def status(key):
        with open("/proc/self/status") as fh:
            return [int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":")][0]

    vm = status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), vm + (3 << 30)))

    def train(cfg, steps):
        model, calc = build_model(cfg), LossCalculator.from_config(cfg)
        spec = get_model_type(cfg.model_type)
        hook = spec.batch_hook(cfg, None) if spec.batch_hook else None
        gen, disc = make_sides(model, calc, cfg.train, 1e-4, "fp32")
        step = _gan_step(calc, disc is not None)
        size, n = cfg.data.image_size, cfg.train.batch_size
        for _ in range(steps):
            for side in (gen, disc):
                if side is not None:
                    side.zero_grad()
            batch = {"image": torch.rand(n, 3, size, size) * 2 - 1, "skipped": torch.zeros(n),
                     "path": [""] * n, "file_index": torch.zeros(n, dtype=torch.long)}
            batch = hook(batch, step) if hook else batch
            out = calc.generator_step(model, batch, step)
            gen.backward(out.loss)
            if disc is not None and calc.should_update_discriminator(step):
                d_loss, _ = calc.discriminator_step(out, step)
                disc.backward(d_loss)
                del d_loss
            del out, batch
            for side in (gen, disc):
                if side is not None:
                    side.optimizer.step()
        del model, calc, hook, gen, disc
        gc.collect()

    peaks = []
    for doc in json.loads(sys.argv[1]):
        cfg = to_structured(canonicalize(normalize_document(doc, "test").data))
        train(cfg, 1)                            # warm-up
        gc.collect()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")                        # reset VmHWM to the current resident set
        base = status("VmRSS")
        train(cfg, 2)                            # the second step has Adam's moments, as every later one
        peaks.append(status("VmHWM") - base)
    print(json.dumps(peaks))
""")


def test_estimate_is_within_35_percent_of_the_measured_peak_on_cpu():
    estimates = [preflight.estimate(typed(doc), ("fp32",)).peak["fp32"] for doc in CONFIGS.values()]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(list(CONFIGS.values()))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {name: (round(e / MiB, 1), round(m / MiB, 1)) for name, e, m in zip(CONFIGS, estimates, measured)}
    for name, estimate, peak in zip(CONFIGS, estimates, measured):
        assert 0.65 * peak <= estimate <= 1.35 * peak, f"{name}: estimate vs measured MiB {report}"
    # Three different shapes: the figures are not one number.
    assert len({round(e / MiB) for e in estimates}) == 3, report


def test_cost_names_parameters_grids_and_attention_of_the_model():
    cost = preflight.estimate(typed(CONFIGS["taming_emavq_gan"]))
    assert cost.generator_params > 0 and cost.discriminator_params > 0
    assert cost.codebooks == [("codebook", (16, 16))]           # 64 px / 4
    # attn_resolutions [16] at 64 px: the level at 16 x 16 and the two mid blocks.
    assert {(layer, n, kernel) for layer, n, kernel in cost.attention} >= {
        ("encoder.mid.attn_1", 256, "sdpa"), ("decoder.mid.attn_1", 256, "sdpa"), ("encoder.down.2.attn.0", 256, "sdpa")}
    assert set(cost.peak) == {"fp32", "bf16"} and cost.peak["fp32"] > cost.state_bytes > 0
    two = preflight.estimate(typed(CONFIGS["vqvae2"]))
    assert two.codebooks == [("top", (8, 8)), ("bottom", (16, 16))] and two.attention == []
    assert two.discriminator_params is None                      # use_gan false: no optimizer


def test_upstream_attention_costs_its_score_matrices_and_sdpa_does_not():
    """Same weights and shapes; only the kernel differs.  Upstream's AttnBlock keeps at least
    the (B, HW, HW) softmax for backward in each attention layer; SDPA keeps none."""
    doc = CONFIGS["taming_vanilla_attention_lpips"]
    vanilla = preflight.estimate(typed(doc), ("fp32",))
    sdpa = preflight.estimate(typed(dict(doc, model_args=dict(doc["model_args"], attn_impl="sdpa"))), ("fp32",))
    assert {kernel for _, _, kernel in vanilla.attention} == {"scores"}
    assert {kernel for _, _, kernel in sdpa.attention} == {"sdpa"}
    scores = doc["train"]["batch_size"] * 1024 * 1024 * 4
    assert vanilla.peak["fp32"] - sdpa.peak["fp32"] >= scores
    assert vanilla.state_bytes == sdpa.state_bytes


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * 2 ** 30), ("500MB", 500 * 10 ** 6), ("1.5T", int(1.5 * 2 ** 40)), ("64 KiB", 64 * 1024),
    ("2g", 2 * 2 ** 30), ("100b", 100)])
def test_budget_sizes(text, expected):
    assert preflight.parse_budget(text) == expected


@pytest.mark.parametrize("text, says", [
    ("24", "has no unit"), ("lots", "not a memory size"), ("-1GB", "not a memory size"),
    ("12parsecs", "not a memory size"), ("0GiB", "more than 0"), ("", "not a memory size")])
def test_bad_budgets_are_refused(text, says):
    with pytest.raises(UserError, match=says):
        preflight.parse_budget(text)


def run_validate(capsys, *argv):
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_refuses_a_bad_budget_with_exit_2(capsys):
    code, out, err = run_validate(capsys, "configs/vqvae2_tiny.json", "--memory-budget", "24")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "--memory-budget '24' has no unit" in err and "24GiB" in err


def test_validate_warns_above_the_budget_and_not_below(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run_validate(capsys, "configs/vqvae2_tiny.json", "--memory-budget", "1MB")
    assert code == 0       # a warning, not an error
    assert "warning train.batch_size: one training step needs about" in out and "[memory_over_budget]" in out
    assert "more than the budget of 976.6 KiB (--memory-budget)" in out
    assert "smaller data.image_size or train.batch_size" in out and "train.precision: bf16" in out
    assert "budget       976.6 KiB (--memory-budget): fp32 estimate" in out and "OVER" in out
    code, out, _ = run_validate(capsys, "configs/vqvae2_tiny.json", "--memory-budget", "1GiB")
    assert code == 0 and "memory_over_budget" not in out and "fits" in out
    assert "latent grid  top 4x4, bottom 8x8" in out


def test_validate_json_has_a_cost_object(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run_validate(capsys, "configs/demo_emavq.json", "--json", "--memory-budget", "80GiB")
    assert code == 0
    cost = json.loads(out)["configs/demo_emavq.json"]["cost"]
    assert set(cost) == {"batch_size", "image_size", "generator_params", "discriminator_params", "frozen_params",
                         "latent_grid", "attention", "peak_bytes", "state_bytes", "precision", "budget_bytes",
                         "budget_source"}
    assert cost["latent_grid"] == {"codebook": [16, 16]} and cost["budget_bytes"] == 80 * 2 ** 30
    assert cost["discriminator_params"] is None          # demo_emavq trains without the GAN
    assert {a["positions"] for a in cost["attention"]} == {256}
    assert all(isinstance(cost["peak_bytes"][p], int) and cost["peak_bytes"][p] > 0 for p in ("fp32", "bf16"))


def test_a_config_with_errors_gets_no_cost(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run_validate(capsys, "configs/legacy/taming_vqvae2_mismatch.json", "--memory-budget", "1MB")
    assert code == 1 and "cost" not in out and "memory_over_budget" not in out


def test_estimate_moves_no_random_state():
    """fit prints the estimate between its seeding and its first step."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    preflight.estimate(typed(CONFIGS["vqvae2"]), ("fp32",))
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert torch.equal(after[0], torch.rand(3)) and after[1:] == (random.random(), np.random.rand())


def test_fit_prints_the_estimate_before_the_first_step(tmp_path, capsys, monkeypatch):
    from train.fit import cli_main as fit_main

    monkeypatch.chdir(ROOT)
    code = fit_main(["configs/vqvae2_tiny.json", "--data", "builtin", "--max-steps", "1", "--no-bar",
                     "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("estimated peak memory"))
    expected = preflight.estimate(typed(json.load(open(os.path.join(ROOT, "configs/vqvae2_tiny.json")))),
                                  ("fp32",)).peak["fp32"]
    assert line.startswith(f"estimated peak memory of one step (batch 4 x 32 px): fp32 "
                           f"{preflight.format_bytes(expected)}")
    assert out.index("estimated peak memory") < out.index("step 1/1")
