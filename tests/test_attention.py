"""SDPAAttnBlock (taming's AttnBlock on torch's scaled_dot_product_attention) against the
real upstream ``AttnBlock``, and the ``attn_impl`` / ``attn_type`` options of TamingVQGAN.

    .venv/bin/python -m pytest -q tests/test_attention.py
"""
import contextlib
import io

import pytest
import torch
from taming.modules.diffusionmodules.model import AttnBlock

from adapters import build_model
from adapters.registry import check_model_args, get_model_type
from adapters.taming_vqgan import ACCEPTED_ARGS, LinAttnBlock, SDPAAttnBlock, accepted_args
from adapters.weights import load_model_weights
from train.errors import ERROR, UserError
from train.schema import make_config

N_EMBED, EMBED_DIM = 32, 8
DUMMY_LOSS = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}


def build_ours(variant, ddconfig, **extra):
    args = dict(ddconfig=ddconfig, n_embed=N_EMBED, embed_dim=EMBED_DIM, **extra)
    return build_model(make_config(model_type="TamingVQGAN", model_variant=variant, model_args=args))


def shapes(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def randomize(module, seed):
    """Random weights everywhere, GroupNorm's affine included (default init leaves it 1/0),
    at the scale of trained layers: 1x1 convs with std fan_in ** -0.5 (outputs of order 1,
    so 1e-5 is an absolute bound on O(1) values), affine and biases near their defaults."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("weight") and p.dim() == 4:
                p.copy_(noise * p.shape[1] ** -0.5)
            elif name == "norm.weight":
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def attention_modules(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (AttnBlock, SDPAAttnBlock, LinAttnBlock))}


# ---- one block -------------------------------------------------------------------------

@pytest.mark.parametrize("b,c,h,w", [(1, 32, 8, 8), (2, 64, 8, 8), (2, 128, 16, 16), (3, 32, 7, 13),
                                     (1, 512, 4, 16), (2, 96, 1, 5)])
def test_sdpa_block_matches_upstream_attnblock(b, c, h, w):
    ref = AttnBlock(c)
    randomize(ref, seed=c + h * w)
    ours = SDPAAttnBlock.from_block(AttnBlock(c))
    assert shapes(ours) == shapes(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)

    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(h * w))
    x_ref = x.clone().requires_grad_(True)
    x_ours = x.clone().requires_grad_(True)
    out_ref = ref(x_ref)
    out_ours = ours(x_ours)
    torch.testing.assert_close(out_ours, out_ref, rtol=0, atol=1e-5)

    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(7))
    (out_ref * upstream).sum().backward()
    (out_ours * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("c", [32, 64, 96, 128, 256, 512, 1024])
def test_scale_is_upstreams(c):
    """Upstream scales by int(c) ** -0.5; SDPA's default is 1 / sqrt(c).  The block passes
    upstream's value explicitly; for taming's widths the two agree anyway."""
    q, k, v = torch.randn(3, 1, 1, 20, c, generator=torch.Generator().manual_seed(c)).unbind(0)
    explicit = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=int(c) ** (-0.5))
    default = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(explicit, default, rtol=0, atol=1e-6)
    scores = (q @ k.transpose(-1, -2) * int(c) ** (-0.5)).softmax(dim=-1)   # softmax over the keys
    torch.testing.assert_close(explicit, scores @ v, rtol=0, atol=1e-5)


# ---- whole models ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["VQ", "EMAVQ", "Gumbel", "NoDisc"])
def test_sdpa_and_vanilla_models_agree(variant, tiny_ddconfig):
    torch.manual_seed(3)
    vanilla = build_ours(variant, tiny_ddconfig, attn_impl="vanilla").eval()
    sdpa = build_ours(variant, tiny_ddconfig).eval()   # the default
    assert all(isinstance(m, SDPAAttnBlock) for m in attention_modules(sdpa).values())
    assert all(type(m) is AttnBlock for m in attention_modules(vanilla).values())
    assert attention_modules(sdpa).keys() == attention_modules(vanilla).keys()
    assert "encoder.mid.attn_1" in attention_modules(sdpa)
    assert shapes(sdpa) == shapes(vanilla)
    load_model_weights(sdpa, vanilla.state_dict(), strict=True, source="vanilla")

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)  # Gumbel samples noise even in eval mode
        rec_v, loss_v, codes_v = vanilla(x, return_codes=True)
        torch.manual_seed(5)
        rec_s, loss_s, codes_s = sdpa(x, return_codes=True)
    torch.testing.assert_close(rec_s, rec_v, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_s, loss_v, rtol=1e-4, atol=1e-6)
    if variant != "Gumbel":   # Gumbel's codes are sampled
        assert all(torch.equal(a, b) for a, b in zip(codes_s, codes_v))


@pytest.mark.parametrize("variant", ["VQ", "Gumbel", "NoDisc"])
def test_upstream_weights_load_strictly_into_the_sdpa_default(variant, tiny_ddconfig):
    from tests.conftest import import_upstream_vqgan

    vqgan = import_upstream_vqgan()
    cls = {"VQ": vqgan.VQModel, "Gumbel": vqgan.GumbelVQ, "NoDisc": vqgan.VQNoDiscModel}[variant]
    kwargs = dict(ddconfig=tiny_ddconfig, lossconfig=DUMMY_LOSS, n_embed=N_EMBED, embed_dim=EMBED_DIM)
    if variant == "Gumbel":
        kwargs["temperature_scheduler_config"] = {
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": dict(warm_up_steps=10, max_decay_steps=100, lr_start=0.9, lr_max=0.9, lr_min=1e-6)}
    torch.manual_seed(1)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = cls(**kwargs).eval()
    ours = build_ours(variant, tiny_ddconfig).eval()
    load_model_weights(ours, ref.state_dict(), strict=True, source="upstream")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)
        ref_rec, _ = ref(x)
        torch.manual_seed(5)
        rec, _ = ours(x)
    torch.testing.assert_close(rec, ref_rec, rtol=0, atol=1e-5)


def test_attn_type_options(tiny_ddconfig):
    vanilla = build_ours("VQ", tiny_ddconfig, attn_impl="vanilla")
    # latent-diffusion's vanilla-xformers: same weights, computed by SDPA
    xformers = build_ours("VQ", dict(tiny_ddconfig, attn_type="vanilla-xformers"))
    assert shapes(xformers) == shapes(vanilla)
    assert attention_modules(xformers).keys() == attention_modules(vanilla).keys()
    assert all(isinstance(m, SDPAAttnBlock) for m in attention_modules(xformers).values())
    upstream_kernel = build_ours("VQ", dict(tiny_ddconfig, attn_type="vanilla-xformers"), attn_impl="vanilla")
    assert all(type(m) is AttnBlock for m in attention_modules(upstream_kernel).values())
    # none builds no attention whatever the kernel; linear stays latent-diffusion's LinAttnBlock
    for impl in ("sdpa", "vanilla"):
        none = build_ours("VQ", dict(tiny_ddconfig, attn_type="none"), attn_impl=impl)
        assert attention_modules(none) == {}
        assert not any(".q.weight" in k or "to_qkv" in k for k in none.state_dict())
        linear = build_ours("VQ", dict(tiny_ddconfig, attn_type="linear"), attn_impl=impl)
        mods = attention_modules(linear)
        assert mods and all(type(m) is LinAttnBlock for m in mods.values())


# ---- validation ------------------------------------------------------------------------

def findings_for(variant, tiny_ddconfig, **extra):
    args = dict(ddconfig=tiny_ddconfig, n_embed=N_EMBED, embed_dim=EMBED_DIM, **extra)
    return check_model_args(get_model_type("TamingVQGAN"), {"model_args": args}, variant)


@pytest.mark.parametrize("variant", sorted(ACCEPTED_ARGS))
def test_attn_impl_is_accepted_by_every_variant(variant, tiny_ddconfig):
    assert "attn_impl" in accepted_args(variant)[0]
    for impl in ("sdpa", "vanilla"):
        assert not [f for f in findings_for(variant, tiny_ddconfig, attn_impl=impl) if f.level == ERROR]
    assert not [f for f in findings_for(variant, dict(tiny_ddconfig, attn_type="vanilla-xformers"))
                if f.level == ERROR]


@pytest.mark.parametrize("value,fixed", [("flash", None), ("SDPA", "sdpa"), (" Vanilla", "vanilla"),
                                         (1, None), ("", None)])
def test_bad_attn_impl_is_a_finding_with_the_fix(value, fixed, tiny_ddconfig):
    found = [f for f in findings_for("VQ", tiny_ddconfig, attn_impl=value) if f.path == "model_args.attn_impl"]
    assert len(found) == 1
    f = found[0]
    assert f.level == ERROR and f.code == "bad_value"
    assert f"attn_impl: {value!r} is not one of sdpa, vanilla" in f.message
    if fixed:
        assert f.fix == f"write attn_impl: {fixed}" and f.ops == [("model_args.attn_impl", fixed)]
    else:
        assert "sdpa" in f.fix and "vanilla" in f.fix and f.ops == []
    with pytest.raises(UserError, match="attn_impl"):
        build_ours("VQ", tiny_ddconfig, attn_impl=value)


def test_empty_attn_impl_is_the_default(tiny_ddconfig):
    assert not [f for f in findings_for("VQ", tiny_ddconfig, attn_impl=None) if f.path == "model_args.attn_impl"]
    model = build_ours("VQ", tiny_ddconfig, attn_impl=None)
    assert isinstance(model.encoder.mid.attn_1, SDPAAttnBlock)


def test_bad_attn_type_names_vanilla_xformers(tiny_ddconfig):
    found = [f for f in findings_for("VQ", dict(tiny_ddconfig, attn_type="xformers"))
             if f.path == "model_args.ddconfig.attn_type"]
    assert len(found) == 1 and "vanilla-xformers" in found[0].fix


def test_sdpa_gets_contiguous_inputs(monkeypatch):
    """The fused CPU kernel needs a unit-stride last dimension; strided q/k/v fall back to the
    math path, which materialises the (h*w)^2 scores (benchmarks/bench_attention.py)."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(all(t.is_contiguous() for t in (q, k, v)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    SDPAAttnBlock.from_block(AttnBlock(32))(torch.randn(2, 32, 5, 7))
    assert seen == [True]
