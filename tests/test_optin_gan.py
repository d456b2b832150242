"""Adversarial opt-ins (``generator_loss``, ``lecam_weight``, ``lecam_ema_decay``;
``losses/gan.py``, ``losses/lecam.py``): defaults change nothing; LeCAM on a hand-computed
example, its averages through a save/load and an exact ``--resume``; the non-saturating
generator loss; every family with a discriminator; validate findings and ``fit`` refusing."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from losses.dinovq_loss import DinoVQLoss
from losses.gan import non_saturating_g_loss
from losses.lecam import LeCAM
from losses.taming_loss import TamingLossCalculator
from losses.vqvae2_loss import VQVAE2Loss, VQVAE2LossCalculator
from tests.test_fit import tiny_config
from train.cli import main as cli
from train.fit import run
from train.schema import make_config
from train.validate import validate_file

DISC = {"disc_start": 0, "perceptual_weight": 0.0, "disc_num_layers": 2, "disc_ndf": 8}


def _calc(**params):
    torch.manual_seed(0)
    return TamingLossCalculator.build(make_config(lossconfig={"params": {**DISC, **params}},
                                                  model_args={"ddconfig": {"out_ch": 3}}))


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def test_lecam_matches_a_hand_computed_example():
    lecam = LeCAM(weight=0.5, decay=0.9)
    # Step 1: batch means 2 (real) and -0.5 (fake); the zero-debiased anchors are exactly them.
    value = lecam(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0]))
    real_side = ((1 + 0.5) ** 2 + (3 + 0.5) ** 2) / 2          # relu(D(x) - a_F)^2
    fake_side = ((2 + 1) ** 2 + (2 - 0) ** 2) / 2              # relu(a_R - D(G(z)))^2
    assert math.isclose(value.item(), 0.5 * (real_side + fake_side), rel_tol=1e-6)
    # Step 2: means 0 and 0.5; anchors (0.9 * 0.2 + 0) / 0.19 and (0.9 * -0.05 + 0.05) / 0.19.
    a_real, a_fake = 0.18 / 0.19, 0.005 / 0.19
    value = lecam(torch.tensor([0.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert torch.allclose(lecam.anchors().float(), torch.tensor([a_real, a_fake]))
    assert math.isclose(value.item(), 0.5 * (0 + (a_real - 0.5) ** 2), rel_tol=1e-5)
    assert int(lecam.count) == 2


def test_defaults_keep_taming_loss_values_and_keys():
    x, xrec = _images()
    plain, explicit = _calc(), _calc(generator_loss="hinge", lecam_weight=0.0)
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert plain.running_state() == {} and explicit.lecam is None
    last = torch.nn.Parameter(torch.ones(1))
    rec = xrec * last
    for calc in (plain, explicit):
        calc.train()
    a = plain(torch.zeros(()), x, rec, 0, 1, last_layer=last)[0]
    b = explicit(torch.zeros(()), x, rec, 0, 1, last_layer=last)[0]
    assert torch.equal(a, b)
    assert torch.equal(plain(torch.zeros(()), x, xrec, 1, 1)[0], explicit(torch.zeros(()), x, xrec, 1, 1)[0])


def test_lecam_state_lives_beside_the_discriminator_and_survives_save_load(tmp_path):
    x, xrec = _images()
    calc = _calc(lecam_weight=0.1, lecam_ema_decay=0.9)
    disc_keys = list(_calc().discriminator.state_dict())
    assert list(calc.discriminator.state_dict()) == disc_keys          # taming's keys untouched
    assert sorted(calc.running_state()) == ["lecam.count", "lecam.ema_fake", "lecam.ema_real"]
    calc.train()
    for seed in (2, 3):
        _, log = calc(torch.zeros(()), *_images(seed), 1, 1)
    assert "train/lecam_loss" in log
    torch.save(calc.state_dict(), tmp_path / "calc.pt")
    fresh = _calc(lecam_weight=0.1, lecam_ema_decay=0.9)
    fresh.load_state_dict(torch.load(tmp_path / "calc.pt", weights_only=True))
    fresh.train()
    assert torch.equal(calc(torch.zeros(()), x, xrec, 1, 1)[0], fresh(torch.zeros(()), x, xrec, 1, 1)[0])
    # Evaluation (train mode off) reads the anchors without moving them.
    fresh.eval()
    before = {k: v.clone() for k, v in fresh.running_state().items()}
    fresh(torch.zeros(()), x, xrec, 1, 1, split="val")
    assert all(torch.equal(before[k], v) for k, v in fresh.running_state().items())


def test_non_saturating_generator_loss_value_on_every_path():
    logits = torch.tensor([0.0, 2.0, -1.0])
    expected = (math.log(2) + math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 3
    assert math.isclose(non_saturating_g_loss(logits).item(), expected, rel_tol=1e-6)

    x, xrec = _images()
    calc = _calc(generator_loss="non_saturating")
    calc.train()
    last = torch.nn.Parameter(torch.ones(1))
    # taming's two-pass forward with this generator loss, and the one-pass path, agree.
    loss_a, log_a = calc(torch.zeros(()), x, xrec * last, 0, 1, last_layer=last)
    loss_b, log_b, _ = calc._generator_loss_one_pass(torch.zeros(()), x, xrec * last, 1, last, False, "train")
    with torch.no_grad():
        direct = F.softplus(-calc.discriminator(xrec)).mean()
    assert torch.allclose(log_a["train/g_loss"], direct) and torch.allclose(log_b["train/g_loss"], direct)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)


def test_vqvae2_and_dinovq_families_take_the_opt_ins():
    x, xrec = _images()
    torch.manual_seed(0)
    calc = VQVAE2LossCalculator(VQVAE2Loss(lecam_weight=0.2, generator_loss="non_saturating", disc_num_layers=2,
                                           disc_ndf=8))
    assert sorted(calc.running_state()) == ["lecam.count", "lecam.ema_fake", "lecam.ema_real"]
    assert calc.g_loss_fn is non_saturating_g_loss
    calc.train()
    from losses.calculator import GeneratorOutput
    d_loss, log = calc.discriminator_step(GeneratorOutput(torch.zeros(()), {}, x, xrec), 1)
    with torch.no_grad():
        real, fake = calc.discriminator(x), calc.discriminator(xrec)
    base = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    assert torch.allclose(d_loss, base + log["train/lecam_loss"], atol=1e-6) and log["train/lecam_loss"] > 0

    loss = DinoVQLoss(use_gan=True, disc_start=0, disc_num_layers=2, disc_dim=8, lecam_weight=0.2,
                      generator_loss="non_saturating")
    terms = loss.discriminator_loss(x, xrec, global_step=1)
    assert "lecam_loss" in terms and int(loss.lecam.count) == 1
    assert DinoVQLoss(use_gan=True, disc_num_layers=2, disc_dim=8).lecam is None


def test_resume_with_lecam_is_exact(tmp_path):
    def config(name):
        path = tiny_config(tmp_path, name=name, use_gan=True, disc_start=0, ckpt_every=1)
        doc = json.load(open(path))
        doc["lossconfig"]["params"].update(lecam_weight=0.01, generator_loss="non_saturating")
        json.dump(doc, open(path, "w"))
        return path
    full, part = tmp_path / "full", tmp_path / "part"
    assert run([config("a"), "--out", str(full), "--max-steps", "3", "--no-bar"])[0] == 0
    assert run([config("b"), "--out", str(part), "--max-steps", "2", "--no-bar"])[0] == 0
    assert run(["--resume", str(part), "--max-steps", "3", "--no-bar"])[0] == 0
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(a["loss"]["lecam.count"]) == 3
    assert set(a["loss"]) == set(b["loss"])
    assert all(torch.equal(a["loss"][k], b["loss"][k]) for k in a["loss"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("params,expected", [
    ({"lecam_weight": -0.1}, ("lossconfig.params.lecam_weight", "bad_value")),
    ({"lecam_ema_decay": 1.0}, ("lossconfig.params.lecam_ema_decay", "bad_value")),
    ({"lecam_ema_decay": 0}, ("lossconfig.params.lecam_ema_decay", "bad_value")),
    ({"generator_loss": "non-saturating"}, ("lossconfig.params.generator_loss", "bad_value")),
    ({"lecam_wieght": 0.001}, ("lossconfig.params.lecam_wieght", "unknown_loss_param")),
])
def test_validate_findings_for_bad_adversarial_values(tmp_path, params, expected):
    path = tiny_config(tmp_path)
    doc = json.load(open(path))
    doc["lossconfig"]["params"].update(params)
    json.dump(doc, open(path, "w"))
    _, findings = validate_file(path)
    errors = {(f.path, f.code): f for f in findings if f.level == "error"}
    assert expected in errors, [f.as_dict() for f in findings]
    assert errors[expected].fix
    if "generator_loss" in params:
        assert errors[expected].fix == "write generator_loss: non_saturating"


def test_fit_refuses_bad_adversarial_values_before_training(tmp_path, capsys):
    path = tiny_config(tmp_path)
    doc = json.load(open(path))
    doc["lossconfig"]["params"]["lecam_ema_decay"] = 1.5
    json.dump(doc, open(path, "w"))
    out = tmp_path / "run"
    assert cli(["fit", path, "--out", str(out), "--max-steps", "1", "--no-bar"]) == 2
    err = capsys.readouterr().err
    assert "lecam_ema_decay" in err and "between 0 and 1" in err
    assert not (out / "checkpoints").exists()
