"""DinoVQ: the reference API and keys, the loss family, gradient isolation, the calculator."""
import os

import pytest
import torch
import torch.nn.functional as F

import losses.dinovq_loss as dl
from adapters.dinovq import DinoVQNet, build_dinovq, teacher_features_hook
from losses.dinovq_loss import DinoVQLossCalculator, FeatureShapeError
from losses.dinovq_model import DinoVQModel
from train.errors import UserError
from train.schema import make_config

# 32 px images, 8 px patches -> 16 tokens; teacher width 24.
TINY = dict(img_size=(32, 32), patch_size=8, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
            decoder_depth=1, dino_head_depth=1, codebook_size=16, codebook_dim=8, dino_dim=24)
GAN = dict(use_gan=True, disc_start=2, disc_weight=0.5, disc_dim=8, disc_num_layers=2,
           disc_adaptive_weight=True)
BASE_KEYS = {"total_loss", "dino_loss", "recon_loss", "vq_loss",
             "dino_loss_weighted", "recon_loss_weighted", "vq_loss_weighted"}
DISC_KEYS = {"disc_loss", "disc_weight", "logits_real", "logits_fake"}


def batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    feats = torch.randn(b, 16, 24, generator=g)
    return imgs, feats


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return DinoVQModel(**{**TINY, **kw})


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision-vgg16-shaped trunk file (random weights, written here)."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    features = vgg16(weights=None).features
    path = str(tmp_path_factory.mktemp("vgg") / "vgg16.pth")
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


# ---- seed snippets -------------------------------------------------------------------

def test_seed_default_snippet_keys_and_backward():
    # Seed 000, "不使用可选loss (默认)", with tiny sizes.
    model = DinoVQModel(
        img_size=(32, 32), encoder_embed_dim=32, codebook_size=16,
        dino_loss_weight=1.0, recon_loss_weight=1.0, vq_loss_weight=1.0,
        patch_size=8, dino_dim=24, encoder_depth=1, encoder_num_heads=2, decoder_depth=1,
        dino_head_depth=1, codebook_dim=8)
    imgs, dino_features_gt = batch()
    losses = model.compute_loss(imgs, dino_features_gt)
    assert set(losses) == BASE_KEYS
    total_loss = losses["total_loss"]
    total_loss.backward()
    assert model.pixel_head.weight.grad is not None and model.patch_embed.weight.grad is not None
    assert model.loss_fn.discriminator is None and model.use_gan is False


def test_seed_perceptual_snippet(vgg_file):
    model = make(use_perceptual=True, perceptual_weight=1.0, vgg_ckpt_path=vgg_file)
    imgs, gt = batch()
    losses = model.compute_loss(imgs, gt)
    assert set(losses) == BASE_KEYS | {"perceptual_loss", "perceptual_loss_weighted"}
    # The term is taming's LPIPS built from the same files.
    from losses.perceptual import build_taming_lpips

    lpips = build_taming_lpips(vgg_ckpt_path=vgg_file)
    with torch.no_grad():
        recon = model(imgs, update_codebook=False)[0]
        expected = lpips(imgs, recon).mean()
    losses = model.compute_loss(imgs, gt)
    assert torch.allclose(losses["perceptual_loss"], expected, rtol=1e-4, atol=1e-6)
    losses["total_loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.loss_fn.perceptual.parameters())


def test_perceptual_without_vgg_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="vgg_ckpt_path"):
        make(use_perceptual=True, vgg_ckpt_path=str(tmp_path / "missing.pth"))


def test_gan_keys_generator_and_discriminator():
    model = make(**GAN)
    imgs, gt = batch()
    g = model.compute_loss(imgs, gt, update_type="generator", global_step=5)
    assert set(g) == BASE_KEYS | {"gen_adv_loss", "gen_adv_loss_weighted"}
    d = model.compute_loss(imgs, gt, update_type="discriminator", global_step=5)
    assert set(d) == DISC_KEYS
    assert float(d["disc_weight"]) == 1.0
    all_on = make(**GAN, use_perceptual=True, allow_random_vgg=True)
    keys = set(all_on.compute_loss(imgs, gt, global_step=5))
    assert keys == BASE_KEYS | {"perceptual_loss", "perceptual_loss_weighted", "gen_adv_loss",
                                "gen_adv_loss_weighted"}


# ---- values ------------------------------------------------------------------------------

def test_unweighted_values_are_unweighted_and_total_is_the_sum():
    imgs, gt = batch()
    a = make(seed=3).compute_loss(imgs, gt)
    b = make(seed=3, dino_loss_weight=2.0, recon_loss_weight=3.0, vq_loss_weight=0.5).compute_loss(imgs, gt)
    for key in ("dino_loss", "recon_loss", "vq_loss"):
        assert torch.allclose(a[key], b[key])
    assert torch.allclose(b["dino_loss_weighted"], 2.0 * b["dino_loss"])
    assert torch.allclose(b["recon_loss_weighted"], 3.0 * b["recon_loss"])
    assert torch.allclose(b["vq_loss_weighted"], 0.5 * b["vq_loss"])
    total = b["dino_loss_weighted"] + b["recon_loss_weighted"] + b["vq_loss_weighted"]
    assert torch.allclose(b["total_loss"], total)


def test_terms_match_their_definitions():
    model = make(seed=1)
    imgs, gt = batch()
    model.eval()  # no EMA move between the two forwards
    with torch.no_grad():
        out = model(imgs, return_dict=True)
        losses = model.compute_loss(imgs, gt)
    cos = F.cosine_similarity(out["dino_pred"], gt, dim=-1)
    assert torch.allclose(losses["dino_loss"], 1 - cos.mean(), atol=1e-6)
    assert torch.allclose(losses["recon_loss"], F.mse_loss(out["reconstructions"], imgs), atol=1e-6)
    z = model.encode(imgs)
    zq = model.quantize.embedding[out["indices"].reshape(2, -1)]
    assert torch.allclose(losses["vq_loss"], F.mse_loss(z, zq), atol=1e-6)
    assert out["indices"].shape == (2, 4, 4) and out["dino_pred"].shape == (2, 16, 24)


def test_adaptive_weight_is_vqgans():
    model = make(seed=2, **GAN)
    imgs, gt = batch()
    model.eval()
    losses = model.compute_loss(imgs, gt, global_step=2)
    last = model.get_last_layer()
    nll_g = torch.autograd.grad(losses["recon_loss_weighted"], last, retain_graph=True)[0]
    g_g = torch.autograd.grad(losses["gen_adv_loss"], last, retain_graph=True)[0]
    d_weight = (nll_g.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    assert torch.allclose(losses["gen_adv_loss_weighted"], d_weight * losses["gen_adv_loss"], rtol=1e-4)
    fixed = make(seed=2, **{**GAN, "disc_adaptive_weight": False})
    fixed.eval()
    out = fixed.compute_loss(imgs, gt, global_step=2)
    assert torch.allclose(out["gen_adv_loss_weighted"], 0.5 * out["gen_adv_loss"])


# ---- errors ------------------------------------------------------------------------------

def test_discriminator_update_without_gan_is_a_clear_error():
    model = make()
    with pytest.raises(ValueError, match="use_gan"):
        model.compute_loss(*batch(), update_type="discriminator")
    with pytest.raises(ValueError, match="update_type"):
        model.compute_loss(*batch(), update_type="both")


def test_wrong_feature_shape_names_expected_and_received():
    model = make()
    imgs, _ = batch()
    with pytest.raises(FeatureShapeError) as info:
        model.compute_loss(imgs, torch.randn(2, 49, 768))
    msg = str(info.value)
    assert "(2, 16, 24)" in msg and "(2, 49, 768)" in msg and "dino_dim" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="patch_size"):
        DinoVQModel(**{**TINY, "img_size": 36})
    with pytest.raises(UserError, match="num_heads"):
        DinoVQModel(**{**TINY, "encoder_num_heads": 3})
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        make()(torch.zeros(1, 3, 64, 64))


# ---- gradient isolation and skipped work ---------------------------------------------------

def _disc_calls(model):
    calls = []
    model.loss_fn.discriminator.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_generator_update_never_reaches_the_discriminator():
    model = make(**GAN)
    imgs, gt = batch()
    model.compute_loss(imgs, gt, global_step=3)["total_loss"].backward()
    assert all(p.grad is None for p in model.loss_fn.discriminator.parameters())
    assert all(p.requires_grad for p in model.loss_fn.discriminator.parameters())  # restored
    assert model.pixel_head.weight.grad is not None


def test_discriminator_update_never_reaches_the_generator():
    model = make(**GAN)
    imgs, gt = batch()
    model.compute_loss(imgs, gt, global_step=3)["total_loss"].backward()
    model.zero_grad(set_to_none=True)
    model.compute_loss(imgs, gt, update_type="discriminator", global_step=3)["disc_loss"].backward()
    assert all(p.grad is None for p in model.generator_parameters())
    assert all(p.grad is not None for p in model.loss_fn.discriminator.parameters())


def test_no_discriminator_work_when_the_gan_term_is_zero(monkeypatch):
    adaptive = []
    real = dl.adaptive_weight
    monkeypatch.setattr(dl, "adaptive_weight", lambda *a: adaptive.append(1) or real(*a))
    model = make(**GAN)
    calls = _disc_calls(model)
    imgs, gt = batch()
    before = model.compute_loss(imgs, gt, global_step=1)       # disc_start is 2
    assert calls == [] and adaptive == []
    assert float(before["gen_adv_loss"]) == 0.0 and float(before["gen_adv_loss_weighted"]) == 0.0
    d = model.compute_loss(imgs, gt, update_type="discriminator", global_step=1)
    assert calls == [] and float(d["disc_weight"]) == 0.0
    d["disc_loss"].backward()   # the seed's loop backpropagates it: reaches no parameter
    assert all(p.grad is None for p in model.loss_fn.discriminator.parameters())
    model.compute_loss(imgs, gt, global_step=2)
    assert len(calls) == 1 and adaptive == [1]


def test_discriminator_step_reuses_the_generator_reconstructions():
    model = make(**GAN)
    encoder_calls = []
    model.encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    imgs, gt = batch()
    model.compute_loss(imgs, gt, global_step=3)
    codebook = model.quantize.embedding.clone()
    model.compute_loss(imgs, gt, update_type="discriminator", global_step=3)
    assert len(encoder_calls) == 1
    # Another tensor (or the same one changed in place): the generator runs again, under no_grad
    # and without a second EMA update.
    imgs.add_(0.01)
    model.compute_loss(imgs, gt, update_type="discriminator", global_step=3)
    assert len(encoder_calls) == 2 and torch.equal(model.quantize.embedding, codebook)


# ---- codebook and the model contract --------------------------------------------------------

def test_ema_codebook_moves_only_in_training_and_stays_out_of_parameters():
    model = make()
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("quantize.") for n in names)
    assert {"quantize.embedding", "quantize.cluster_size", "quantize.embed_avg"} <= set(model.state_dict())
    before = model.quantize.embedding.clone()
    model.eval()
    model(batch()[0])
    assert torch.equal(model.quantize.embedding, before)
    model.train()
    model(batch()[0])
    assert not torch.equal(model.quantize.embedding, before)
    assert torch.allclose(model.quantize.embedding.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert float(model.quantize.cluster_size.sum()) == pytest.approx(0.01 * 2 * 16)


def test_model_contract_and_state_dict_keys():
    model = make(**GAN)
    assert model.codebook_sizes == (16,)
    assert model.get_last_layer() is model.pixel_head.weight
    gen = {id(p) for p in model.generator_parameters()}
    assert not gen & {id(p) for p in model.loss_fn.discriminator.parameters()}
    assert gen == {id(p) for n, p in model.named_parameters() if not n.startswith("loss_fn.")}
    keys = model.state_dict()
    assert any(k.startswith("loss_fn.discriminator.") for k in keys)
    recon, vq = model(batch()[0])
    assert recon.shape == (2, 3, 32, 32) and vq.dim() == 0
    cfg = make_config(model_type="DinoVQ", model_args={**TINY, **GAN})
    built = build_dinovq(cfg)
    # The registry's model is the network alone: the loss lives with the loss family.
    assert type(built) is DinoVQNet and not hasattr(built, "compute_loss")
    assert not any(k.startswith("loss_fn.") for k in built.state_dict())
    assert set(built.state_dict()) == {k for k in keys if not k.startswith("loss_fn.")}
    with pytest.raises(RuntimeError, match="DinoVQLossCalculator"):
        DinoVQModel(**TINY, build_loss=False).compute_loss(*batch())


def test_builder_rejects_unknown_model_args_and_honours_train_use_gan():
    with pytest.raises(UserError, match="codebook_sise.*codebook_size"):
        build_dinovq(make_config(model_type="DinoVQ", model_args={**TINY, "codebook_sise": 3}))
    cfg = make_config(model_type="DinoVQ", model_args={**TINY, **GAN}, train={"use_gan": False},
                      data={"image_size": 32})
    assert DinoVQLossCalculator.build(cfg).use_gan is False
    from adapters import build_model

    assert isinstance(build_model(make_config(model_type="dinovq", model_args=TINY)), DinoVQNet)


# ---- the LossCalculator ----------------------------------------------------------------------

def tiny_cfg(**over):
    args = {**TINY, "dino_dim": 192, **GAN, **over}
    return make_config(model_type="DinoVQ", model_args=args,
                       teacher={"arch": "vit_tiny_patch16_224", "allow_random": True},
                       train={"disc_update_every": 1}, data={"image_size": 32})


@pytest.fixture(scope="module")
def calc():
    from losses.calculator import LossCalculator

    return LossCalculator.from_config(tiny_cfg())


@pytest.fixture(scope="module")
def hook():
    """The DinoVQ batch hook: the (random, frozen) teacher's features for each batch."""
    return teacher_features_hook(tiny_cfg())


def test_calculator_steps_keys_and_isolation(calc, hook):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_dinovq(cfg)
    imgs, _ = batch()
    assert isinstance(calc, DinoVQLossCalculator) and calc.use_gan
    assert calc.discriminator is calc.loss_fn.discriminator
    # Features come from the (random, frozen) teacher through the batch hook.
    out = calc.generator_step(model, hook({"image": imgs, "path": ["a", "b"]}, 2), global_step=2, split="val")
    assert set(out.log) == {f"val/{k}" for k in BASE_KEYS | {"gen_adv_loss", "gen_adv_loss_weighted"}}
    assert out.reconstructions.shape == imgs.shape and not out.reconstructions.requires_grad
    assert len(out.codes) == 1 and out.codes[0].shape == (2, 4, 4)
    out.loss.backward()
    assert all(p.grad is None for p in calc.discriminator.parameters())
    assert all(p.grad is not None for p in model.generator_parameters())
    model.zero_grad(set_to_none=True)
    loss, log = calc.discriminator_step(out, global_step=2)
    assert set(log) == {f"train/{k}" for k in DISC_KEYS}
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in calc.discriminator.parameters())
    calc.discriminator.zero_grad(set_to_none=True)


def test_calculator_schedule_and_state(calc, hook):
    assert [calc.should_update_discriminator(s) for s in range(4)] == [False, False, True, True]
    assert [calc.disc_factor_at(s) for s in (0, 1, 2)] == [0.0, 0.0, 1.0]
    # The teacher is never trained nor saved; the discriminator is the only state.
    keys = set(calc.state_dict())
    assert keys and all(k.startswith("loss_fn.discriminator.") for k in keys)
    assert all(not p.requires_grad for p in hook.source.parameters())
    hook.source.train()
    assert not hook.source.training
    # A DDP-style wrapper assigned by a trainer replaces, never duplicates, the discriminator.
    disc = calc.discriminator
    wrapper = torch.nn.Sequential(disc)
    calc.discriminator = wrapper
    assert calc.loss_fn.discriminator is wrapper and "discriminator" not in calc._modules
    calc.discriminator = disc


def test_calculator_without_gan_and_with_given_features():
    cfg = tiny_cfg(use_gan=False, dino_dim=24)
    c = DinoVQLossCalculator.build(cfg)
    assert c.discriminator is None and not c.use_gan
    assert not any(c.should_update_discriminator(s) for s in (0, 10, 10 ** 6))
    assert c.disc_factor_at(10 ** 6) == 0.0
    model = build_dinovq(cfg)
    imgs, feats = batch()
    out = c.generator_step(model, {"image": imgs, "dino_features": feats}, 0)
    assert set(out.log) == {f"train/{k}" for k in BASE_KEYS}
    with pytest.raises(UserError, match="teacher.ckpt_path"):
        c.generator_step(model, {"image": imgs}, 0)
    with pytest.raises(FeatureShapeError):
        c.generator_step(model, {"image": imgs, "dino_features": feats[:, :8]}, 0)


def test_calculator_needs_a_teacher_file_unless_random_is_allowed():
    cfg = make_config(model_type="DinoVQ", model_args={**TINY, "dino_dim": 192},
                      teacher={"arch": "vit_tiny_patch16_224"}, data={"image_size": 32})
    with pytest.raises(UserError, match="teacher.ckpt_path"):
        teacher_features_hook(cfg)


def test_train_use_gan_false_switches_the_gan_off_with_one_warning(caplog):
    import logging

    cfg = make_config(model_type="DinoVQ", model_args={**TINY, **GAN}, train={"use_gan": False},
                      data={"image_size": 32})
    with caplog.at_level(logging.WARNING):
        c = DinoVQLossCalculator.build(cfg)
    assert c.discriminator is None and not c.use_gan and c.disc_factor_at(10 ** 6) == 0.0
    assert caplog.text.count("train.use_gan is false") == 1


def test_calculator_needs_crops_of_the_model_size():
    cfg = make_config(model_type="DinoVQ", model_args={**TINY, "dino_dim": 192}, data={"image_size": 64})
    with pytest.raises(UserError, match="data.image_size: 32"):
        DinoVQLossCalculator.build(cfg)


# ---- python -m train fit ---------------------------------------------------------------------

TINY_YAML = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "dinovq_tiny.yaml")


def test_fit_two_steps_then_resume_matches_uninterrupted(tmp_path):
    """The tiny config (random teacher, GAN from step 1) trains through the generic trainer;
    a 1 + 1 step run resumed from its checkpoint equals the 2-step run bit for bit (model,
    EMA codebook, discriminator)."""
    from safetensors.torch import load_file

    from train.cli import main

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert main(["fit", TINY_YAML, "--data", "builtin", "--max-steps", "2", "--out", straight, "--no-bar"]) == 0
    assert main(["fit", TINY_YAML, "--data", "builtin", "--max-steps", "1", "--out", split, "--no-bar"]) == 0
    assert main(["fit", "--resume", split, "--data", "builtin", "--max-steps", "2", "--no-bar"]) == 0
    a = load_file(os.path.join(straight, "checkpoints", "last.safetensors"))
    b = load_file(os.path.join(split, "checkpoints", "last.safetensors"))
    assert set(a) == set(b) and "quantize.embedding" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(os.path.join(split, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert state["loss"] and all(k.startswith("discriminator.") for k in state["loss"])
    assert not any(k.startswith(("loss_fn.", "feature_source.")) for k in state["model"])
    ca, cb = (torch.load(os.path.join(d, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
              for d in (straight, split))
    assert all(torch.equal(ca["loss"][k], cb["loss"][k]) for k in ca["loss"])


def test_torchrun_two_ranks_keep_one_codebook(torchrun_jobs):
    """Two real CPU processes (gloo) see different images; the all-reduced EMA statistics keep
    their codebooks (and everything else) bit-identical -- the trainer's own check says so."""
    import json

    from safetensors.torch import load_file

    run_dir = torchrun_jobs / "fit-DinoVQ" / "run"
    verdict = json.loads((run_dir / "ranks_in_sync.json").read_text())
    assert verdict["in_sync"] and verdict["world_size"] == 2
    weights = load_file(str(run_dir / "checkpoints" / "last.safetensors"))
    assert float(weights["quantize.cluster_size"].sum()) > 0   # the codebook did move


def test_defaults_are_the_seeds_vit_b_scale():
    with torch.device("meta"):   # shapes only, no memory
        model = DinoVQModel(build_loss=False)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert model.img_size == (224, 224) and model.grid_size == (14, 14) and model.dino_dim == 768
    assert len(model.encoder.blocks) == 12 and model.encoder.pos_embed.shape == (1, 196, 768)
    assert 85e6 < encoder < 86e6          # ViT-B/16's 12 blocks of width 768
    assert model.quantize.embedding.shape == (8192, 32)
