"""``python -m train eval`` on real checkpoints: a 2-step vqvae2 run folder, its checkpoint
files, folders of weights built here, a folder written by ``python -m train migrate`` from
an upstream taming ``VQModel`` checkpoint, and a DinoVQ without its teacher.

Every metric is checked against a computation written out in the test (numpy PSNR / MSE /
L1 over the same crops, ``bincount`` of the model's own indices, taming's LPIPS built
separately), never against the evaluator's own helpers.
"""
import collections
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapters import build_model
from train.atomic import save_safetensors as atomic_save_safetensors
from train.cli import main
from adapters.contract import Tokenizer
from train.config import load_config, save_config
from train.data import fixed_crops, resolve_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text):
    """json.loads that refuses NaN / Infinity (not JSON, though Python writes them)."""
    def refuse(name):
        raise AssertionError(f"{name} in the JSON output")
    return json.loads(text, parse_constant=refuse)


def eval_json(argv, capsys):
    code, out, err = run_cli(["eval", *argv, "--json"], capsys)
    assert code == 0, err
    return strict_json(out)


def reference_metrics(images, recs):
    """PSNR / MSE / L1 written out in numpy: [-1, 1] -> [0, 1], reconstructions clamped."""
    x = (np.clip(images.numpy().astype(np.float64), -1, 1) + 1) / 2
    r = (np.clip(recs.numpy().astype(np.float64), -1, 1) + 1) / 2
    mse = ((x - r) ** 2).reshape(len(x), -1).mean(1)
    l1 = np.abs(x - r).reshape(len(x), -1).mean(1)
    return {"psnr": float(np.mean(10 * np.log10(1 / mse))), "mse": float(mse.mean()), "l1": float(l1.mean())}


def reference_usage(indices, n_codes):
    counts = np.bincount(np.concatenate([i.reshape(-1).numpy() for i in indices]), minlength=n_codes)
    p = counts[counts > 0] / counts.sum()
    return {"used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum())), "positions": int(counts.sum())}


def assert_metrics(report, expected, rel=1e-5):
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, rel=rel), key


def heldout_crops(cfg, count=16):
    """The built-in held-out crops the evaluator's default uses (the demo's: seed 0)."""
    cfg.data.path = "builtin"
    return fixed_crops(resolve_data(cfg, split="validation"), count, seed=0)


def save_weights_folder(folder, cfg, model):
    """A folder shaped like migrate's output: config.yaml + model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    save_config(cfg, os.path.join(folder, "config.yaml"))
    atomic_save_safetensors(model.state_dict(), os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.fixture(autouse=True)
def no_hub_vgg(tmp_path, monkeypatch):
    # An empty torch hub: LPIPS is computed only where a test names a VGG16 file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def vqvae2_run(tmp_path_factory):
    """A real 2-step ``python -m train fit`` run of configs/vqvae2_tiny.json on builtin photos."""
    out = tmp_path_factory.mktemp("eval") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["fit", os.path.join(ROOT, "configs", "vqvae2_tiny.json"), "--data", "builtin",
                     "--max-steps", "2", "--out", str(out), "--no-bar"])
    assert code == 0
    return out


# ---------------------------------------------------------------------------------------------

def test_run_folder_metrics_match_an_independent_computation(vqvae2_run, capsys, tmp_path):
    report = eval_json([str(vqvae2_run)], capsys)

    cfg = load_config(str(vqvae2_run / "config.yaml"))
    model = build_model(cfg)
    model.load_state_dict(load_file(str(vqvae2_run / "checkpoints" / "last.safetensors")), strict=True)
    model.eval()
    images = heldout_crops(cfg)
    with torch.no_grad():
        recs, _, (id_t, id_b) = model(images, return_codes=True)

    assert report["num_images"] == 16 and report["step"] == 2 and report["split"] == "val"
    assert report["kind"] == "run" and report["weights"].endswith("last.ckpt")
    assert_metrics(report, reference_metrics(images, recs))
    top, bottom = report["codebooks"]
    assert (top["name"], bottom["name"]) == ("top", "bottom")
    assert top["codes"] == bottom["codes"] == 64
    assert_metrics(top, reference_usage([id_t], 64))
    assert_metrics(bottom, reference_usage([id_b], 64))
    assert top["positions"] == 16 * 4 * 4 and bottom["positions"] == 16 * 8 * 8
    assert report["lpips"] is None and "no VGG16 trunk" in report["lpips_note"]

    # The checkpoint files of the run give the same numbers; --out writes the same JSON.
    out_file = tmp_path / "m" / "metrics.json"
    for source in ("checkpoints/last.ckpt", "checkpoints/last.safetensors"):
        again = eval_json([str(vqvae2_run / source), "--out", str(out_file)], capsys)
        assert again["psnr"] == report["psnr"] and again["codebooks"] == report["codebooks"]
        assert json.loads(out_file.read_text())["psnr"] == report["psnr"]

    # Plain text: one line per metric, per codebook, and why LPIPS was skipped.
    code, text, _ = run_cli(["eval", str(vqvae2_run), "--batch-size", "5"], capsys)
    assert code == 0
    assert f"PSNR        {report['psnr']:.2f} dB" in text
    assert "codebook    top:" in text and "codebook    bottom:" in text
    assert "LPIPS       skipped" in text and "16 random (seeded) crops" in text
    # No Inception weights anywhere: rFID is skipped, naming the file and where it goes.
    assert report["rfid"] is None and "weights-inception-2015-12-05-6726825d.pth" in report["rfid_note"]
    assert "rFID        skipped: no Inception weights" in text and "SSIM        " in text
    assert report["ssim"] > 0 and report["settings"]["ssim"]["data_range"] == 1


def test_usage_counts_of_known_indices():
    """A model whose indices are set by hand, and a real EMAVQ whose codebook leaves one code."""
    from train.evaluate import run_model

    class Known(Tokenizer):
        codebook_sizes = (4, 8)
        codebook_names = ("top", "bottom")

        def forward(self, x, return_codes=False):
            b = x.shape[0]
            top = torch.tensor([[0, 0], [1, 0]]).expand(b, 2, 2)        # codes 0 (3x) and 1 (1x)
            bottom = torch.arange(16).remainder(5).view(1, 4, 4).expand(b, 4, 4)   # codes 0..4
            return x * 0.5, torch.zeros(()), (top, bottom)

    images = torch.linspace(-1, 1, 6 * 3 * 8 * 8).view(6, 3, 8, 8)
    batches = [{"image": images[:4], "skipped": 0}, {"image": images[4:], "skipped": 0}]
    result = run_model(Known(), batches, torch.device("cpu"))
    top, bottom = result["codebooks"]
    assert (top["name"], top["used"], top["codes"], top["positions"]) == ("top", 2, 4, 24)
    assert top["usage"] == 0.5
    p = np.array([0.75, 0.25])
    assert top["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert (bottom["used"], bottom["usage"], bottom["positions"]) == (5, 5 / 8, 96)
    counts = np.bincount(np.arange(16) % 5)           # 4, 3, 3, 3, 3 per image
    p = counts / counts.sum()
    assert bottom["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert_metrics(result, reference_metrics(images, images * 0.5))


def emavq_config(folder, ddconfig):
    """A tiny TamingVQGAN EMAVQ config (32 codes of 8 dims, 8x8 latents at 32 px)."""
    config = folder / "emavq.json"
    config.write_text(json.dumps({
        "name": "known", "model_type": "TamingVQGAN", "model_variant": "EMAVQ",
        "model_args": {"embed_dim": 8, "n_embed": 32, "ddconfig": ddconfig},
        "lossconfig": {"target": TAMING_LOSS, "params": {"perceptual_weight": 0.0}},
        "train": {"use_gan": False, "learning_rate": 1e-4, "batch_size": 3},
        "data": {"path": "builtin", "image_size": 32}}))
    return load_config(str(config))


def test_known_codebook_end_to_end(tmp_path, tiny_ddconfig, capsys):
    """A TamingVQGAN EMAVQ whose codes all lie far away except code 5: every position uses 5."""
    cfg = emavq_config(tmp_path, tiny_ddconfig)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.quantize.embedding.weight.fill_(1e4)
        model.quantize.embedding.weight[5] = 0.0
    folder = save_weights_folder(tmp_path / "known", cfg, model)

    report = eval_json([folder, "--num-images", "7"], capsys)
    (cb,) = report["codebooks"]
    assert (cb["name"], cb["codes"], cb["used"], cb["positions"]) == ("codebook", 32, 1, 7 * 8 * 8)
    assert cb["usage"] == 1 / 32 and cb["perplexity"] == pytest.approx(1.0)
    assert report["kind"] == "migrated" and report["num_images"] == 7

    model.eval()
    images = heldout_crops(cfg, 7)
    with torch.no_grad():
        recs, _, idx = model(images, return_pred_indices=True)
    assert bool((idx == 5).all())
    assert_metrics(report, reference_metrics(images, recs))


def test_non_finite_reconstructions_exit_1_with_null_metrics(tmp_path, tiny_ddconfig, capsys):
    cfg = emavq_config(tmp_path, tiny_ddconfig)
    model = build_model(cfg)
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(float("nan"))
    folder = save_weights_folder(tmp_path / "nan", cfg, model)
    code, out, err = run_cli(["eval", folder, "--num-images", "2", "--json"], capsys)
    assert code == 1 and "non-finite" in err
    report = strict_json(out)     # NaN is written as null
    assert report["psnr"] is None and report["mse"] is None and report["num_images"] == 2
    # An image size the decoder does not give back (18 px in, 16 px out): exit 2, one line.
    code, _, err = run_cli(["eval", folder, "data.image_size=18"], capsys)
    assert code == 2 and "cannot reconstruct 18 px images (18x18 px in, 16x16 px out)" in err
    assert len(err.strip().splitlines()) == 1


def test_lpips_with_a_vgg16_file_and_skip_reasons(vqvae2_run, tmp_path, capsys):
    from losses.perceptual import _make_vgg16_features, build_taming_lpips

    torch.manual_seed(0)
    vgg = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in _make_vgg16_features().state_dict().items()}, vgg)
    report = eval_json([str(vqvae2_run), "--vgg", str(vgg), "--num-images", "4"], capsys)

    cfg = load_config(str(vqvae2_run / "config.yaml"))
    model = build_model(cfg)
    model.load_state_dict(load_file(str(vqvae2_run / "checkpoints" / "last.safetensors")), strict=True)
    model.eval()
    images = heldout_crops(cfg, 4)
    lpips = build_taming_lpips(str(vgg))
    with torch.no_grad():
        recs = model(images)[0]
        expected = float(lpips(images, recs.clamp(-1, 1)).mean())
    assert report["lpips"] == pytest.approx(expected, rel=1e-5)
    assert str(vgg) in report["lpips_note"]

    # The run's own vgg_ckpt_path missing on this machine: skipped, saying which file.
    report = eval_json([str(vqvae2_run), "--num-images", "2", "train.vgg_ckpt_path=/elsewhere/vgg16.pth"], capsys)
    assert report["lpips"] is None and "/elsewhere/vgg16.pth does not exist" in report["lpips_note"]
    # train.allow_random_vgg never buys a random trunk for evaluation.
    report = eval_json([str(vqvae2_run), "--num-images", "2", "train.allow_random_vgg=true"], capsys)
    assert report["lpips"] is None and "random trunk is never used" in report["lpips_note"]


def test_folder_data_subsets_notes_and_determinism(vqvae2_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")

    report = eval_json([str(vqvae2_run), "--data", str(folder)], capsys)
    assert report["num_images"] == 5 and report["crops"] == "centre" and report["split"] == "val"
    assert any("1 unreadable file(s)" in n for n in report["notes"])
    subset = eval_json([str(vqvae2_run), "--data", str(folder), "--num-images", "3", "--batch-size", "2"], capsys)
    assert subset["num_images"] == 3
    assert eval_json([str(vqvae2_run), "--data", str(folder), "--num-images", "3"], capsys)["psnr"] == subset["psnr"]

    # Centre crops of every file, checked by hand (shorter side to 32 px, centre 32x32).
    cfg = load_config(str(vqvae2_run / "config.yaml"))
    model = build_model(cfg)
    model.load_state_dict(load_file(str(vqvae2_run / "checkpoints" / "last.safetensors")), strict=True)
    model.eval()
    crops = []
    for i in range(5):
        img = Image.open(folder / f"p{i}.png").convert("RGB")
        w, h = img.size
        s = 32 / min(w, h)
        img = img.resize((max(32, round(w * s)), max(32, round(h * s))), Image.BICUBIC)
        left, top = (img.size[0] - 32) // 2, (img.size[1] - 32) // 2
        a = np.asarray(img.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 127.5 - 1
        crops.append(torch.from_numpy(a).permute(2, 0, 1))
    images = torch.stack(crops)
    with torch.no_grad():
        recs = model(images)[0]
    assert_metrics(report, reference_metrics(images, recs))

    # No held-out data in the config: the training images are used, and the report says so.
    fallback = eval_json([str(vqvae2_run), f"data.path={folder}"], capsys)
    assert fallback["split"] == "train" and any("no held-out images" in n for n in fallback["notes"])
    assert fallback["psnr"] == report["psnr"]
    # --split train on builtin: the training photographs, not the held-out pair.
    train = eval_json([str(vqvae2_run), "--split", "train", "--num-images", "2"], capsys)
    assert train["split"] == "train" and "held out" not in train["data"]


@pytest.mark.parametrize("make_argv, message", [
    (lambda run, tmp: ["eval", str(tmp / "nope")], "no such file or folder"),
    (lambda run, tmp: ["eval", str(tmp)], "holds no checkpoint"),
    (lambda run, tmp: ["eval", str(run), "model_args.n_embed=32"], "shape(s) differ"),
    (lambda run, tmp: ["eval", str(run), "--data", str(tmp / "junk")], "no readable image"),
    (lambda run, tmp: ["eval", str(run), "--data", str(tmp / "missing")], "no such file or folder"),
    (lambda run, tmp: ["eval", str(tmp / "junk.ckpt")], "not a readable training checkpoint"),
    (lambda run, tmp: ["eval", str(tmp / "lightning.ckpt")], "python -m train migrate"),
    (lambda run, tmp: ["eval", str(run), "--num-images", "0"], "must be >= 1"),
    (lambda run, tmp: ["eval", str(run), "--split", "test"], "invalid choice"),
    (lambda run, tmp: ["eval"], "one SOURCE expected"),
    (lambda run, tmp: ["eval", str(run), str(run)], "one SOURCE expected"),
    (lambda run, tmp: ["eval", str(run), "--vgg", str(tmp / "none.pth")], "--vgg"),
    (lambda run, tmp: ["eval", str(run), "data.image_size=20"], "data.image_size"),
])
def test_unusable_input_exits_2_with_one_line(vqvae2_run, tmp_path, capsys, make_argv, message):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "junk.ckpt").write_bytes(b"truncated")
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "global_step": 3}, tmp_path / "lightning.ckpt")
    code, out, err = run_cli(make_argv(vqvae2_run, tmp_path), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_dinovq_reconstruction_metrics_without_a_teacher(tmp_path, capsys):
    """DinoVQ needs no DINO teacher for eval: with teacher.allow_random false and no teacher
    checkpoint, building one would fail; eval reports reconstruction metrics regardless."""
    cfg = load_config(os.path.join(ROOT, "configs", "dinovq_tiny.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg)
    folder = save_weights_folder(tmp_path / "dinovq", cfg, model)
    report = eval_json([folder, "--num-images", "4", "teacher.allow_random=false"], capsys)

    model.eval()
    images = heldout_crops(cfg, 4)
    with torch.no_grad():
        out = model(images, return_dict=True)
    assert_metrics(report, reference_metrics(images, out["reconstructions"]))
    (cb,) = report["codebooks"]
    assert cb["codes"] == 64 and cb["positions"] == 4 * 16
    assert_metrics(cb, reference_usage([out["indices"]], 64))


# ---------------------------------------------------------------------------------------------
# A folder written by `python -m train migrate` from an upstream taming checkpoint

@pytest.fixture(scope="module")
def upstream_vqgan():
    from tests.conftest import import_upstream_vqgan

    return import_upstream_vqgan()


def test_migrated_folder_matches_the_upstream_model(tmp_path, tiny_ddconfig, upstream_vqgan, capsys):
    torch.manual_seed(3)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = upstream_vqgan.VQModel(ddconfig=tiny_ddconfig, n_embed=32, embed_dim=8,
                                     lossconfig={"target": "taming.modules.losses.vqperceptual.DummyLoss"})
    # Lightning's layout: weights under state_dict, with the step.
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": collections.OrderedDict(ref.state_dict()), "global_step": 11, "epoch": 1}, ckpt)
    config = tmp_path / "legacy.json"
    config.write_text(json.dumps({
        "model_type": "TamingVQGAN",
        "model_args": {"model_variant": "VQ", "embed_dim": 8, "n_embed": 32, "ddconfig": tiny_ddconfig,
                       "lossconfig": {"target": TAMING_LOSS, "params": {"disc_start": 0, "perceptual_weight": 0.0}}},
        "train_args": {"use_gan": False, "learning_rate": 4.5e-6, "batch_size": 4, "image_size": 32}}))
    migrated = tmp_path / "migrated"
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(ckpt), "--out", str(migrated)], capsys)
    assert code == 0, err

    report = eval_json([str(migrated), "--data", "builtin", "--num-images", "6"], capsys)
    assert report["kind"] == "migrated" and report["step"] == 11
    assert (report["model_type"], report["model_variant"]) == ("TamingVQGAN", "VQ")

    ref.eval()
    images = heldout_crops(load_config(str(migrated / "config.yaml")), 6)
    with torch.no_grad():
        recs = ref(images)[0]
        _, _, (_, _, idx) = ref.encode(images)
    assert_metrics(report, reference_metrics(images, recs))
    assert_metrics(report["codebooks"][0], reference_usage([idx], 32))
