"""The model contract, checked for every registered model type (timm's tests/test_models.py
style: parametrize over the registry, tiny configs from the registrations themselves).

A new model type gets these checks by registering; nothing here names a type.
"""
import copy
import os

import pytest
import torch
import yaml

import losses  # noqa: F401  (registers the loss families)
from adapters import build_model, registry
from losses import LossCalculator
from train.config import config_from_dict, normalize_document
from train.validate import collect

TYPES = registry.list_model_types()


def tiny(name, **train):
    data = copy.deepcopy(registry.get_model_type(name).tiny_config())
    data.setdefault("train", {}).update(train)
    return data


def typed(data):
    return config_from_dict(copy.deepcopy(data))


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def batch_for(cfg, x):
    spec = registry.get_model_type(cfg.model_type)
    batch = {"image": x, "path": [f"im{i}.png" for i in range(x.shape[0])]}
    hook = spec.batch_hook(cfg, torch.device("cpu")) if spec.batch_hook is not None else None
    return hook(batch, 0) if hook is not None else batch


def test_every_type_has_a_tiny_config_and_a_loss_family():
    assert TYPES == ["DinoVQ", "TamingVQGAN", "vqvae2"]
    for name in TYPES:
        spec = registry.get_model_type(name)
        assert spec.tiny_config()["model_type"] == name
        assert registry.get_loss_implementation(spec.loss_family).family == spec.loss_family


@pytest.mark.parametrize("name", TYPES)
def test_tiny_config_validates_clean(name):
    norm = normalize_document(tiny(name), f"{name} tiny config")
    errors = [f for f in collect(norm) if f.level == "error"]
    assert not errors, errors


@pytest.mark.parametrize("name", TYPES)
def test_forward_with_codes_and_state_dict_round_trip(name):
    cfg = typed(tiny(name))
    spec = registry.get_model_type(name)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = images()
    with torch.no_grad():
        rec, qloss, codes = model(x, return_codes=True)
        rec2, qloss2 = model(x)
    assert rec.shape == x.shape and qloss.numel() == 1 and torch.equal(rec, rec2)
    assert isinstance(codes, tuple)
    assert len(codes) == len(model.codebook_names) == len(model.codebook_sizes)
    assert tuple(model.codebook_names) == tuple(spec.codebooks(cfg.model_variant))
    for c, n in zip(codes, model.codebook_sizes):
        assert c.dtype == torch.long and c.dim() == 3 and c.shape[0] == 2
        assert int(c.min()) >= 0 and int(c.max()) < n
    with torch.no_grad():
        assert torch.allclose(model.decode_code(*codes), rec, atol=1e-5)
    # Strict state-dict round trip into a fresh model with other initial weights.
    torch.manual_seed(1)
    other = build_model(cfg).eval()
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(x)[0], rec)
    assert model.before_step(0) == {} or all(isinstance(v, float) for v in model.before_step(0).values())


@pytest.mark.parametrize("name", TYPES)
def test_ema_codebooks_stay_outside_the_optimizer(name):
    cfg = typed(tiny(name))
    spec = registry.get_model_type(name)
    model = build_model(cfg)
    owned = {id(p) for p in model.generator_parameters()}
    assert owned and owned <= {id(p) for p in model.parameters()}
    if spec.ema_codebook(cfg.model_variant):
        # An EMA codebook is buffers: a training forward moves them without any optimizer.
        before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()
                  and k not in dict(model.named_parameters())}
        assert before
        model.train()
        model(images())
        after = model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
    else:
        with pytest.raises(Exception, match="init_codebook_from_data"):
            model.init_codebook_from_data(images(), seed=0)


@pytest.mark.parametrize("use_gan", [True, False])
@pytest.mark.parametrize("name", TYPES)
def test_generator_and_discriminator_steps(name, use_gan):
    data = tiny(name, use_gan=use_gan)
    cfg = typed(data)
    torch.manual_seed(0)
    model = build_model(cfg)
    calc = LossCalculator.from_config(cfg)
    batch = batch_for(cfg, images())
    step = 2
    out = calc.generator_step(model, batch, step)
    assert out.loss.requires_grad and len(out.codes) == len(model.codebook_names)
    assert not out.reconstructions.requires_grad
    out.loss.backward()
    if calc.discriminator is not None:
        assert all(p.grad is None for p in calc.discriminator.parameters())
    assert any(p.grad is not None for p in model.generator_parameters())
    if not use_gan:
        assert calc.disc_factor_at(10 ** 6) == 0.0
        assert not any(calc.should_update_discriminator(s) for s in range(0, 50, 7))
        return
    assert calc.discriminator is not None and calc.should_update_discriminator(step)
    model.zero_grad(set_to_none=True)
    d_loss, log = calc.discriminator_step(out, step)
    d_loss.backward()
    assert log and all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None for p in calc.discriminator.parameters())


@pytest.mark.parametrize("name", TYPES)
def test_two_step_fit_and_bit_identical_resume(name, tmp_path):
    from safetensors.torch import load_file

    from train.cli import main

    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tiny(name, log_every=1, image_every=1000)))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = ["--data", "builtin", "--no-bar"]
    assert main(["fit", str(config), "--max-steps", "2", "--out", straight, *common]) == 0
    assert main(["fit", str(config), "--max-steps", "1", "--out", split, *common]) == 0
    assert main(["fit", "--resume", split, "--max-steps", "2", *common]) == 0
    a = load_file(os.path.join(straight, "checkpoints", "last.safetensors"))
    b = load_file(os.path.join(split, "checkpoints", "last.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(os.path.join(d, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
              for d in (straight, split))
    assert sa["global_step"] == sb["global_step"] == 2
    assert set(sa["loss"]) == set(sb["loss"]) and all(torch.equal(sa["loss"][k], sb["loss"][k]) for k in sa["loss"])
