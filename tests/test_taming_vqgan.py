"""TamingVQGAN adapters against the real upstream taming classes.

    .venv/bin/python -m pytest -q tests/test_taming_vqgan.py

``taming.models.vqgan`` imports ``pytorch_lightning.utilities.distributed`` (gone in
Lightning 2.x); the ``upstream`` fixture inserts a shim module for it -- in tests only.
"""
import contextlib
import io

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from adapters import build_model
from adapters.taming_vqgan import TamingVQGAN
from adapters.weights import load_model_weights
from train.errors import UserError
from train.schema import make_config

VARIANTS = ["VQ", "EMAVQ", "Gumbel", "NoDisc"]
N_EMBED, EMBED_DIM = 32, 8  # EMBED_DIM == tiny z_channels (Gumbel needs it)
DUMMY_LOSS = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}
TEMP_SCHED = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
              "params": dict(warm_up_steps=10, max_decay_steps=100, lr_start=0.9, lr_max=0.9, lr_min=1e-6)}


@pytest.fixture(scope="module")
def upstream():
    from tests.conftest import import_upstream_vqgan

    return import_upstream_vqgan()


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def build_upstream(vqgan, variant, ddconfig, **extra):
    """The upstream model for ``variant``; EMAVQ (absent from the release) is a VQModel whose
    layout test_state_dict_matches_upstream extends by hand."""
    kwargs = dict(ddconfig=ddconfig, lossconfig=DUMMY_LOSS, n_embed=N_EMBED, embed_dim=EMBED_DIM, **extra)
    cls = {"VQ": vqgan.VQModel, "EMAVQ": vqgan.VQModel, "Gumbel": vqgan.GumbelVQ,
           "NoDisc": vqgan.VQNoDiscModel}[variant]
    if variant == "Gumbel":
        kwargs["temperature_scheduler_config"] = TEMP_SCHED
    return quiet(cls, **kwargs)


def build_ours(variant, ddconfig, **extra):
    args = dict(ddconfig=ddconfig, n_embed=N_EMBED, embed_dim=EMBED_DIM, **extra)
    return build_model(make_config(model_type="TamingVQGAN", model_variant=variant, model_args=args))


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith("loss.")}


def upstream_emavq_shapes(vq_shapes):
    out = dict(vq_shapes)
    out["quantize.embedding.cluster_size"] = (N_EMBED,)
    out["quantize.embedding.embed_avg"] = (N_EMBED, EMBED_DIM)
    return out


# ---- contract -------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_contract(variant, tiny_ddconfig):
    torch.manual_seed(0)
    model = build_ours(variant, tiny_ddconfig)
    assert isinstance(model, TamingVQGAN) and model.codebook_sizes == (N_EMBED,)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    xrec, qloss = model(x)
    assert xrec.shape == x.shape and qloss.dim() == 0
    xrec2, qloss2, indices = model(x, return_pred_indices=True)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.long
    assert int(indices.min()) >= 0 and int(indices.max()) < N_EMBED
    assert model.get_last_layer() is model.decoder.conv_out.weight

    quant, emb_loss, info = model.encode(x)
    assert quant.shape == (2, EMBED_DIM, 8, 8) and len(info) == 3
    assert model.decode(quant).shape == x.shape

    # gradients reach the encoder through the quantizer (straight-through)
    ((xrec - x).abs().mean() + qloss).backward()
    assert model.encoder.conv_in.weight.grad is not None
    assert model.get_last_layer().grad is not None


@pytest.mark.parametrize("variant", VARIANTS)
def test_generator_parameters(variant, tiny_ddconfig):
    model = build_ours(variant, tiny_ddconfig)
    names = {id(p): n for n, p in model.named_parameters()}
    got = [names[id(p)] for p in model.generator_parameters()]
    # upstream configure_optimizers order: encoder, decoder, quantize, quant_conv, post_quant_conv
    order = ["encoder.", "decoder."] + ([] if variant == "EMAVQ" else ["quantize."]) + \
            ["quant_conv.", "post_quant_conv."]
    expected = [n for prefix in order for n, _ in model.named_parameters() if n.startswith(prefix)]
    assert got == expected
    if variant == "EMAVQ":
        assert not any(n.startswith("quantize.") for n in got)
        for t in model.quantize.state_dict().values():
            assert not t.requires_grad
        # not even reachable through model.parameters()
        assert not any(n.startswith("quantize.") for n, _ in model.named_parameters())
    else:
        assert any(n.startswith("quantize.") for n in got)


# ---- upstream layout and weights -------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_upstream(variant, tiny_ddconfig, upstream):
    ref = shapes(build_upstream(upstream, variant, tiny_ddconfig))
    if variant == "EMAVQ":
        ref = upstream_emavq_shapes(ref)
    assert shapes(build_ours(variant, tiny_ddconfig)) == ref


@pytest.mark.parametrize("variant", ["VQ", "Gumbel", "NoDisc"])
def test_upstream_weights_load_strictly_and_give_identical_outputs(variant, tiny_ddconfig, upstream):
    """Bit-identical with upstream's attention kernel (attn_impl: vanilla); the default SDPA
    kernel is held to 1e-5 of upstream in tests/test_attention.py.

    VQ / NoDisc: codes and loss are upstream's bit for bit, and the reconstruction is
    upstream's decoding of those codes bit for bit.  Upstream's own forward rounds the
    quantized vectors in its straight-through ``z + (z_q - z).detach()``
    (``adapters.contract.straight_through`` does not), so it is held to 1e-5 of ours.
    """
    torch.manual_seed(1)
    ref = build_upstream(upstream, variant, tiny_ddconfig).eval()
    ours = build_ours(variant, tiny_ddconfig, attn_impl="vanilla").eval()
    load_model_weights(ours, ref.state_dict(), strict=True, source="upstream")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)  # Gumbel samples noise even in eval mode
        ref_rec, ref_loss = ref(x)
        torch.manual_seed(5)
        rec, loss = ours(x)
        if variant != "Gumbel":
            ref_quant, _, (_, _, ref_idx) = ref.encode(x)
            _, _, codes = ours(x, return_codes=True)
            ref_decoded = ref.decode(ref.quantize.get_codebook_entry(ref_idx, (*codes[0].shape, ref_quant.shape[1])))
    assert torch.equal(loss, ref_loss)
    if variant == "Gumbel":
        assert torch.equal(rec, ref_rec)
        return
    assert torch.equal(codes[0].reshape(-1), ref_idx.reshape(-1))
    assert torch.equal(rec, ref_decoded)
    assert not torch.equal(ref_rec, ref_decoded)      # upstream's forward does round (else this proves nothing)
    torch.testing.assert_close(rec, ref_rec, rtol=0, atol=1e-5)


def test_emavq_eval_matches_vectorquantizer2_with_same_codebook(tiny_ddconfig, upstream):
    """EMAVQ in eval mode is VectorQuantizer2's nearest-code lookup; only the loss differs
    (EMA: beta * ||sg[z_q] - z||^2; VectorQuantizer2 legacy: (1 + beta) * the same)."""
    torch.manual_seed(2)
    ref = build_upstream(upstream, "VQ", tiny_ddconfig).eval()
    sd = dict(ref.state_dict())
    sd["quantize.embedding.cluster_size"] = torch.ones(N_EMBED)
    sd["quantize.embedding.embed_avg"] = sd["quantize.embedding.weight"].clone()
    ours = build_ours("EMAVQ", tiny_ddconfig, attn_impl="vanilla").eval()  # upstream's kernel: bitwise
    load_model_weights(ours, sd, strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref_rec, ref_loss = ref(x)
        rec, loss, _ = ours(x, return_pred_indices=True)
        ref_quant, _, (_, _, ref_idx) = ref.encode(x)
        _, _, (_, _, idx) = ours.encode(x)
        b, c, h, w = ref_quant.shape
        ref_decoded = ref.decode(ref.quantize.get_codebook_entry(ref_idx, (b, h, w, c)))
    assert torch.equal(idx, ref_idx)
    # The codebook entries exactly (adapters.contract.straight_through): upstream's decoding
    # of the same codes, bit for bit; upstream's forward rounds them in its straight-through.
    assert torch.equal(rec, ref_decoded)
    torch.testing.assert_close(rec, ref_rec, rtol=0, atol=1e-5)
    assert loss.item() == pytest.approx(ref_loss.item() * 0.25 / 1.25, rel=1e-5)


def test_ldm_attention_options(tiny_ddconfig, upstream):
    """latent-diffusion's attn_type none/linear: same layout as ldm's Encoder/Decoder."""
    base = shapes(build_upstream(upstream, "VQ", tiny_ddconfig))
    attn_prefixes = sorted({k[:-len(".q.weight")] for k in base if k.endswith(".q.weight")})
    assert "encoder.mid.attn_1" in attn_prefixes and "decoder.up.2.attn.0" in attn_prefixes

    def is_attn(key):
        return any(key.startswith(p + ".") for p in attn_prefixes)

    none = shapes(build_ours("VQ", dict(tiny_ddconfig, attn_type="none")))
    assert none == {k: v for k, v in base.items() if not is_attn(k)}

    for dd in (dict(tiny_ddconfig, attn_type="linear"), dict(tiny_ddconfig, use_linear_attn=True)):
        lin = shapes(build_ours("VQ", dd))
        expected = {k: v for k, v in base.items() if not is_attn(k)}
        for p in attn_prefixes:
            c = base[p + ".q.weight"][0]
            expected.update({p + ".to_qkv.weight": (3 * c, c, 1, 1), p + ".to_out.weight": (c, c, 1, 1),
                             p + ".to_out.bias": (c,)})
        assert lin == expected


def test_linear_attention_matches_ldm_formula():
    """LinAttnBlock against ldm's LinearAttention written with einops (heads=1, no residual)."""
    from einops import rearrange

    from adapters.taming_vqgan import LinAttnBlock

    torch.manual_seed(0)
    block = LinAttnBlock(8)
    x = torch.randn(2, 8, 3, 5)
    qkv = block.to_qkv(x)
    q, k, v = rearrange(qkv, "b (qkv heads c) h w -> qkv b heads c (h w)", heads=1, qkv=3)
    k = k.softmax(dim=-1)
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", context, q)
    ref = block.to_out(rearrange(out, "b heads c (h w) -> b (heads c) h w", heads=1, h=3, w=5))
    torch.testing.assert_close(block(x), ref)


def test_tanh_out(tiny_ddconfig):
    torch.manual_seed(0)
    plain = build_ours("VQ", tiny_ddconfig).eval()
    squashed = build_ours("VQ", dict(tiny_ddconfig, tanh_out=True)).eval()
    squashed.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(squashed(x)[0], torch.tanh(plain(x)[0]))


def test_remap_layout_and_decode_code(tmp_path, tiny_ddconfig, upstream):
    used = tmp_path / "used.npy"
    np.save(used, np.arange(0, N_EMBED, 2))
    ref = shapes(build_upstream(upstream, "VQ", tiny_ddconfig, remap=str(used)))
    assert ref["quantize.used"] == (N_EMBED // 2,)
    torch.manual_seed(0)
    model = build_ours("VQ", tiny_ddconfig, remap=str(used), sane_index_shape=True).eval()
    assert shapes(model) == ref
    ema = build_ours("EMAVQ", tiny_ddconfig, remap=str(used))
    assert shapes(ema) == upstream_emavq_shapes(ref)


@pytest.mark.parametrize("variant", ["VQ", "EMAVQ"])
def test_remapped_indices_decode_back(variant, tmp_path, tiny_ddconfig):
    used = tmp_path / "perm.npy"
    np.save(used, np.random.default_rng(0).permutation(N_EMBED))  # every code, shuffled
    torch.manual_seed(0)
    model = build_ours(variant, tiny_ddconfig, remap=str(used)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        xrec, _, remapped = model(x, return_pred_indices=True)
        torch.testing.assert_close(model.decode_code(remapped), xrec, rtol=1e-4, atol=1e-5)
        # the nearest code in the full codebook, found directly
        z = model.encode_to_prequant(x).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        nearest = torch.cdist(z, model.quantize.embedding.weight).argmin(1)
    perm = torch.as_tensor(np.load(used))
    assert not torch.equal(remapped.reshape(-1), nearest)  # remapping really changed the numbers
    assert torch.equal(perm[remapped.reshape(-1)], nearest)


def test_colorize_buffer_layout(tiny_ddconfig, upstream):
    ref = shapes(build_upstream(upstream, "VQ", tiny_ddconfig, colorize_nlabels=5))
    assert ref["colorize"] == (3, 5, 1, 1)
    assert shapes(build_ours("VQ", tiny_ddconfig, colorize_nlabels=5)) == ref


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_code_reproduces_forward(variant, tiny_ddconfig):
    torch.manual_seed(0)
    model = build_ours(variant, tiny_ddconfig).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        xrec, _, indices = model(x, return_pred_indices=True)
        torch.testing.assert_close(model.decode_code(indices), xrec, rtol=1e-4, atol=1e-5)


def test_gumbel_temperature_schedule(tiny_ddconfig):
    from taming.lr_scheduler import LambdaWarmUpCosineScheduler

    model = build_ours("Gumbel", tiny_ddconfig, temperature_scheduler_config=TEMP_SCHED, kl_weight=1e-6)
    ref = LambdaWarmUpCosineScheduler(**TEMP_SCHED["params"])
    for step in (0, 5, 50, 200):
        assert model.update_temperature(step) == pytest.approx(ref(step))
        assert model.quantize.temperature == pytest.approx(ref(step))
    assert model.quantize.kl_weight == 1e-6
    assert build_ours("VQ", tiny_ddconfig).update_temperature(3) is None


def test_builds_from_dictconfig(tiny_ddconfig):
    cfg = OmegaConf.structured(make_config(model_type="taming.models.vqgan.EMAVQ", model_variant="emavq",
                                           model_args=dict(ddconfig=tiny_ddconfig, n_embed=N_EMBED,
                                                           embed_dim=EMBED_DIM, decay=0.9, eps=1e-4)))
    model = build_model(cfg)
    assert model.variant == "EMAVQ"
    assert model.quantize.embedding.decay == 0.9 and model.quantize.embedding.eps == 1e-4


# ---- checkpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_ckpt_path_loads_lightning_checkpoint(variant, tmp_path, tiny_ddconfig):
    torch.manual_seed(3)
    source = build_ours(variant, tiny_ddconfig)
    if variant == "EMAVQ":  # give the EMA statistics non-initial values
        source.train()(torch.rand(2, 3, 32, 32))
    sd = {("module." + k if variant == "NoDisc" else k): v for k, v in source.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)  # belongs to the loss
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, path)
    torch.manual_seed(4)
    loaded = build_ours(variant, tiny_ddconfig, ckpt_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_ckpt_path_ignore_keys_keep_initial_values(tmp_path, tiny_ddconfig):
    torch.manual_seed(3)
    source = build_ours("VQ", tiny_ddconfig)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)  # a plain state dict
    loaded = build_ours("VQ", tiny_ddconfig, ckpt_path=str(path), ignore_keys=["quantize"])
    assert not torch.equal(loaded.quantize.embedding.weight, source.quantize.embedding.weight)
    assert torch.equal(loaded.decoder.conv_out.weight, source.decoder.conv_out.weight)


def test_ckpt_path_reads_lightning_pickles_that_weights_only_refuses(tmp_path, tiny_ddconfig):
    """Real Lightning checkpoints carry OmegaConf hyper-parameters, which torch's
    weights_only loader refuses; ckpt_path still loads them, without running their code."""
    torch.manual_seed(3)
    source = build_ours("EMAVQ", tiny_ddconfig)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": OmegaConf.create({"n_embed": N_EMBED})},
               path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    loaded = build_ours("EMAVQ", tiny_ddconfig, ckpt_path=str(path))
    assert torch.equal(loaded.quantize.embedding.embed_avg, source.quantize.embedding.embed_avg)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, tiny_ddconfig):
    big = build_model(make_config(model_type="TamingVQGAN", model_variant="VQ", model_args=dict(
        ddconfig=tiny_ddconfig, n_embed=64, embed_dim=EMBED_DIM)))
    path = tmp_path / "big.ckpt"
    torch.save({"state_dict": big.state_dict()}, path)
    with pytest.raises(UserError) as err:
        build_ours("VQ", tiny_ddconfig, ckpt_path=str(path))
    msg = str(err.value)
    assert "quantize.embedding.weight: config (32, 8) vs checkpoint (64, 8)" in msg
    assert "n_embed" in msg and str(path) in msg


def test_variant_mismatch_is_explained(tiny_ddconfig):
    vq = build_ours("VQ", tiny_ddconfig)
    ema = build_ours("EMAVQ", tiny_ddconfig)
    with pytest.raises(UserError, match=r"embed_avg.*model_variant: EMAVQ"):
        load_model_weights(vq, ema.state_dict(), source="ema.ckpt")
    with pytest.raises(UserError, match=r"cluster_size.*model_variant: VQ"):
        load_model_weights(ema, vq.state_dict(), source="vq.ckpt")
    with pytest.raises(UserError, match="loss.*belong to the loss"):
        load_model_weights(vq, dict(vq.state_dict(), **{"loss.logvar": torch.zeros(())}))


def test_unreadable_checkpoint_is_a_user_error(tmp_path, tiny_ddconfig):
    with pytest.raises(UserError, match="not found"):
        build_ours("VQ", tiny_ddconfig, ckpt_path=str(tmp_path / "missing.ckpt"))
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.ckpt"):
        build_ours("VQ", tiny_ddconfig, ckpt_path=str(bad))


# ---- bad configs -----------------------------------------------------------------------

@pytest.mark.parametrize("variant,change,match", [
    ("VQ", {"n_embd": 16}, r"'n_embd' \(did you mean 'n_embed'"),
    ("NoDisc", {"remap": "x.npy"}, r"unknown argument.*'remap'.*VQ, EMAVQ, Gumbel take it"),
    ("Gumbel", {"embed_dim": 16}, r"embed_dim \(16\) must equal ddconfig.z_channels \(8\)"),
    ("VQ", {"ddconfig.ch": 16}, r"multiples of 32"),
    ("VQ", {"ddconfig.double_z": True}, r"double_z: false"),
    ("VQ", {"ddconfig.attn_type": "flash"}, r"attn_type: 'flash'"),
    ("VQ", {"remap": "/nonexistent/used.npy"}, r"remap: file not found"),
    ("VQ", {"n_embed": None}, r"missing n_embed"),
    ("VQ", {"use_ema": True}, r"use_ema"),
])
def test_bad_model_args(variant, change, match, tiny_ddconfig):
    args = dict(ddconfig=dict(tiny_ddconfig), n_embed=N_EMBED, embed_dim=EMBED_DIM)
    for key, value in change.items():
        if key.startswith("ddconfig."):
            args["ddconfig"][key.split(".", 1)[1]] = value
        else:
            args[key] = value
    with pytest.raises(UserError, match=match):
        build_model(make_config(model_type="TamingVQGAN", model_variant=variant, model_args=args))


def test_unknown_variant_is_a_user_error(tiny_ddconfig):
    with pytest.raises(UserError, match="EMAVQ"):
        build_ours("EMAQV", tiny_ddconfig)


# ---- full-size official configs (built on the meta device: shapes only, no memory) ------

F16 = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
           ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
OFFICIAL = {
    # taming configs/*: vqgan_imagenet_f16_1024 / _16384, vqgan_gumbel_f8
    "taming_f16_1024": ("VQ", F16, 1024, 256),
    "taming_f16_16384": ("VQ", F16, 16384, 256),
    "taming_f16_1024_emavq": ("EMAVQ", F16, 1024, 256),
    "taming_f16_1024_nodisc": ("NoDisc", F16, 1024, 256),
    "taming_gumbel_f8": ("Gumbel", dict(F16, ch_mult=[1, 1, 2, 4], attn_resolutions=[32]), 8192, 256),
    # latent-diffusion models/first_stage_models/vq-f4, vq-f8, vq-f16 (ldm.models.autoencoder.VQModel)
    "ldm_vq_f4": ("VQ", dict(F16, z_channels=3, ch_mult=[1, 2, 4], attn_resolutions=[]), 8192, 3),
    "ldm_vq_f8": ("VQ", dict(F16, z_channels=4, ch_mult=[1, 2, 2, 4], attn_resolutions=[32]), 16384, 4),
    "ldm_vq_f16": ("VQ", dict(F16, z_channels=8, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16]), 16384, 8),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_config_layouts(name, upstream):
    variant, ddconfig, n_embed, embed_dim = OFFICIAL[name]
    kwargs = dict(ddconfig=ddconfig, lossconfig=DUMMY_LOSS, n_embed=n_embed, embed_dim=embed_dim)
    cls = {"VQ": upstream.VQModel, "EMAVQ": upstream.VQModel, "Gumbel": upstream.GumbelVQ,
           "NoDisc": upstream.VQNoDiscModel}[variant]
    if variant == "Gumbel":
        kwargs["temperature_scheduler_config"] = TEMP_SCHED
    with torch.device("meta"):
        ref = shapes(quiet(cls, **kwargs))
        ours = shapes(build_model(make_config(model_type="TamingVQGAN", model_variant=variant, model_args=dict(
            ddconfig=ddconfig, n_embed=n_embed, embed_dim=embed_dim))))
    if variant == "EMAVQ":
        ref["quantize.embedding.cluster_size"] = (n_embed,)
        ref["quantize.embedding.embed_avg"] = (n_embed, embed_dim)
    assert ours == ref


def test_ldm_vq_f4_noattn_layout(upstream):
    """vq-f4-noattn sets ddconfig.attn_type: none -- no attention weights anywhere."""
    _, ddconfig, n_embed, embed_dim = OFFICIAL["ldm_vq_f4"]
    with torch.device("meta"):
        ref = shapes(quiet(upstream.VQModel, ddconfig=ddconfig, lossconfig=DUMMY_LOSS, n_embed=n_embed,
                           embed_dim=embed_dim))
        ours = shapes(build_model(make_config(model_type="TamingVQGAN", model_variant="VQ", model_args=dict(
            ddconfig=dict(ddconfig, attn_type="none"), n_embed=n_embed, embed_dim=embed_dim))))
    assert any(".attn_1." in k for k in ref)
    assert ours == {k: v for k, v in ref.items() if ".attn_1." not in k and ".attn." not in k}


def test_load_model_weights_details(tiny_ddconfig):
    torch.manual_seed(0)
    src = build_ours("VQ", tiny_ddconfig)
    dst = build_ours("VQ", tiny_ddconfig)
    # DDP and torch.compile prefixes, stacked, inside a Lightning-style wrapper
    wrapped = {"state_dict": {"module._orig_mod." + k: v for k, v in src.state_dict().items()}}
    assert load_model_weights(dst, wrapped) == ([], [])
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    # non-strict: what is missing / extra comes back instead of raising
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("decoder.")}
    partial["extra.weight"] = torch.zeros(1)
    missing, unexpected = load_model_weights(dst, partial, strict=False)
    assert unexpected == ["extra.weight"] and missing and all(k.startswith("decoder.") for k in missing)
    # strict: listed (first few, then a count) with the fix
    with pytest.raises(UserError, match=r"missing from the checkpoint: decoder\..*and \d+ more"):
        load_model_weights(dst, partial, source="part.ckpt")
    # not a state dict at all
    with pytest.raises(UserError, match="not tensors"):
        load_model_weights(dst, {"epoch": 3, **src.state_dict()})
    # several shape mismatches are all reported, each with its config entry to fix
    bigger = build_model(make_config(model_type="TamingVQGAN", model_variant="VQ", model_args=dict(
        ddconfig=dict(tiny_ddconfig, z_channels=16), n_embed=64, embed_dim=16)))
    with pytest.raises(UserError) as err:
        load_model_weights(dst, bigger.state_dict(), source="big.ckpt")
    msg = str(err.value)
    assert "encoder.conv_out.weight: config (8, 64, 3, 3) vs checkpoint (16, 64, 3, 3) (fix ddconfig" in msg
    assert msg.startswith("big.ckpt: 8 tensor shape(s) differ")
    assert "quantize.embedding.weight: config (32, 8) vs checkpoint (64, 16) (fix n_embed / embed_dim)" in msg
    assert "... and 3 more" in msg
