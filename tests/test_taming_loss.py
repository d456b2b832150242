"""TamingLossCalculator against taming's real VQLPIPSWithDiscriminator (identical weights)."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taming.modules.losses import vqperceptual
from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

from losses.calculator import GeneratorOutput, LossCalculator
from losses.perceptual import build_taming_lpips
from losses.taming_loss import TamingLossCalculator
from train.errors import UserError
from train.schema import make_config

DISC_START = 5
# A small discriminator keeps the tests fast; everything else is taming's default.
PARAMS = dict(disc_start=DISC_START, disc_ndf=16, disc_num_layers=2, disc_weight=0.8, codebook_weight=1.0)
GEN_KEYS = {"total_loss", "quant_loss", "nll_loss", "rec_loss", "p_loss", "d_weight", "disc_factor", "g_loss"}
DISC_KEYS = {"disc_loss", "logits_real", "logits_fake"}


@pytest.fixture(autouse=True)
def no_hub_cache(tmp_path, monkeypatch):
    """No VGG16 in the hub cache: only explicit files or the random-trunk option count."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def make_pair(monkeypatch, perceptual=True, use_gan=True, **overrides):
    """Our calculator and taming's own class, with the same weights."""
    params = dict(PARAMS, perceptual_weight=1.0 if perceptual else 0.0, **overrides)
    torch.manual_seed(0)
    calc = TamingLossCalculator(use_gan=use_gan, allow_random_vgg=True, **params)
    with monkeypatch.context() as patch:
        # taming's constructor downloads LPIPS; give it the offline one (random trunk, overwritten below)
        patch.setattr(vqperceptual, "LPIPS", lambda: build_taming_lpips(allow_random_vgg=True))
        ref = VQLPIPSWithDiscriminator(**params)
    missing, unexpected = ref.load_state_dict(calc.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith("perceptual_loss.") for k in missing) and (perceptual or missing)
    assert perceptual == (not missing)
    return calc, ref


def graph_inputs(seed=1):
    """Leaves and a reconstruction that depends on a 'last layer' weight, as in a decoder."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 8, 32, 32, generator=g).requires_grad_()
    last = nn.Parameter(torch.randn(3, 8, 3, 3, generator=g) * 0.1)
    x = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_()
    return h, last, x


def run(loss_fn, optimizer_idx, step, seed=1, split="train"):
    h, last, x = graph_inputs(seed)
    xrec = torch.tanh(F.conv2d(h, last, padding=1))
    codebook_loss = 0.1 * (h ** 2).mean()
    torch.manual_seed(123)   # LPIPS' lin layers keep dropout in train mode, as upstream
    loss, log = loss_fn(codebook_loss, x, xrec, optimizer_idx, step, last_layer=last, split=split)
    wrt = [t for t in (x, h, last) if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * 3
    return loss.detach(), log, grads


def assert_same(ours, theirs, skip_keys=()):
    loss, log, grads = ours
    rloss, rlog, rgrads = theirs
    assert torch.allclose(loss, rloss, atol=1e-5, rtol=1e-5), (loss, rloss)
    assert set(log) == set(rlog)
    for key in log:
        if key.split("/")[1] in skip_keys:
            continue
        assert torch.allclose(log[key].float().cpu(), rlog[key].float().cpu(), atol=1e-5, rtol=1e-5), key
    for g, rg in zip(grads, rgrads):
        if rg is None or g is None:
            assert (g is None or not g.any()) and (rg is None or not rg.any())
        else:
            assert torch.allclose(g, rg, atol=1e-5, rtol=1e-4)


# ---- drop-in numerics --------------------------------------------------------------------

@pytest.mark.parametrize("perceptual", [True, False])
@pytest.mark.parametrize("optimizer_idx", [0, 1])
@pytest.mark.parametrize("step", [DISC_START - 3, DISC_START, DISC_START + 2])
def test_equals_taming_forward(monkeypatch, perceptual, optimizer_idx, step):
    calc, ref = make_pair(monkeypatch, perceptual=perceptual)
    theirs = run(ref, optimizer_idx, step)
    ref.load_state_dict(calc.state_dict(), strict=False)   # undo BatchNorm statistics updates
    ours = run(calc, optimizer_idx, step)
    before_start = step < DISC_START
    # before disc_start the GAN term is not computed: d_weight and g_loss are logged as 0
    skipped = ("d_weight", "g_loss") if (optimizer_idx == 0 and before_start) else ()
    assert_same(ours, theirs, skip_keys=skipped)
    prefix = "train/"
    assert {k[len(prefix):] for k in ours[1]} == (GEN_KEYS if optimizer_idx == 0 else DISC_KEYS)
    if skipped:
        assert float(ours[1]["train/d_weight"]) == 0 and float(ours[1]["train/g_loss"]) == 0
        assert float(theirs[1]["train/g_loss"]) != 0   # upstream did compute it, and threw it away
    if optimizer_idx == 0 and not before_start:
        assert float(ours[1]["train/d_weight"]) > 0   # the adaptive weight really ran


def test_equals_taming_in_eval_mode_and_other_split(monkeypatch):
    calc, ref = make_pair(monkeypatch)
    calc.eval(), ref.eval()
    for idx in (0, 1):
        assert_same(run(calc, idx, DISC_START + 1, split="val"), run(ref, idx, DISC_START + 1, split="val"))


@pytest.mark.parametrize("optimizer_idx", [0, 1])
@pytest.mark.parametrize("step", [0, DISC_START + 2])
def test_use_gan_false_equals_taming_with_disc_factor_zero(monkeypatch, optimizer_idx, step):
    calc, ref = make_pair(monkeypatch, use_gan=False)
    ref.disc_factor = 0.0   # the seed's approach: taming's loss with disc_factor forced to 0
    theirs = run(ref, optimizer_idx, step)
    ref.load_state_dict(calc.state_dict(), strict=False)
    ours = run(calc, optimizer_idx, step)
    assert_same(ours, theirs, skip_keys=("d_weight", "g_loss") if optimizer_idx == 0 else ())
    if optimizer_idx == 0:
        assert float(ours[1]["train/disc_factor"]) == 0.0
        assert float(ours[1]["train/d_weight"]) == 0.0 and float(ours[1]["train/g_loss"]) == 0.0
    else:
        assert float(ours[0]) == 0.0


def test_disc_weight_zero_skips_the_gan_term_with_the_same_loss(monkeypatch):
    calc, ref = make_pair(monkeypatch, perceptual=False, disc_weight=0.0)
    assert not calc.gan_term_active(DISC_START + 1)
    assert_same(run(calc, 0, DISC_START + 1), run(ref, 0, DISC_START + 1), skip_keys=("g_loss",))


# ---- what is not computed ----------------------------------------------------------------

class Counter:
    def __init__(self, monkeypatch, calc):
        self.disc_calls = 0
        self.grad_calls = 0
        calc.discriminator.register_forward_hook(self._on_disc)
        real_grad = torch.autograd.grad

        def counting_grad(*args, **kwargs):
            self.grad_calls += 1
            return real_grad(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", counting_grad)
        self.real_grad = real_grad

    def _on_disc(self, *_):
        self.disc_calls += 1


def _generator_loss(calc, step):
    h, last, x = graph_inputs()
    xrec = torch.tanh(F.conv2d(h, last, padding=1))
    return calc(0.1 * (h ** 2).mean(), x, xrec, 0, step, last_layer=last)


@pytest.mark.parametrize("use_gan,step,expect_gan", [(False, 0, False), (False, DISC_START + 10, False),
                                                     (True, DISC_START - 1, False), (True, DISC_START, True)])
def test_gan_work_is_skipped_when_its_factor_is_zero(monkeypatch, use_gan, step, expect_gan):
    calc, _ = make_pair(monkeypatch, perceptual=False, use_gan=use_gan)
    count = Counter(monkeypatch, calc)
    loss, _ = _generator_loss(calc, step)
    loss.backward()
    # upstream always runs the discriminator once and autograd.grad twice here
    assert count.disc_calls == (1 if expect_gan else 0)
    assert count.grad_calls == (2 if expect_gan else 0)


@pytest.mark.parametrize("use_gan,step", [(False, 0), (False, 50), (True, 1)])
def test_generator_step_skips_gan_work_too(monkeypatch, use_gan, step):
    from adapters import build_model

    cfg = make_cfg(use_gan=use_gan)     # disc_start 2
    model, calc = build_model(cfg), TamingLossCalculator.build(cfg)
    count = Counter(monkeypatch, calc)
    out = calc.generator_step(model, _batch(), step)
    out.loss.backward()
    assert count.disc_calls == 0 and count.grad_calls == 0
    assert not calc.should_update_discriminator(step)


# ---- the schedule ------------------------------------------------------------------------

def test_schedule_and_cadence(monkeypatch):
    calc = TamingLossCalculator(disc_update_every=3, **dict(PARAMS, perceptual_weight=0.0, disc_start=4))
    assert calc.use_gan and calc.disc_start == 4
    assert [s for s in range(12) if calc.should_update_discriminator(s)] == [6, 9]
    assert calc.disc_factor_at(3) == 0.0 and calc.disc_factor_at(4) == 1.0
    every1 = TamingLossCalculator(**dict(PARAMS, perceptual_weight=0.0, disc_start=4, disc_factor=0.5))
    assert [s for s in range(8) if every1.should_update_discriminator(s)] == [4, 5, 6, 7]
    assert every1.disc_factor_at(10) == 0.5


def test_use_gan_false_warns_once_and_never_schedules(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="losses.taming_loss"):
        calc = TamingLossCalculator(use_gan=False, **dict(PARAMS, perceptual_weight=0.0, disc_start=0))
        for step in range(3):
            loss, log = _generator_loss(calc, step)
            assert float(log["train/disc_factor"]) == 0.0
    records = [r for r in caplog.records if r.name == "losses.taming_loss"]
    assert len(records) == 1 and "use_gan" in records[0].getMessage()
    assert "disc_factor is 0" in records[0].getMessage()
    assert not any(calc.should_update_discriminator(s) for s in range(0, 100000, 7))
    assert all(calc.disc_factor_at(s) == 0.0 for s in (0, 10, 10 ** 6))
    assert calc.discriminator is not None   # kept for checkpoint compatibility


# ---- state dicts -------------------------------------------------------------------------

def test_state_dict_keys_are_tamings(monkeypatch):
    calc, ref = make_pair(monkeypatch, perceptual=True)
    assert list(calc.state_dict()) == list(ref.state_dict())
    assert isinstance(calc, VQLPIPSWithDiscriminator) and isinstance(calc, LossCalculator)
    # loss.* entries of an upstream checkpoint load strictly
    ckpt = {f"loss.{k}": v.clone() + 1 for k, v in ref.state_dict().items() if v.is_floating_point()}
    ckpt.update({f"loss.{k}": v for k, v in ref.state_dict().items() if not v.is_floating_point()})
    calc.load_state_dict({k[len("loss."):]: v for k, v in ckpt.items() if k.startswith("loss.")}, strict=True)
    for key, value in calc.state_dict().items():
        assert torch.equal(value, ckpt[f"loss.{key}"])


def test_without_perceptual_no_trunk_and_upstream_state_dicts_still_load(monkeypatch):
    calc, ref = make_pair(monkeypatch, perceptual=False)
    assert not calc.has_perceptual and not hasattr(calc, "perceptual_loss")
    assert not any(k.startswith("perceptual_loss.") for k in calc.state_dict())
    assert {k for k in ref.state_dict() if not k.startswith("perceptual_loss.")} == set(calc.state_dict())
    upstream = {k: (v + 1 if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    calc.load_state_dict(upstream, strict=True)   # the LPIPS constants are dropped, nothing else
    assert torch.equal(calc.discriminator.main[0].weight, upstream["discriminator.main.0.weight"])
    # nested as in a whole-model checkpoint
    holder = nn.Module()
    holder.loss = calc
    holder.load_state_dict({f"loss.{k}": v for k, v in upstream.items()}, strict=True)


# ---- build(cfg) --------------------------------------------------------------------------

DDCONFIG = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)


CFG_PARAMS = dict(disc_start=2, perceptual_weight=0.0, disc_ndf=16, disc_num_layers=2)


def make_cfg(loss_params=None, variant="VQ", ddconfig=None, **train):
    params = dict(CFG_PARAMS)
    params.update(loss_params or {})
    return make_config(name="t", model_type="TamingVQGAN", model_variant=variant,
                       model_args={"embed_dim": 8, "n_embed": 16, "ddconfig": ddconfig or dict(DDCONFIG)},
                       lossconfig={"target": vqperceptual.__name__ + ".VQLPIPSWithDiscriminator",
                                   "params": params},
                       train=dict({"use_gan": True}, **train))


def test_build_from_config_and_dictconfig():
    from omegaconf import OmegaConf

    cfg = make_cfg({"disc_weight": 0.8}, ddconfig=dict(DDCONFIG, out_ch=1), disc_update_every=3)
    for source in (cfg, OmegaConf.structured(cfg)):
        calc = LossCalculator.from_config(source)
        assert type(calc) is TamingLossCalculator and calc.family == "taming"
        assert calc.discriminator.main[0].in_channels == 1      # disc_in_channels from ddconfig.out_ch
        assert calc.discriminator_weight == 0.8 and calc.disc_update_every == 3 and calc.disc_start == 2


@pytest.mark.parametrize("params,train,match", [
    ({"disc_strat": 3}, {}, "disc_strat.*Did you mean 'disc_start'"),
    ({"disc_loss": "wasserstein"}, {}, "disc_loss.*hinge, vanilla"),
    ({"perceptual_weight": 1.0}, {}, "vgg16-397923af.pth"),
    ({"perceptual_weight": 1.0}, {"vgg_ckpt_path": "/nonexistent/vgg16.pth"}, "/nonexistent/vgg16.pth"),
    ({}, {"disc_update_every": 0}, "disc_update_every"),
    ({"disc_start": "soon"}, {}, "disc_start must be a whole number"),
    ({"disc_num_layers": 2.5}, {}, "disc_num_layers must be a whole number"),
    ({"disc_weight": "heavy"}, {}, "disc_weight must be a number"),
    ({"disc_conditional": True}, {}, "disc_conditional"),
])
def test_bad_configs_are_user_errors(params, train, match):
    with pytest.raises(UserError, match=match):
        TamingLossCalculator.build(make_cfg(params, **train))


def test_numbers_written_as_strings_or_floats_are_converted():
    calc = TamingLossCalculator.build(make_cfg({"disc_start": "1e4", "disc_weight": "0.8", "disc_ndf": 16.0}))
    assert calc.disc_start == 10000 and isinstance(calc.disc_start, int)
    assert calc.discriminator_weight == 0.8 and calc.discriminator.main[0].out_channels == 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generator_step_under_autocast(model_and_calc, dtype):
    """fp16 autocast takes taming's own forward (its backward is the scaled one); bf16 the one-pass path."""
    model, calc = model_and_calc
    with torch.autocast("cpu", dtype=dtype):
        out = calc.generator_step(model, _batch(), 4)
    assert ("logits_fake" in out.extra) == (dtype == torch.bfloat16)
    out.loss.float().backward()
    assert model.get_last_layer().grad is not None
    assert all(p.grad is None for p in calc.discriminator.parameters())
    with torch.autocast("cpu", dtype=dtype):
        d_loss, _ = calc.discriminator_step(out, 4)
    d_loss.float().backward()
    assert torch.isfinite(d_loss) and all(p.grad is not None for p in calc.discriminator.parameters())


def test_missing_disc_start_is_a_user_error():
    cfg = make_cfg()
    del cfg.lossconfig.params["disc_start"]
    with pytest.raises(UserError, match="disc_start"):
        TamingLossCalculator.build(cfg)


def test_random_trunk_through_the_config_option(caplog):
    with caplog.at_level(logging.WARNING):
        calc = TamingLossCalculator.build(make_cfg({"perceptual_weight": 1.0}, allow_random_vgg=True))
    assert calc.has_perceptual and any("RANDOM" in r.getMessage() for r in caplog.records)


def test_nodisc_variant_turns_the_gan_off(caplog):
    with caplog.at_level(logging.WARNING, logger="losses.taming_loss"):
        calc = TamingLossCalculator.build(make_cfg(variant="NoDisc"))
    assert not calc.use_gan and "NoDisc" in caplog.records[0].getMessage()


# ---- the trainer's API -------------------------------------------------------------------

@pytest.fixture
def model_and_calc():
    from adapters import build_model

    cfg = make_cfg()
    torch.manual_seed(0)
    return build_model(cfg), TamingLossCalculator.build(cfg)


def _batch():
    return {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1}


def make_ref(monkeypatch, calc, **params):
    with monkeypatch.context() as patch:
        patch.setattr(vqperceptual, "LPIPS", lambda: build_taming_lpips(allow_random_vgg=True))
        ref = VQLPIPSWithDiscriminator(**dict(CFG_PARAMS, **params))
    ref.load_state_dict(calc.state_dict(), strict=False)
    return ref


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


# steps with disc_update_every=2, disc_start=2: 0 no GAN term; 2 GAN + D step (D(fake) kept);
# 3 GAN term but no D step (D frozen, nothing kept)
@pytest.mark.parametrize("step,kept", [(0, False), (2, True), (3, False)])
def test_generator_step_equals_taming_on_the_model_output(monkeypatch, step, kept):
    from adapters import build_model

    cfg = make_cfg(disc_update_every=2)
    torch.manual_seed(0)
    model, calc = build_model(cfg), TamingLossCalculator.build(cfg)
    ref = make_ref(monkeypatch, calc)
    batch = _batch()
    out = calc.generator_step(model, batch, step)
    assert isinstance(out, GeneratorOutput)
    assert not out.reconstructions.requires_grad and out.inputs is batch["image"]
    assert out.codes[0].shape == (2, 16, 16) and out.codes[0].dtype == torch.long and len(out.codes) == 1
    assert ("logits_fake" in out.extra) == kept
    out.loss.backward()
    assert all(p.grad is None for p in calc.discriminator.parameters())
    ours = _grads(model.parameters())
    model.zero_grad(set_to_none=True)
    # taming: the generator pass of its Lightning loop (discriminator frozen by toggle_optimizer)
    xrec, qloss = model(batch["image"])
    for p in ref.discriminator.parameters():
        p.requires_grad_(False)
    rloss, rlog = ref(qloss, batch["image"], xrec, 0, step, last_layer=model.get_last_layer())
    rloss.backward()
    theirs = _grads(model.parameters())
    assert torch.allclose(out.loss, rloss, atol=1e-6)
    for (name, _), g, rg in zip(model.named_parameters(), ours, theirs):
        assert (g is None) == (rg is None), name
        if g is not None:
            assert torch.allclose(g, rg, atol=1e-6, rtol=1e-4), name
    for key, value in rlog.items():
        if step < 2 and key in ("train/d_weight", "train/g_loss"):
            continue
        assert torch.allclose(out.log[key].cpu(), value.cpu(), atol=1e-6), key
    if step >= 2:
        assert float(out.log["train/d_weight"]) > 0


def test_no_gradient_leaks_between_the_two_updates(model_and_calc):
    model, calc = model_and_calc
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    d_calls = []
    calc.discriminator.register_forward_hook(lambda *_: d_calls.append(1))
    step = 3
    assert calc.gan_term_active(step) and calc.should_update_discriminator(step)

    out = calc.generator_step(model, _batch(), step)
    out.loss.backward()
    assert all(p.grad is None for p in calc.discriminator.parameters())
    assert all(p.requires_grad for p in calc.discriminator.parameters())   # unfrozen again
    assert model.get_last_layer().grad is not None

    model.zero_grad(set_to_none=True)
    d_loss, d_log = calc.discriminator_step(out, step)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in calc.discriminator.parameters())
    assert set(d_log) == {f"train/{k}" for k in DISC_KEYS} and float(d_loss.detach()) > 0
    assert len(calls) == 1     # one generator forward per iteration (taming's loop: 2)
    assert len(d_calls) == 2   # D(fake) once, D(real) once (taming: D(fake) twice)


@pytest.mark.parametrize("reuse", [True, False])
def test_discriminator_step_equals_tamings_second_pass(monkeypatch, model_and_calc, reuse):
    model, calc = model_and_calc
    calc.reuse_fake_logits = reuse
    ref = make_ref(monkeypatch, calc)
    batch = _batch()
    out = calc.generator_step(model, batch, 4)
    assert ("logits_fake" in out.extra) == reuse
    out.loss.backward()
    d_loss, d_log = calc.discriminator_step(out, 4)
    d_loss.backward()
    # taming's Lightning loop: a second generator forward, then optimizer_idx=1
    xrec, qloss = model(batch["image"])
    r_loss, r_log = ref(qloss, batch["image"], xrec, 1, 4, last_layer=model.get_last_layer())
    r_loss.backward()
    assert torch.allclose(d_loss, r_loss, atol=1e-6)
    for key in r_log:
        assert torch.allclose(d_log[key], r_log[key], atol=1e-6)
    for p, rp in zip(calc.discriminator.parameters(), ref.discriminator.parameters()):
        assert torch.allclose(p.grad, rp.grad, atol=1e-6, rtol=1e-4)


def test_a_kept_fake_graph_is_not_used_for_another_step(model_and_calc):
    model, calc = model_and_calc
    out = calc.generator_step(model, _batch(), 4)
    assert "logits_fake" in out.extra
    count = []
    calc.discriminator.register_forward_hook(lambda *_: count.append(1))
    calc.discriminator_step(out, 5)
    assert len(count) == 2 and "logits_fake" not in out.extra


@pytest.mark.parametrize("training", [True, False])
def test_generator_step_without_autograd(monkeypatch, model_and_calc, training):
    """Validation under no_grad: taming's eval-mode values (d_weight 0), in either mode."""
    model, calc = model_and_calc
    ref = make_ref(monkeypatch, calc)
    calc.train(training)
    ref.eval()
    calc.discriminator.train(training)
    ref.discriminator.train(training)
    with torch.no_grad():
        out = calc.generator_step(model, _batch(), 4, split="val")
        xrec, qloss = model(_batch()["image"])
        rloss, rlog = ref(qloss, _batch()["image"], xrec, 0, 4, last_layer=model.get_last_layer(), split="val")
    assert torch.allclose(out.loss, rloss, atol=1e-6)
    for key, value in rlog.items():
        assert torch.allclose(out.log[key], value, atol=1e-6), key
    assert float(out.log["val/d_weight"]) == 0.0


class FakeWrapper(nn.Module):
    """Stands for DDP: holds the model as ``.module`` and must be called itself."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_wrapped_model_is_called_through_the_wrapper(model_and_calc):
    model, calc = model_and_calc
    wrapped = FakeWrapper(model)
    out = calc.generator_step(wrapped, _batch(), 3)
    assert wrapped.calls == 1 and out.codes[0].shape == (2, 16, 16)
    out.loss.backward()
    assert model.get_last_layer().grad is not None


def test_real_ddp_single_process(tmp_path, model_and_calc):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, calc = model_and_calc
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        out = calc.generator_step(ddp, _batch(), 3)
        out.loss.backward()
        assert model.get_last_layer().grad is not None
        assert all(p.grad is None for p in calc.discriminator.parameters())
    finally:
        dist.destroy_process_group()


class PlainModel(nn.Module):
    """A model that answers the contract with no codebook (no code maps)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, return_codes=False):
        return (self.conv(x), torch.zeros(())) + (((),) if return_codes else ())

    def get_last_layer(self):
        return self.conv.weight


def test_model_without_codebooks(model_and_calc):
    _, calc = model_and_calc
    out = calc.generator_step(PlainModel(), _batch(), 3)
    assert out.codes == () and out.loss.requires_grad
