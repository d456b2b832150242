"""The training-loop opt-ins: k-means codebook start (``train.init_codebook_kmeans_iters``),
dead-code restart (``train.dead_code_threshold``), weight EMA (``train.ema_decay``, LDM's
``model_ema.*`` layout) and the learning-rate schedule (``train.lr_schedule``,
``warmup_steps``, ``min_lr_ratio``): each key's effect, exact resume, bad values refused,
defaults untouched."""
import math

import pytest
import torch
from safetensors.torch import load_file

from adapters import build_model
from adapters.ema_quantizer import kmeans_codes, pick_code_vectors
from tests.test_fit import tiny_config
from train.cli import main as cli
from train.config import load_config
from train.data import fixed_crops, resolve_data
from train.dead_codes import DeadCodeRestart
from train.evaluate import evaluate
from train.fit import run
from train.lr_schedule import lr_factor
from train.validate import validate_file
from train.weight_ema import WeightEMA, shadow_name


def _model(tmp_path, variant="EMAVQ", *overrides):
    cfg = load_config(tiny_config(tmp_path, variant=variant, use_gan=False), list(overrides))
    torch.manual_seed(0)
    return build_model(cfg), cfg


def _quant_error(vectors, codes):
    return torch.cdist(vectors.double(), codes.double()).min(1).values.pow(2).mean().item()


# ---- learning-rate schedule -----------------------------------------------------------------

def test_schedule_values_by_hand():
    # warmup 4 of 14 steps, then cosine to 10 %: step 0 is 1/4, step 3 the peak, step 9 halfway
    # down the cosine, step 14 the floor.
    f = lambda s: lr_factor(s, "cosine", 4, 14, 0.1)   # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)
    assert [lr_factor(s, "constant", 2, 10, 0.0) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(5, "cosine", 0, 10, 0.0) == pytest.approx(0.5)


def test_fit_follows_the_schedule_on_both_optimizers_and_logs_it(tmp_path):
    config = tiny_config(tmp_path, use_gan=True, disc_start=0)
    code, trainer = run([config, "--out", str(tmp_path / "r"), "--max-steps", "2", "--no-bar",
                         "train.lr_schedule=cosine", "train.warmup_steps=2", "train.min_lr_ratio=0.5"])
    assert code == 0
    peak = 1e-4
    # the last step (step 1) ended the warmup: 1.0 x peak, on both sides
    assert [s.lr for s in trainer.sides] == [pytest.approx(peak)] * 2
    from tests.test_fit import read_tb_scalars
    scalars = read_tb_scalars(tmp_path / "r" / "tb")
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([peak * 0.5, peak])


# ---- k-means start ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["EMAVQ", "VQ"])
def test_kmeans_start_lowers_the_quantisation_error_of_the_data_start(tmp_path, variant):
    model, cfg = _model(tmp_path, variant)
    crops = fixed_crops(resolve_data(cfg), 16, seed=23)
    vectors = model.codebook_vectors(crops)[0]
    drawn = pick_code_vectors(vectors, 64, seed=23)
    centroids = kmeans_codes(vectors, 64, seed=23, iters=5)
    assert _quant_error(vectors, centroids) < 0.8 * _quant_error(vectors, drawn)

    from train.codebook_init import kmeans_start
    kmeans_start(model, crops, seed=23, batch_size=16, iters=5)
    weight = model.quantize.embedding.weight
    assert torch.equal(weight, centroids.to(weight))
    if variant == "EMAVQ":        # counted once, as the data start
        assert torch.equal(model.quantize.embedding.embed_avg, weight)
        assert torch.equal(model.quantize.embedding.cluster_size, torch.ones(64))


def test_fit_starts_vqvae2_with_kmeans_and_says_so(tmp_path, capsys):
    from adapters import registry
    import yaml
    doc = registry.get_model_type("vqvae2").tiny_config()
    doc.setdefault("train", {}).update(use_gan=False, init_codebook_kmeans_iters=2)
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, trainer = run([str(path), "--data", "builtin", "--max-steps", "1", "--no-bar",
                         "--out", str(tmp_path / "r")])
    assert code == 0 and trainer.codebook_init["kmeans_iters"] == 2
    assert "k-means, 2 Lloyd iterations" in capsys.readouterr().out


# ---- dead-code restart ---------------------------------------------------------------------

def test_dead_codes_are_replaced_by_encoder_outputs_and_their_statistics_reset(tmp_path):
    model, cfg = _model(tmp_path, "EMAVQ")
    images = fixed_crops(resolve_data(cfg), 2, seed=1) * 2 - 1
    emb = model.quantize.embedding
    with torch.no_grad():
        emb.cluster_size.fill_(5.0)
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    dead = DeadCodeRestart(model, threshold=0.5, every=2, seed=23, device=torch.device("cpu"))
    # every code picked once per step, code 3 101 times: usage 0.01 x 1.99 (dead) and 2.01 (alive)
    codes = torch.cat([torch.arange(64), torch.full((100,), 3)])[None]
    dead.observe([codes])
    assert dead.after_step(1, images) == 0                       # not a check step
    dead.observe([codes])
    restarted = dead.after_step(2, images)
    assert restarted == 63
    assert dead.usage[0][3].item() == pytest.approx(0.01 * 101 * 1.99)
    ids = torch.nonzero(~torch.isin(torch.arange(64), torch.tensor([3]))).flatten()
    vectors = model.codebook_vectors(images)[0]
    # each restarted code is one of this batch's encoder outputs, its statistics reset
    assert (emb.weight[ids][:, None] - vectors[None]).abs().amax(-1).min(1).values.max() < 1e-6
    assert torch.equal(emb.embed_avg[ids], emb.weight[ids]) and torch.equal(emb.cluster_size[ids], torch.ones(63))
    assert torch.equal(emb.weight[3], before["weight"][3]) and emb.cluster_size[3] == 5.0
    assert torch.equal(dead.usage[0][ids], torch.full((63,), 0.5))


# ---- weight EMA ----------------------------------------------------------------------------

def test_weight_ema_buffers_are_named_and_updated_as_ldm_litema():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    net[1].bias.requires_grad_(False)
    ema = WeightEMA(net, 0.9)
    assert sorted(ema.state_dict()) == ["0bias", "0weight", "1weight", "decay", "num_updates"]
    assert ema.decay.dtype == torch.float32 and ema.num_updates.dtype == torch.int32
    w0 = net[0].weight.detach().clone()
    expected = w0.clone()
    for n in (1, 2):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))           # LitEma: 2/11, then 3/12
        expected = expected - (1 - d) * (expected - net[0].weight.detach())
    assert torch.allclose(ema.state_dict()["0weight"], expected) and int(ema.num_updates) == 2
    assert shadow_name("encoder.conv_in.weight") == "encoderconv_inweight"


def test_fit_saves_ema_as_model_ema_and_eval_uses_it(tmp_path):
    config = tiny_config(tmp_path, use_gan=False)
    out = tmp_path / "r"
    code, trainer = run([config, "--out", str(out), "--max-steps", "2", "--no-bar", "train.ema_decay=0.999"])
    assert code == 0
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    gen_names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(state["model_ema"]) == {shadow_name(n) for n in gen_names} | {"decay", "num_updates"}
    assert int(state["model_ema"]["num_updates"]) == 2
    weights = load_file(out / "checkpoints" / "last.safetensors")
    assert {k for k in weights if k.startswith("model_ema.")} == {"model_ema." + k for k in state["model_ema"]}
    assert torch.equal(weights["model_ema.encoderconv_inweight"], state["model_ema"]["encoderconv_inweight"])
    ema = evaluate(str(out), data="builtin", num_images=2, lpips=False)
    raw = evaluate(str(out), data="builtin", num_images=2, lpips=False, weights="raw")
    assert ema["weights_used"] == "ema" and raw["weights_used"] == "raw" and ema["psnr"] != raw["psnr"]
    from_safetensors = evaluate(str(out / "checkpoints" / "last.safetensors"), data="builtin", num_images=2,
                                lpips=False)
    assert from_safetensors["psnr"] == ema["psnr"]


# ---- resume and defaults -------------------------------------------------------------------

OPTINS = ["train.ema_decay=0.9", "train.lr_schedule=cosine", "train.warmup_steps=1", "train.min_lr_ratio=0.2",
          "train.dead_code_threshold=1.0", "train.dead_code_every=1"]


def test_resume_is_exact_with_ema_schedule_and_dead_code_restarts(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    config = tiny_config(tmp_path, variant="VQ", use_gan=False)
    assert run([config, "--out", str(full), "--max-steps", "4", "--no-bar", *OPTINS])[0] == 0
    assert run([config, "--out", str(part), "--max-steps", "2", "--no-bar", *OPTINS])[0] == 0
    assert run(["--resume", str(part), "--max-steps", "4", "--no-bar"])[0] == 0
    assert capsys.readouterr().out.count("dead code(s) restarted") >= 4
    a, b = (torch.load(f / "checkpoints" / "last.ckpt", weights_only=True) for f in (full, part))
    for key in ("model", "model_ema", "dead_codes"):
        assert set(a[key]) == set(b[key]) and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["optimizers"]["generator"]["param_groups"][0]["lr"] == b["optimizers"]["generator"]["param_groups"][0]["lr"]


def test_defaults_train_as_before(tmp_path):
    config = tiny_config(tmp_path, use_gan=False)
    code, plain = run([config, "--out", str(tmp_path / "a"), "--max-steps", "2", "--no-bar"])
    assert code == 0 and not plain.optins.any
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "model_ema" not in state and "dead_codes" not in state
    assert not [k for k in load_file(tmp_path / "a" / "checkpoints" / "last.safetensors") if "model_ema" in k]
    # the weight EMA only watches: the trained weights are bit-identical with it on
    code, watched = run([config, "--out", str(tmp_path / "b"), "--max-steps", "2", "--no-bar", "train.ema_decay=0.5"])
    a, b = plain.model.state_dict(), watched.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s.lr for s in plain.sides] == [1e-4]


# ---- bad values ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant,train,expected", [
    ("EMAVQ", {"dead_code_threshold": -1.0}, ("train.dead_code_threshold", "bad_value")),
    ("EMAVQ", {"dead_code_every": 0}, ("train.dead_code_every", "bad_value")),
    ("EMAVQ", {"init_codebook_kmeans_iters": -2}, ("train.init_codebook_kmeans_iters", "bad_value")),
    ("EMAVQ", {"ema_decay": 1.0}, ("train.ema_decay", "bad_value")),
    ("EMAVQ", {"ema_decay": 0}, ("train.ema_decay", "bad_value")),
    ("EMAVQ", {"warmup_steps": 50, "max_steps": 20}, ("train.warmup_steps", "warmup_longer_than_run")),
    ("EMAVQ", {"warmup_steps": -1}, ("train.warmup_steps", "bad_value")),
    ("EMAVQ", {"min_lr_ratio": 1.5}, ("train.min_lr_ratio", "bad_value")),
    ("EMAVQ", {"lr_schedule": "cosin", "max_steps": 10}, ("train.lr_schedule", "bad_value")),
    ("EMAVQ", {"lr_schedule": "cosine"}, ("train.lr_schedule", "schedule_needs_length")),
    ("Gumbel", {"dead_code_threshold": 0.1}, ("train.dead_code_threshold", "optin_needs_code_vectors")),
    ("Gumbel", {"init_codebook_kmeans_iters": 5}, ("train.init_codebook_kmeans_iters", "optin_needs_code_vectors")),
])
def test_bad_values_are_findings_and_fit_refuses_them(tmp_path, capsys, variant, train, expected):
    path = tiny_config(tmp_path, variant=variant, use_gan=False, **train)
    _, findings = validate_file(path)
    errors = {(f.path, f.code): f for f in findings if f.level == "error"}
    assert expected in errors, [f.as_dict() for f in findings]
    assert errors[expected].fix
    out = tmp_path / "run"
    # (a cosine schedule without max_steps is the bad value itself: no --max-steps then)
    length = [] if "max_steps" in train or train.get("lr_schedule") == "cosine" else ["--max-steps", "1"]
    assert cli(["fit", path, "--out", str(out), "--no-bar"] + length) == 2
    assert expected[0].split(".")[1] in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def test_recipe_config_validates_cleanly():
    from train.validate import ERROR, WARNING
    _, findings = validate_file("configs/modern_recipe.yaml")
    assert not [f for f in findings if f.level in (ERROR, WARNING)]


def test_torchrun_ranks_agree_with_every_training_optin(torchrun_jobs):
    folder = torchrun_jobs / "optins"
    r0, r1 = (torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["code"] == 0 and r0["step"] == r1["step"] == 3
    assert [k for k in r0["digest"] if r0["digest"][k] != r1["digest"][k]] == []
    output = "".join((folder / f"rank{r}.log").read_text() for r in (0, 1))
    assert output.count("k-means, 3 Lloyd iterations") == 1 and output.count("dead code(s) restarted") >= 2
    state = torch.load(folder / "optins.pt", weights_only=True)
    assert int(state["model_ema"]["num_updates"]) == 3 and "usage.0" in state["dead_codes"]
