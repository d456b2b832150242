"""``python -m train eval``'s paper metrics against the reference implementations.

* rFID equals torch-fidelity's own ``calculate_metrics`` on two PNG folders (the real crops
  and the model's reconstructions, written here) with the same Inception weights file: a
  randomly initialised torch-fidelity extractor (seeded, Kaiming-scaled so its features are
  not all ~0) saved to a file;
* SSIM equals torchmetrics' value (default convention) and scikit-image's LlamaGen call
  (``--ssim-data-range 2``); PSNR equals the formula written out in numpy;
* saved reference statistics (``--save-ref-stats``) hold numpy's mean / covariance layout
  and give the same rFID when reused (``--ref-stats``);
* two torchrun processes give the one-process numbers (rFID, usage, per-image rows);
* bad weights files, bad statistics files and conflicting flags: exit 2, one line, no
  output file written.
"""
import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from adapters import build_model, registry
from train.atomic import save_safetensors
from train.cli import main
from train.config import load_config, save_config
from train.fid import FeatureStats, frechet_distance, random_inception_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = 4
SIZE = 32


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(random_inception_state(), path)
    return str(path)


@pytest.fixture(autouse=True)
def empty_hub(tmp_path, monkeypatch):
    # No Inception / VGG16 file in the torch hub cache unless a test names one.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny vqvae2 (two codebooks) saved as config.yaml + model.safetensors."""
    folder = tmp_path_factory.mktemp("model")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(registry.get_model_type("vqvae2").tiny_config()))
    cfg = load_config(str(folder / "tiny.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg)
    save_config(cfg, str(folder / "config.yaml"))
    save_safetensors(model.state_dict(), str(folder / "model.safetensors"))
    model.eval()
    return folder, model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Smooth colour images of different shapes (so the centre crops differ from the files)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        h, w = 36 + 6 * i, 48 - 2 * i
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (3 + i)), np.cos(yy / (4 + i)), np.sin((xx + yy) / 5.0)], axis=-1)
        image = (127.5 + 100 * base + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i}.png")
    return folder


def centre_crops(folder):
    """taming's validation preprocessing written out: shorter side to SIZE (bicubic), centre crop."""
    crops = []
    for name in sorted(os.listdir(folder)):
        img = Image.open(folder / name).convert("RGB")
        w, h = img.size
        s = SIZE / min(w, h)
        img = img.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BICUBIC)
        left, top = (img.size[0] - SIZE) // 2, (img.size[1] - SIZE) // 2
        crops.append(np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), dtype=np.uint8))
    return np.stack(crops)


@pytest.fixture(scope="module")
def reference(model_folder, photos, tmp_path_factory):
    """Crops and reconstructions computed here, and both written as PNG folders."""
    _, model = model_folder
    crops = centre_crops(photos)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = model(x)[0].clamp(-1, 1)
    rec8 = np.round((rec.permute(0, 2, 3, 1).numpy().astype(np.float64) + 1) * 127.5).astype(np.uint8)
    root = tmp_path_factory.mktemp("fidelity")
    for side, images in (("real", crops), ("rec", rec8)):
        (root / side).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / side / f"{i}.png")
    return {"crops": crops, "x": x, "rec": rec, "dirs": (str(root / "real"), str(root / "rec"))}


@pytest.fixture(scope="module")
def one_process(model_folder, photos, inception_file, tmp_path_factory):
    """One in-process ``eval`` with every output; shared by the parity and torchrun tests."""
    out = tmp_path_factory.mktemp("eval")
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(out / "torch_home")
    try:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["eval", str(model_folder[0]), "--data", str(photos), "--inception", inception_file,
                         "--json", "--out", str(out / "report.json"), "--csv", str(out / "rows.csv"),
                         "--grid", str(out / "grid.png"), "--save-ref-stats", str(out / "ref.npz"), "--quiet",
                         "train.num_workers=0"])
    finally:
        if old is None:
            del os.environ["TORCH_HOME"]
        else:
            os.environ["TORCH_HOME"] = old
    assert code == 0, stderr.getvalue()
    return {"report": json.loads(stdout.getvalue()), "stderr": stderr.getvalue(), "dir": out,
            "model": str(model_folder[0]), "photos": str(photos)}


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------

def test_streaming_statistics_and_distance_match_numpy_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 16)).astype(np.float32)
    b = (rng.normal(size=(30, 16)) * 1.5 + 0.3).astype(np.float32)
    stats = []
    for features in (a, b):
        s = FeatureStats(dim=16)
        for chunk in np.array_split(features, 3):       # batches of different sizes
            s.add(torch.from_numpy(chunk))
        mu, sigma = s.mu_sigma()
        np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=0, atol=1e-12)
        stats.append((mu, sigma))
    ours = frechet_distance(*stats[0], *stats[1])
    theirs = fid_statistics_to_metric({"mu": stats[0][0], "sigma": stats[0][1]},
                                      {"mu": stats[1][0], "sigma": stats[1][1]}, False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, abs=1e-9)
    assert frechet_distance(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        FeatureStats(dim=4).mu_sigma()


def test_loaded_extractor_is_torch_fidelitys_with_batch_norm_folded(inception_file):
    """What ``load_inception`` hands out: torch-fidelity's extractor built from the same file
    (its own constructor), but with no batch norm left and channels-last weights; the pool
    features agree to float rounding."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from train.fid import load_inception

    with contextlib.redirect_stderr(io.StringIO()):      # "not the standard file"
        ours, info = load_inception(inception_file, torch.device("cpu"))
    assert info["standard"] is False
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=inception_file)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in theirs.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 94 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 3, 40, 52), dtype=np.uint8))
    with torch.no_grad():
        got, want = ours(x)[0], theirs(x)[0]
    assert want.abs().max() > 0.1                        # real features, not ~0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rfid_ssim_psnr_match_the_reference_implementations(one_process, reference, inception_file):
    import torch_fidelity
    from torchmetrics.functional.image import structural_similarity_index_measure

    report = one_process["report"]
    assert report["num_images"] == N_IMAGES and report["crops"] == "centre"

    # rFID: torch-fidelity on the two PNG folders, same weights file.
    expected = torch_fidelity.calculate_metrics(
        input1=reference["dirs"][0], input2=reference["dirs"][1], fid=True, cuda=False, cache=False,
        verbose=False, feature_extractor_weights_path=inception_file, batch_size=N_IMAGES, save_cpu_ram=True,
    )["frechet_inception_distance"]
    assert expected > 1e-3            # the two sides differ: the comparison means something
    assert report["rfid"] == pytest.approx(expected, abs=1e-3)

    # PSNR (1e-4 dB) and SSIM (1e-5) per image and on average, against the CSV.
    x01 = (reference["x"] + 1) / 2
    r01 = (reference["rec"] + 1) / 2
    mse = ((x01.double() - r01.double()) ** 2).flatten(1).mean(1).numpy()
    psnr = 10 * np.log10(1 / mse)
    ssim = structural_similarity_index_measure(r01, x01, data_range=1.0, reduction="none").double().numpy()
    rows = read_rows(one_process["dir"] / "rows.csv")
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) and len(rows) == N_IMAGES
    np.testing.assert_allclose([float(r["psnr"]) for r in rows], psnr, rtol=0, atol=1e-4)
    np.testing.assert_allclose([float(r["ssim"]) for r in rows], ssim, rtol=0, atol=1e-5)
    assert report["psnr"] == pytest.approx(psnr.mean(), abs=1e-4)
    assert report["ssim"] == pytest.approx(ssim.mean(), abs=1e-5)
    assert all(r["lpips"] == "" for r in rows)

    # The settings that define the figures.
    s = report["settings"]
    assert s["ssim"]["data_range"] == 1 and "torchmetrics" in s["ssim"]["implementation"]
    assert s["inception"]["file"] == os.path.abspath(inception_file) and s["inception"]["standard"] is False
    assert len(s["inception"]["sha256"]) == 64 and s["tool_version"] and s["num_images"] == N_IMAGES
    assert "centre 32x32 crop" in s["preprocessing"]
    assert "is not the standard weights-inception-2015-12-05-6726825d.pth" in one_process["stderr"]
    assert json.loads((one_process["dir"] / "report.json").read_text())["rfid"] == report["rfid"]
    grid = Image.open(one_process["dir"] / "grid.png")
    assert grid.size == (2 + N_IMAGES * (SIZE + 2), 2 + 2 * (SIZE + 2))

    # Saved reference statistics: pytorch-fid's layout plus the settings that made them.
    with np.load(one_process["dir"] / "ref.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        np.testing.assert_allclose(ref["sigma"], ref["sigma"].T, rtol=0, atol=1e-12)
        assert str(ref["meta_image_size"]) == str(SIZE) and str(ref["meta_num_images"]) == str(N_IMAGES)


def test_torchrun_ranks_give_the_one_process_numbers(one_process, reference, inception_file, tmp_path):
    """Two gloo processes of the real CLI, 2 images each, reusing the saved real side
    (--ref-stats) and with LlamaGen's SSIM convention (scikit-image's call)."""
    from skimage.metrics import structural_similarity

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TORCH_HOME=str(tmp_path / "hub"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           "eval", one_process["model"], "--data", one_process["photos"], "--inception", inception_file,
           "--ref-stats", str(one_process["dir"] / "ref.npz"), "--ssim-data-range", "2", "--batch-size", "2",
           "--out", str(tmp_path / "report.json"), "--csv", str(tmp_path / "rows.csv"), "--quiet",
           "train.num_workers=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("rFID ") == 1            # rank 0 alone prints
    two = json.loads((tmp_path / "report.json").read_text())
    one = one_process["report"]
    assert two["num_images"] == one["num_images"] == N_IMAGES
    assert two["rfid"] == pytest.approx(one["rfid"], abs=1e-3)
    assert "saved reference statistics" in two["rfid_note"]
    for key in ("psnr", "mse", "l1"):
        assert two[key] == pytest.approx(one[key], rel=1e-9)
    for a, b in zip(two["codebooks"], one["codebooks"]):     # usage over the whole set, both codebooks
        assert (a["name"], a["used"], a["positions"]) == (b["name"], b["used"], b["positions"])
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-9)
    rows, one_rows = read_rows(tmp_path / "rows.csv"), read_rows(one_process["dir"] / "rows.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in one_rows]
    assert [float(r["psnr"]) for r in rows] == pytest.approx([float(r["psnr"]) for r in one_rows], rel=1e-9)
    x01 = ((reference["x"] + 1) / 2).permute(0, 2, 3, 1).numpy()
    r01 = ((reference["rec"] + 1) / 2).permute(0, 2, 3, 1).numpy()
    llamagen = [structural_similarity(b, a, data_range=2.0, channel_axis=-1) for a, b in zip(x01, r01)]
    np.testing.assert_allclose([float(r["ssim"]) for r in rows], llamagen, rtol=0, atol=1e-5)
    assert two["settings"]["ssim"]["data_range"] == 2 and "scikit-image" in two["settings"]["ssim"]["implementation"]


def write_bad_files(tmp):
    torch.save([1, 2, 3], tmp / "list.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp / "wrong_keys.pth")
    (tmp / "junk.pth").write_bytes(b"not a torch file")
    np.savez(tmp / "no_mu.npz", m=np.zeros(3))
    np.savez(tmp / "shapes.npz", mu=np.zeros(3), sigma=np.zeros((3, 3)))
    torch.save({"conv.weight": torch.zeros(1)}, tmp / "not_a_tokenizer.ckpt")


@pytest.mark.parametrize("extra, message", [
    (["--inception", "{tmp}/missing.pth"], "no such file; it should be torch-fidelity's "
                                           "weights-inception-2015-12-05-6726825d.pth"),
    (["--save-ref-stats", "{tmp}/ref.npz"], "needs the Inception weights weights-inception-2015-12-05-6726825d.pth"),
    (["--inception", "{tmp}/list.pth"], "hold a list"),
    (["--inception", "{tmp}/wrong_keys.pth"], "do not fit torch-fidelity's InceptionV3"),
    (["--inception", "{tmp}/junk.pth"], "not a readable torch file"),
    (["--inception", "{tmp}/junk.pth", "--ref-stats", "{tmp}/no_mu.npz"], "no mu/sigma arrays"),
    (["--inception", "{tmp}/junk.pth", "--ref-stats", "{tmp}/shapes.npz"], "not the Inception pool3 shapes"),
    (["--inception", "{tmp}/junk.pth", "--ref-stats", "{tmp}/missing.npz"], "--ref-stats"),
    (["--ref-stats", "{tmp}/a.npz", "--save-ref-stats", "{tmp}/b.npz"], "together"),
    (["--no-fid", "--inception", "{tmp}/junk.pth"], "--no-fid"),
    (["--ssim-data-range", "3"], "invalid choice"),
    (["--csv", "{tmp}"], "--csv"),
])
def test_bad_weights_statistics_and_flags_exit_2_writing_nothing(model_folder, photos, tmp_path, capsys,
                                                                  extra, message):
    write_bad_files(tmp_path)
    argv = ["eval", str(model_folder[0]), "--data", str(photos), "--out", str(tmp_path / "out" / "r.json"),
            "--grid", str(tmp_path / "out" / "g.png"), "train.num_workers=0"] + \
        [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, out, err = run_cli(argv, capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("eval: warning")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()        # nothing written, not even the folder


def test_a_checkpoint_that_is_not_a_tokenizer_is_refused(tmp_path, capsys):
    write_bad_files(tmp_path)
    code, _, err = run_cli(["eval", str(tmp_path / "not_a_tokenizer.ckpt"), "--data", "builtin"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "not a training checkpoint" in err and "python -m train migrate" in err
