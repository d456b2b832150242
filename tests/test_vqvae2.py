"""vqvae2: rosinality layout, EMA numerics, the vqvae2 loss family, ranks in step.

    .venv/bin/python -m pytest -q tests/test_vqvae2.py
"""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters import build_model
from adapters.vqvae2 import VQVAE2, Quantize, build_vqvae2, load_rosinality_checkpoint
from losses import LossCalculator
from losses import gan
from losses.vqvae2_loss import VQVAE2Loss, VQVAE2LossCalculator
from train.errors import UserError
from train.schema import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(channel=16, n_res_block=1, n_res_channel=8, embed_dim=8, n_embed=32)
SMALL_DISC = dict(disc_ndf=8, disc_num_layers=2)


def tiny_cfg(use_gan=False, loss_params=None, **train):
    return make_config(model_type="vqvae2", model_args=dict(TINY),
                       lossconfig=dict(params=dict(loss_params or {})),
                       train=dict(use_gan=use_gan, **train))


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def build_calc(cfg):
    return LossCalculator.from_config(cfg)


# --------------------------------------------------------------------------------------
# State-dict layout: rosinality's VQVAE() with its constructor defaults.


def _conv(out_c, in_c, k):
    return [("weight", (out_c, in_c, k, k)), ("bias", (out_c,))]


def _convt(in_c, out_c, k):  # ConvTranspose2d stores (in, out, k, k)
    return [("weight", (in_c, out_c, k, k)), ("bias", (out_c,))]


def _res(prefix, channel=128, res_channel=32):
    return ([(f"{prefix}.conv.1.{n}", s) for n, s in _conv(res_channel, channel, 3)]
            + [(f"{prefix}.conv.3.{n}", s) for n, s in _conv(channel, res_channel, 1)])


def _layer(prefix, entries):
    return [(f"{prefix}.{n}", s) for n, s in entries]


# in_channel=3, channel=128, n_res_block=2, n_res_channel=32, embed_dim=64, n_embed=512
ROSINALITY_DEFAULT_LAYOUT = (
    _layer("enc_b.blocks.0", _conv(64, 3, 4))          # 3 -> channel/2, stride 2
    + _layer("enc_b.blocks.2", _conv(128, 64, 4))      # -> channel, stride 2
    + _layer("enc_b.blocks.4", _conv(128, 128, 3))
    + _res("enc_b.blocks.5") + _res("enc_b.blocks.6")
    + _layer("enc_t.blocks.0", _conv(64, 128, 4))      # channel -> channel/2, stride 2
    + _layer("enc_t.blocks.2", _conv(128, 64, 3))
    + _res("enc_t.blocks.3") + _res("enc_t.blocks.4")
    + _layer("quantize_conv_t", _conv(64, 128, 1))
    + [("quantize_t.embed", (64, 512)), ("quantize_t.cluster_size", (512,)),
       ("quantize_t.embed_avg", (64, 512))]
    + _layer("dec_t.blocks.0", _conv(128, 64, 3))
    + _res("dec_t.blocks.1") + _res("dec_t.blocks.2")
    + _layer("dec_t.blocks.4", _convt(128, 64, 4))
    + _layer("quantize_conv_b", _conv(64, 64 + 128, 1))
    + [("quantize_b.embed", (64, 512)), ("quantize_b.cluster_size", (512,)),
       ("quantize_b.embed_avg", (64, 512))]
    + _layer("upsample_t", _convt(64, 64, 4))
    + _layer("dec.blocks.0", _conv(128, 64 + 64, 3))
    + _res("dec.blocks.1") + _res("dec.blocks.2")
    + _layer("dec.blocks.4", _convt(128, 64, 4))
    + _layer("dec.blocks.6", _convt(64, 3, 4))
)


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return build_vqvae2(make_config(model_type="vqvae2"))


def test_default_state_dict_is_rosinalitys_layout(default_model):
    got = [(k, tuple(v.shape)) for k, v in default_model.state_dict().items()]
    assert got == ROSINALITY_DEFAULT_LAYOUT
    # Codebooks are buffers, never parameters.
    params = dict(default_model.named_parameters())
    assert not any(k.startswith(("quantize_t.", "quantize_b.")) for k in params)
    assert default_model.codebook_sizes == (512, 512)
    assert default_model.get_last_layer() is default_model.dec.blocks[6].weight


def test_default_model_256px_shapes(default_model):
    # The one 256 px run: rosinality's codes are 32x32 (top) and 64x64 (bottom).
    default_model.eval()
    with torch.no_grad():
        quant_t, quant_b, diff, id_t, id_b = default_model.encode(images(1, 256))
    assert quant_t.shape == (1, 64, 32, 32) and quant_b.shape == (1, 64, 64, 64)
    assert id_t.shape == (1, 32, 32) and id_b.shape == (1, 64, 64) and diff.shape == (1,)


def test_rosinality_checkpoint_loads_strictly(default_model, tmp_path):
    # A file with rosinality's keys and shapes (random values), saved as a DDP-wrapped
    # model would be; everything must land in the right tensor.
    g = torch.Generator().manual_seed(1)
    state = {f"module.{k}": torch.randn(shape, generator=g) for k, shape in ROSINALITY_DEFAULT_LAYOUT}
    path = tmp_path / "vqvae_560.pt"
    torch.save(state, path)
    torch.manual_seed(2)
    model = VQVAE2()
    load_rosinality_checkpoint(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"module.{key}"]), key
    # Through the config: model_args.ckpt_path.
    torch.save({k[len("module."):]: v for k, v in state.items()}, path)
    built = build_model(make_config(model_type="vqvae2", model_args={"ckpt_path": str(path)}))
    assert torch.equal(built.quantize_b.embed, state["module.quantize_b.embed"])


def test_checkpoint_shape_mismatch_names_key_and_shapes(tmp_path):
    model = VQVAE2(**TINY)
    state = model.state_dict()
    state["quantize_t.embed"] = torch.zeros(8, 64)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"quantize_t.embed.*\(8, 64\).*\(8, 32\)"):
        load_rosinality_checkpoint(model, path)
    with pytest.raises(UserError, match="does not exist"):
        load_rosinality_checkpoint(model, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable"):
        load_rosinality_checkpoint(model, tmp_path / "junk.pt")


# --------------------------------------------------------------------------------------
# Forward contract at tiny sizes


def test_forward_encode_decode_shapes_tiny():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    x = images(2, 32)
    with torch.no_grad():
        xrec, latent = model(x)
        quant_t, quant_b, diff, id_t, id_b = model.encode(x)
        xrec2, latent2, (jt, jb) = model(x, return_codes=True)
        from_codes = model.decode_code(id_t, id_b)
    assert xrec.shape == x.shape and latent.shape == (1,)
    assert quant_t.shape == (2, 8, 4, 4) and quant_b.shape == (2, 8, 8, 8)
    assert id_t.shape == (2, 4, 4) and id_b.shape == (2, 8, 8) and id_t.dtype == torch.int64
    assert torch.equal(jt, id_t) and torch.equal(jb, id_b)
    assert torch.allclose(xrec, xrec2) and torch.allclose(latent, latent2)
    # Decoding the code maps gives the forward's reconstruction (straight-through values).
    assert torch.allclose(from_codes, xrec, atol=1e-5)
    assert model.codebook_sizes == (32, 32)


def test_bf16_autocast_keeps_float32_codebooks():
    torch.manual_seed(0)
    model = VQVAE2(**TINY).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xrec, latent, (id_t, id_b) = model(images(), return_codes=True)
    assert torch.isfinite(xrec.float()).all() and latent.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in model.buffers())
    assert torch.isfinite(model.quantize_b.embed).all()


def test_bad_model_args_are_user_errors(caplog):
    cases = [
        ({"channel": "wide"}, "channel must be an integer"),
        ({"n_embd": 64}, "did you mean 'n_embed'"),
        ({"decay": 1.5}, r"decay must be a number in \[0, 1\)"),
        ({"n_embed": 0}, "n_embed must be >= 1"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            build_model(make_config(model_type="vqvae2", model_args=args))
    with pytest.raises(UserError, match="divisible by 8.*use e.g. 96"):
        build_model(make_config(model_type="vqvae2", model_args=dict(TINY), data={"image_size": 100}))
    with pytest.raises(UserError, match="TamingVQGAN"):
        build_model(make_config(model_type="vqvae2", model_variant="EMAVQ", model_args=dict(TINY)))
    with caplog.at_level(logging.WARNING, logger="adapters.vqvae2"):
        build_model(make_config(model_type="vqvae2", model_args=dict(TINY, legacy_flag=1)))
    assert "vqvae2 ignores model_args legacy_flag" in caplog.text


# --------------------------------------------------------------------------------------
# EMA codebook numerics against an independent float64 reference


def reference_ema(embed, cluster_size, embed_avg, vectors, decay, eps):
    """Sonnet / rosinality EMA step, written with explicit loops in numpy float64."""
    embed, cluster_size, embed_avg = embed.copy(), cluster_size.copy(), embed_avg.copy()
    dim, n_embed = embed.shape
    ids = np.array([int(np.argmin([np.sum((v - embed[:, j]) ** 2) for j in range(n_embed)]))
                    for v in vectors])
    counts = np.zeros(n_embed)
    sums = np.zeros((dim, n_embed))
    for v, j in zip(vectors, ids):
        counts[j] += 1
        sums[:, j] += v
    quantized = embed[:, ids].T.copy()   # the output uses the codebook before the update
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_avg = decay * embed_avg + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + n_embed * eps) * n
    embed = embed_avg / smoothed[None, :]
    commit = np.mean((quantized - vectors) ** 2)
    return embed, cluster_size, embed_avg, ids, quantized, commit


def test_ema_update_matches_reference():
    torch.manual_seed(0)
    q = Quantize(dim=4, n_embed=6, decay=0.9).train()
    ref = [q.embed.double().numpy(), q.cluster_size.double().numpy(), q.embed_avg.double().numpy()]
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        z = torch.randn(2, 3, 5, 4, generator=g)   # channels-last, 30 vectors
        quant, commit, ids = q(z)
        e, cs, ea, ref_ids, ref_quant, ref_commit = reference_ema(
            *ref, z.reshape(-1, 4).double().numpy(), decay=0.9, eps=1e-5)
        assert ids.shape == (2, 3, 5)
        assert np.array_equal(ids.flatten().numpy(), ref_ids), step
        np.testing.assert_allclose(quant.reshape(-1, 4).detach().numpy(), ref_quant, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(commit), ref_commit, rtol=1e-5)
        np.testing.assert_allclose(q.cluster_size.numpy(), cs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(q.embed_avg.numpy(), ea, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(q.embed.numpy(), e, rtol=1e-5, atol=1e-6)
        ref = [e, cs, ea]
    # Some codes went unused: their counts decayed and Laplace smoothing kept them finite.
    assert torch.isfinite(q.embed).all()


def test_ema_only_in_training_and_straight_through_gradient():
    torch.manual_seed(0)
    q = Quantize(dim=4, n_embed=6).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(10, 4, requires_grad=True)
    quant, commit, _ = q(z)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k
    quant.sum().backward()
    # Straight-through: d quant / d z is the identity.
    assert torch.equal(z.grad, torch.ones_like(z))


def test_decay_reaches_both_codebooks_and_model_updates_in_train_mode_only():
    model = VQVAE2(**TINY, decay=0.5)
    assert model.quantize_t.decay == 0.5 and model.quantize_b.decay == 0.5
    x = images(2, 32)
    before = model.quantize_b.embed.clone(), model.quantize_t.embed.clone()
    with torch.no_grad():
        model.eval()(x)
    assert torch.equal(model.quantize_b.embed, before[0])
    with torch.no_grad():
        model.train()(x)
    assert not torch.equal(model.quantize_b.embed, before[0])
    assert not torch.equal(model.quantize_t.embed, before[1])


def test_codebooks_not_in_generator_parameters_and_not_moved_by_optimizer():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    gen = list(model.generator_parameters())
    buffers = {id(b) for b in model.buffers()}
    assert gen and not any(id(p) in buffers for p in gen)
    assert {id(p) for p in gen} == {id(p) for p in model.parameters()}
    opt = torch.optim.Adam(gen, lr=1e-2)
    xrec, latent = model(images())
    after_ema = {k: v.clone() for k, v in model.state_dict().items() if "quantize_" in k and "conv" not in k}
    (F.mse_loss(xrec, images()) + latent.mean()).backward()
    opt.step()
    for k, v in after_ema.items():
        assert torch.equal(model.state_dict()[k], v), k


# --------------------------------------------------------------------------------------
# The vqvae2 loss family


def test_loss_is_mse_plus_quarter_latent():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg).eval()   # eval: no EMA change between the two forwards
    calc = build_calc(cfg)
    x = images()
    out = calc.generator_step(model, {"image": x}, global_step=5)
    with torch.no_grad():
        xrec, latent = model(x)
    expected = F.mse_loss(xrec, x) + 0.25 * latent.mean()   # rosinality's train_vqvae.py
    assert torch.allclose(out.loss, expected, rtol=1e-6)
    assert torch.allclose(out.log["train/rec_loss"], F.mse_loss(xrec, x))
    assert torch.allclose(out.log["train/latent_loss"], latent.mean())
    assert float(out.log["train/disc_factor"]) == 0.0 and float(out.log["train/g_loss"]) == 0.0
    assert set(out.log) == {f"train/{k}" for k in ("total_loss", "rec_loss", "latent_loss", "p_loss",
                                                    "nll_loss", "g_loss", "d_weight", "disc_factor")}
    assert all(not v.requires_grad for v in out.log.values())
    assert not out.reconstructions.requires_grad and len(out.codes) == 2

    cfg2 = tiny_cfg(loss_params={"latent_loss_weight": 1.0, "pixelloss_weight": 2.0})
    out2 = build_calc(cfg2).generator_step(model, {"image": x}, 0, split="val")
    assert torch.allclose(out2.loss, 2 * F.mse_loss(xrec, x) + latent.mean(), rtol=1e-6)
    assert "val/total_loss" in out2.log


def test_perceptual_term_uses_taming_lpips(tmp_path, monkeypatch):
    # No VGG16 file anywhere: an explicit random trunk (tests only), the real taming LPIPS.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match="VGG16"):
        build_calc(tiny_cfg(loss_params={"perceptual_weight": 1.0}))
    torch.manual_seed(0)
    cfg = tiny_cfg(loss_params={"perceptual_weight": 0.5}, allow_random_vgg=True)
    calc = build_calc(cfg).train()
    from taming.modules.losses.lpips import LPIPS

    assert isinstance(calc.perceptual_loss, LPIPS) and not calc.perceptual_loss.training
    assert any(k.startswith("perceptual_loss.lin0.") for k in calc.state_dict())
    model = build_model(cfg).eval()
    x = images()
    out = calc.generator_step(model, {"image": x}, 0)
    xrec, latent = model(x)
    p = calc.perceptual_loss(x, xrec).mean()
    assert torch.allclose(out.log["train/p_loss"], p.detach(), rtol=1e-5)
    assert torch.allclose(out.loss, F.mse_loss(xrec, x) + 0.5 * p + 0.25 * latent.mean(), rtol=1e-5)
    out.loss.backward()
    assert all(q.grad is None for q in calc.perceptual_loss.parameters())


def test_use_gan_false_builds_and_runs_no_discriminator(monkeypatch, caplog):
    calls = {"build": 0, "adaptive": 0}
    real_build = gan.build_discriminator

    def counting_build(*a, **k):
        calls["build"] += 1
        return real_build(*a, **k)

    monkeypatch.setattr(gan, "build_discriminator", counting_build)
    monkeypatch.setattr(gan, "adaptive_weight", lambda *a, **k: calls.__setitem__("adaptive", 1))
    cfg = tiny_cfg(use_gan=False, loss_params=dict(SMALL_DISC, disc_start=0, disc_factor=1.0))
    with caplog.at_level(logging.WARNING, logger="losses.vqvae2_loss"):
        calc = LossCalculator.from_config(cfg)
        model = build_model(cfg)
        for step in range(3):
            calc.generator_step(model, {"image": images()}, step).loss.backward()
    use_gan_warnings = [r for r in caplog.records if "use_gan is false" in r.getMessage()]
    assert len(use_gan_warnings) == 1 and "disc_factor is set to 0" in use_gan_warnings[0].getMessage()
    assert calls == {"build": 0, "adaptive": 0}
    assert calc.discriminator is None and calc.disc_factor == 0.0
    assert not any(k.startswith("discriminator.") for k in calc.state_dict())
    assert all(calc.disc_factor_at(s) == 0.0 for s in (0, 10, 10 ** 6))
    assert not any(calc.should_update_discriminator(s) for s in range(10))
    out = calc.generator_step(model, {"image": images()}, 100)
    assert float(out.log["train/disc_factor"]) == 0.0
    with pytest.raises(RuntimeError, match="use_gan false"):
        calc.discriminator_step(out, 100)


def test_no_discriminator_work_before_disc_start(monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_cfg(use_gan=True, loss_params=dict(SMALL_DISC, disc_start=3))
    model = build_model(cfg).eval()
    calc = build_calc(cfg)
    d_calls = []
    calc.discriminator.register_forward_hook(lambda *a: d_calls.append(1))
    adaptive = []
    real_adaptive = gan.adaptive_weight
    monkeypatch.setattr(gan, "adaptive_weight", lambda *a, **k: adaptive.append(1) or real_adaptive(*a, **k))
    x = images()
    before = calc.generator_step(model, {"image": x}, 2)
    assert d_calls == [] and adaptive == [] and not calc.should_update_discriminator(2)
    # Same value as with no GAN at all.
    plain = build_calc(tiny_cfg(use_gan=False)).generator_step(model, {"image": x}, 2)
    assert torch.equal(before.loss, plain.loss)
    calc.generator_step(model, {"image": x}, 3)
    assert len(d_calls) == 1 and adaptive == [1] and calc.should_update_discriminator(3)


def test_gan_term_matches_independent_computation():
    torch.manual_seed(0)
    cfg = tiny_cfg(use_gan=True, loss_params=dict(SMALL_DISC, disc_start=0, disc_weight=0.8, disc_factor=0.5))
    model = build_model(cfg).eval()
    calc = build_calc(cfg)
    x = images()
    out = calc.generator_step(model, {"image": x}, 0)
    xrec, latent = model(x)
    nll = F.mse_loss(xrec, x)
    g_loss = -calc.discriminator(xrec).mean()
    last = model.dec.blocks[-1].weight
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
    d_weight = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.8
    expected = nll + 0.25 * latent.mean() + d_weight * 0.5 * g_loss
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert torch.allclose(out.log["train/d_weight"], d_weight, rtol=1e-5)
    assert float(out.log["train/disc_factor"]) == 0.5
    d_loss, d_log = calc.discriminator_step(out, 0)
    real, fake = calc.discriminator(x), calc.discriminator(xrec.detach())
    expected_d = 0.5 * 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    assert torch.allclose(d_loss, expected_d, rtol=1e-5)
    assert {"train/disc_loss", "train/logits_real", "train/logits_fake"} <= set(d_log)
    # Validation without a graph: adaptive weight 0, as taming.
    with torch.no_grad():
        val = calc.generator_step(model, {"image": x}, 0, split="val")
    assert float(val.log["val/d_weight"]) == 0.0


def test_generator_and_discriminator_updates_are_isolated():
    torch.manual_seed(0)
    cfg = tiny_cfg(use_gan=True, loss_params=dict(SMALL_DISC, disc_start=0))
    model = build_model(cfg).train()
    calc = build_calc(cfg).train()
    out = calc.generator_step(model, {"image": images()}, 0)
    out.loss.backward()
    assert all(p.grad is None for p in calc.discriminator.parameters())
    assert all(p.requires_grad for p in calc.discriminator.parameters())   # unfrozen again
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    d_loss, _ = calc.discriminator_step(out, 0)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in calc.discriminator.parameters())
    assert [k for k in calc.state_dict()][0].startswith("discriminator.")


def test_disc_update_cadence():
    calc = build_calc(tiny_cfg(use_gan=True, loss_params=dict(SMALL_DISC, disc_start=4),
                               disc_update_every=3))
    assert [s for s in range(12) if calc.should_update_discriminator(s)] == [6, 9]
    assert calc.disc_factor_at(3) == 0.0 and calc.disc_factor_at(4) == 1.0
    off = build_calc(tiny_cfg(use_gan=True, loss_params=dict(SMALL_DISC, disc_factor=0.0)))
    assert not any(off.should_update_discriminator(s) for s in range(5))


def test_bad_loss_config_is_user_error():
    cases = [
        (dict(lossconfig=dict(params={"latent_weight": 0.5})), "Did you mean 'latent_loss_weight'"),
        (dict(lossconfig=dict(params={"disc_loss": "wasserstein"})), "hinge, vanilla"),
        (dict(lossconfig=dict(params={"disc_start": "soon"})), "disc_start must be a number"),
        (dict(lossconfig=dict(params={"disc_in_channels": 1})), "disc_in_channels is 1"),
        (dict(lossconfig=dict(target="taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator")),
         "model_type 'TamingVQGAN'"),
    ]
    for kwargs, message in cases:
        cfg = make_config(model_type="vqvae2", model_args=dict(TINY), train=dict(use_gan=True), **kwargs)
        with pytest.raises(UserError, match=message):
            LossCalculator.from_config(cfg)
    # The accepted names are the fields of the family's target class.
    assert "latent_loss_weight" in VQVAE2Loss.__dataclass_fields__
    assert isinstance(build_calc(tiny_cfg()), VQVAE2LossCalculator)


def test_shipped_configs_build():
    from train.config import load_config

    for name, use_gan in (("vqvae2.json", False), ("vqvae2_tiny.json", True)):
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert cfg.model_type == "vqvae2" and cfg.train.use_gan is use_gan
        calc = build_calc(cfg)
        assert (calc.discriminator is not None) is use_gan
        if name == "vqvae2_tiny.json":
            model = build_model(cfg)
            out = calc.generator_step(model, {"image": images(2, cfg.data.image_size)}, 0)
            assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------
# Two real processes: ranks with different data keep identical codebooks


def test_torchrun_ranks_keep_identical_codebooks(torchrun_jobs):
    from tests.dist_vqvae2_worker import STEPS, buffers, images, make_model

    r0 = torch.load(torchrun_jobs / "vqvae2_codebooks" / "rank0.pt")
    r1 = torch.load(torchrun_jobs / "vqvae2_codebooks" / "rank1.pt")
    # One process on both ranks' batches: what the all-reduced update must equal.
    ref = make_model()
    with torch.no_grad():
        for step in range(STEPS):
            ref(torch.cat([images(r, step) for r in range(2)]))
    ref = {"buffers": buffers(ref)}
    # The ranks saw different data ...
    assert not torch.equal(r0["local_counts"], r1["local_counts"])
    for key, value in r0["buffers"].items():
        # ... yet hold the same codebooks, equal to one process on the whole batch.
        assert torch.equal(value, r1["buffers"][key]), key
        assert torch.allclose(value, ref["buffers"][key], rtol=1e-5, atol=1e-6), key


# --------------------------------------------------------------------------------------
# The trainer: `python -m train fit` on the shipped tiny config


def _tiny_model_from_config():
    from train.config import load_config
    from train.schema import as_dict

    args = as_dict(load_config(os.path.join(ROOT, "configs", "vqvae2_tiny.json")).model_args)
    return VQVAE2(**args)


def test_fit_two_steps_on_builtin_data(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "train", "fit", "configs/vqvae2_tiny.json", "--data", "builtin",
                           "--max-steps", "2", "--out", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "images").glob("*.png"))
    # The exported weights are a rosinality-layout state dict: they load strictly.
    weights = load_file(str(run / "checkpoints" / "last.safetensors"))
    model = load_rosinality_checkpoint(_tiny_model_from_config(), weights)
    # Two training steps moved the EMA codebooks away from their random start.
    assert not torch.allclose(model.quantize_b.cluster_size, torch.ones_like(model.quantize_b.cluster_size))


def test_fit_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    from train.cli import main

    def fit(*argv):
        assert main(["fit", *argv, "--no-bar"]) == 0

    cfg = os.path.join(ROOT, "configs", "vqvae2_tiny.json")
    # disc_start 1 in the config: steps 1 and 2 run the GAN and the discriminator update.
    fit(cfg, "--data", "builtin", "--max-steps", "3", "--out", str(tmp_path / "straight"))
    fit(cfg, "--data", "builtin", "--max-steps", "2", "--out", str(tmp_path / "split"))
    fit("--resume", str(tmp_path / "split"), "--max-steps", "3")
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoints" / "last.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_torchrun_fit_keeps_ranks_identical(torchrun_jobs):
    # The real trainer under DDP: different images per rank, GAN on from step 0.
    folder = torchrun_jobs / "fit-vqvae2"
    r0, r1 = torch.load(folder / "rank0.pt"), torch.load(folder / "rank1.pt")
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3 and r0["code"] == 0
    assert any(k.startswith("discriminator.") for k in r0["tensors"])
    assert [k for k, v in r0["tensors"].items() if not torch.equal(v, r1["tensors"][k])] == []
    cluster = r0["tensors"]["model.quantize_b.cluster_size"]
    assert not torch.allclose(cluster, torch.ones_like(cluster))   # the EMA really ran
    assert (folder / "run" / "checkpoints" / "last.ckpt").is_file()
