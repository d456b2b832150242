"""``python -m train encode`` / ``decode`` on real tiny models of every registered type,
real image files and real folders (and, in the suite's torchrun launch, two gloo ranks).

References are computed here from the model itself: the crops through ``train.data``'s
eval preprocessing, the codes from ``forward(x, return_codes=True)`` (GumbelVQ: the argmax
of its logits, written out), the images from ``decode_code`` with the PNG rounding written
out.
"""
import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import losses  # noqa: F401  (registers the loss families)
from adapters import build_model, registry
from train.atomic import save_safetensors
from train.cli import main
from train.config import config_from_dict, save_config
from train.data import crop_image, list_folder, load_rgb, to_tensor

# Every registered type's tiny config, plus the TamingVQGAN variants with other quantizers.
MODELS = [(name, None) for name in registry.list_model_types()] + [("TamingVQGAN", "VQ"), ("TamingVQGAN", "Gumbel")]
IDS = [f"{n}-{v}" if v else n for n, v in MODELS]


def tiny_cfg(name, variant=None):
    data = copy.deepcopy(registry.get_model_type(name).tiny_config())
    if variant:
        data["model_variant"] = variant
    return config_from_dict(data)


def weights_folder(folder, cfg, seed=0):
    """config.yaml + model.safetensors (migrate's layout), weights from ``seed``; the model."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    os.makedirs(folder, exist_ok=True)
    save_config(cfg, os.path.join(folder, "config.yaml"))
    save_safetensors(model.state_dict(), os.path.join(folder, "model.safetensors"))
    return str(folder), model


def write_images(folder, n=5):
    """Non-square photos-to-be (shorter side resized, centre crop) of random pixels."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        h, w = 36 + 5 * i, 48 - 3 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"im{i}.png"))
    return str(folder)


def crops(folder, size):
    """The eval preprocessing (shorter side resized, centre crop) of every image, [-1, 1]."""
    paths = list_folder(folder)
    return paths, torch.stack([to_tensor(crop_image(load_rgb(p), size, np.random.default_rng(0), False, (1.0, 1.0)))
                               for p in paths])


def png_bytes(pixels):
    """Images in [-1, 1] -> uint8 HWC as torchvision's save_image rounds them."""
    x = ((pixels.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255)
    return x.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def reference_codes(model, x, variant):
    with torch.no_grad():
        if variant == "Gumbel":
            # GumbelQuantize samples in eval mode too; encode records the logits' argmax.
            return (model.quantize.proj(model.encode_to_prequant(x)).argmax(1),)
        return model(x, return_codes=True)[2]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def folder_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n)) and n != ".lock"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images") / "photos")


# ---------------------------------------------------------------------------------------------
# Round trip, every model type

@pytest.mark.parametrize("name,variant", MODELS, ids=IDS)
def test_encode_then_decode_is_the_models_own_reconstruction(name, variant, images, tmp_path, capsys):
    cfg = tiny_cfg(name, variant)
    source, model = weights_folder(tmp_path / "model", cfg)
    codes_dir, png_dir = tmp_path / "codes", tmp_path / "png"
    code, out, err = run(["encode", source, "--data", images, "--out", str(codes_dir), "--shard-size", "2",
                          "--batch-size", "3"], capsys)
    assert code == 0, err
    assert "centre crop" in out and "shorter side resized" in out

    paths, x = crops(images, cfg.data.image_size)
    ref = reference_codes(model, x, variant)
    index = json.loads((codes_dir / "index.json").read_text())
    assert index["complete"] and index["images_encoded"] == len(paths) == 5
    assert [cb["name"] for cb in index["codebooks"]] == list(model.codebook_names)
    assert [s["shard"] for s in index["shards"]] == [0, 1, 2]
    rows = (codes_dir / "images.csv").read_text().splitlines()
    assert rows[0] == "path,shard,row" and rows[1:] == [f"{p},{i // 2},{i % 2}" for i, p in enumerate(paths)]
    for cb, r in zip(index["codebooks"], ref):
        assert cb["size"] <= 256 and cb["dtype"] == "uint8" and cb["grid"] == list(r.shape[1:])
        stored = np.concatenate([np.load(codes_dir / f"shard-{s:05d}.{cb['name']}.npy") for s in range(3)])
        assert stored.dtype == np.uint8
        assert np.array_equal(stored, r.numpy())      # the model's own codes, exactly

    code, out, err = run(["decode", source, str(codes_dir), "--out", str(png_dir)], capsys)
    assert code == 0, err
    names = sorted(os.listdir(png_dir))
    assert names == [f"{i:06d}-im{i}.png" for i in range(5)]
    decoded = np.stack([np.asarray(Image.open(png_dir / n)) for n in names])
    with torch.no_grad():
        own = png_bytes(model.decode_code(*ref))
        forward = png_bytes(model(x)[0])
    # Bit for bit: the files carry exactly what the model's decode-from-codes path makes of
    # its own codes.
    assert np.array_equal(decoded, own)
    if variant != "Gumbel":
        # ... and that is the model's own forward reconstruction, bit for bit (its straight-
        # through passes the codebook entries exactly: adapters.contract.straight_through).
        # GumbelVQ's forward samples its codes, so its files are compared with its codes only.
        assert np.array_equal(decoded, forward)
        with torch.no_grad():
            assert torch.equal(model(x)[0], model.decode_code(*ref))    # before the PNG rounding too

    if name != "vqvae2":
        return
    # --images picks by file name or path; the rest are not written.
    code, _, err = run(["decode", source, str(codes_dir), "--out", str(tmp_path / "some"),
                        "--images", f"im3.png,{paths[0]}"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "some")) == ["000000-im0.png", "000003-im3.png"]


def test_straight_through_passes_the_code_exactly_with_upstreams_gradient():
    """``adapters.contract.straight_through``: the value is ``z_q`` bit for bit (taming's
    ``z + (z_q - z).detach()`` is not), the gradient reaches ``z`` as taming's does and
    never the codebook."""
    from adapters.contract import straight_through

    torch.manual_seed(0)
    z = (torch.randn(4, 8, 5, 5) * 3).requires_grad_()
    codebook = torch.randn(16, 8, requires_grad=True)
    z_q = codebook[torch.randint(0, 16, (4, 5, 5))].permute(0, 3, 1, 2)
    grad = torch.randn(4, 8, 5, 5)

    ours = straight_through(z, z_q)
    assert torch.equal(ours, z_q)
    upstream = z + (z_q - z).detach()
    assert not torch.equal(upstream, z_q)            # the rounding this exists to avoid
    (g_ours,) = torch.autograd.grad(ours, z, grad, retain_graph=True)
    (g_upstream,) = torch.autograd.grad(upstream, z, grad)
    assert torch.equal(g_ours, g_upstream) and torch.equal(g_ours, grad)
    (g_codebook,) = torch.autograd.grad(ours, codebook, grad, allow_unused=True)
    assert g_codebook is None


def test_code_dtype_is_the_smallest_that_holds_the_codebook():
    from train.encode import code_dtype

    assert [code_dtype(n).name for n in (2, 256, 257, 65536, 65537, 1 << 20)] == \
        ["uint8", "uint8", "uint16", "uint16", "int32", "int32"]


# ---------------------------------------------------------------------------------------------
# Resume and reruns

@pytest.fixture(scope="module")
def vqvae2_model(tmp_path_factory):
    return weights_folder(tmp_path_factory.mktemp("vqvae2") / "model", tiny_cfg("vqvae2"))[0]


def test_interrupted_encode_resumes_keeping_verified_shards(vqvae2_model, images, tmp_path, capsys):
    codes = tmp_path / "codes"
    argv = ["encode", vqvae2_model, "--data", images, "--out", str(codes), "--shard-size", "1"]
    assert run(argv, capsys)[0] == 0
    complete = folder_bytes(codes)

    # As a run killed after some shards leaves it: no index, shard 3 never finished (its
    # .npy written, its .json not), shard 1's file damaged, a dead writer's temporary.
    for name in ("index.json", "images.csv", "shard-00003.json"):
        os.remove(codes / name)
    with open(codes / "shard-00001.bottom.npy", "r+b") as fh:
        fh.truncate(100)
    (codes / "shard-00004.json.tmp.999999999").write_text("half")
    kept = {n: os.stat(codes / n) for n in os.listdir(codes) if n.startswith(("shard-00000", "shard-00002"))}

    from train.encode import encode

    report = encode(vqvae2_model, images, str(codes), shard_size=1, quiet=True)
    assert (report["encoded_shards"], report["kept_shards"], report["encoded_images"]) == (2, 3, 2)
    for n, st in kept.items():   # finished shards were verified, not rewritten
        now = os.stat(codes / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
    assert folder_bytes(codes) == complete     # the same files as the uninterrupted run

    # Everything finished: a rerun encodes nothing.
    again = encode(vqvae2_model, images, str(codes), shard_size=1, quiet=True)
    assert (again["encoded_shards"], again["kept_shards"]) == (0, 5)


def test_a_folder_of_other_codes_is_refused_unless_overwrite(vqvae2_model, images, tmp_path, capsys):
    codes = tmp_path / "codes"
    base = ["--data", images, "--out", str(codes), "--shard-size", "2"]
    assert run(["encode", vqvae2_model, *base], capsys)[0] == 0
    before = folder_bytes(codes)
    other, _ = weights_folder(tmp_path / "other", tiny_cfg("vqvae2"), seed=1)
    code, _, err = run(["encode", other, *base], capsys)
    assert code == 2 and "another model" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    fewer = write_images(tmp_path / "fewer", n=3)
    code, _, err = run(["encode", vqvae2_model, "--data", fewer, "--out", str(codes), "--shard-size", "2"], capsys)
    assert code == 2 and "other images (5 from" in err
    assert folder_bytes(codes) == before
    code, out, err = run(["encode", other, *base, "--overwrite"], capsys)
    assert code == 0, err
    after = folder_bytes(codes)
    assert after.keys() == before.keys() and after["shard-00000.top.npy"] != before["shard-00000.top.npy"]


# ---------------------------------------------------------------------------------------------
# torchrun: the suite's launch (tests/dist_worker.py, job "encode") against one process

def test_two_ranks_write_the_files_of_one_process(torchrun_jobs, tmp_path):
    from tests.dist_worker import ENCODE_ARGS
    from train.encode import encode

    folder = torchrun_jobs / "encode"
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["ranks"] == 2 and r["encoded_shards"] == 5 for r in ranks)
    single = encode(str(folder / "model"), str(folder / "images"), str(tmp_path / "codes"), quiet=True,
                    **ENCODE_ARGS)
    assert single["ranks"] == 1
    assert folder_bytes(folder / "codes") == folder_bytes(tmp_path / "codes")


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing (half-)written

@pytest.fixture(scope="module")
def encoded(vqvae2_model, images, tmp_path_factory):
    from train.encode import encode

    codes = tmp_path_factory.mktemp("encoded") / "codes"
    encode(vqvae2_model, images, str(codes), shard_size=3, quiet=True)
    return codes


def _copy_codes(encoded, tmp_path):
    import shutil

    shutil.copytree(encoded, tmp_path / "codes")
    return tmp_path / "codes"


def _code_out_of_range(encoded, tmp_path):
    codes = _copy_codes(encoded, tmp_path)
    path = codes / "shard-00001.bottom.npy"
    array = np.load(path)
    array[0, 2, 3] = 200                       # the tiny codebook has 16 codes
    np.save(path, array)
    index = json.loads((codes / "index.json").read_text())
    from train.atomic import sha256_file
    index["shards"][1]["files"]["bottom"]["sha256"] = sha256_file(str(path))   # consistent, but out of range
    (codes / "index.json").write_text(json.dumps(index))
    return codes


def _damaged_shard(encoded, tmp_path):
    codes = _copy_codes(encoded, tmp_path)
    with open(codes / "shard-00000.top.npy", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x07")
    return codes


def _unfinished(encoded, tmp_path):
    codes = _copy_codes(encoded, tmp_path)
    os.remove(codes / "index.json")
    return codes


@pytest.mark.parametrize("make_codes,model,message", [
    (_code_out_of_range, "vqvae2", r"holds code 200, outside the model's bottom codebook \(codes 0 to 15\)"),
    (lambda e, t: e, "TamingVQGAN", r"the codes are top 16 codes on 4x4, bottom 16 codes on 8x8 .* decode with the "
                                    r"model that encoded them"),
    (_damaged_shard, "vqvae2", r"shard-00000.top.npy is missing or damaged"),
    (_unfinished, "vqvae2", r"its encode did not finish; run the same encode command again"),
], ids=["code-out-of-range", "codes-of-another-model", "damaged-shard", "unfinished"])
def test_decode_refuses_bad_codes(encoded, vqvae2_model, tmp_path, capsys, make_codes, model, message):
    import re

    codes = make_codes(encoded, tmp_path)
    source = vqvae2_model if model == "vqvae2" else weights_folder(tmp_path / "m", tiny_cfg(model))[0]
    code, out, err = run(["decode", source, str(codes), "--out", str(tmp_path / "png")], capsys)
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "png").exists() or not os.listdir(tmp_path / "png")


def _not_a_tokenizer(tmp_path, images):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "vgg.pth")
    return str(tmp_path / "vgg.pth"), images


def _wrong_weights(tmp_path, images):
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    save_config(tiny_cfg("vqvae2"), str(folder / "config.yaml"))
    save_file({"fc.weight": torch.zeros(3)}, str(folder / "model.safetensors"))
    return str(folder), images


def _no_readable_image(tmp_path, images):
    (tmp_path / "broken").mkdir()
    for n in ("a.png", "b.jpg"):
        (tmp_path / "broken" / n).write_bytes(b"not an image")
    return None, str(tmp_path / "broken")


@pytest.mark.parametrize("make,message", [
    (_not_a_tokenizer, r"vgg.pth: not a training checkpoint written by `python -m train fit`"),
    (_wrong_weights, r"the checkpoint does not fit the model: missing from the checkpoint"),
    (_no_readable_image, r"encode: no readable image in folder .*broken .*cannot be read as an image"),
], ids=["not-a-tokenizer", "weights-of-something-else", "no-readable-image"])
def test_encode_refuses_bad_input_before_writing(vqvae2_model, images, tmp_path, capsys, make, message):
    import re

    source, data = make(tmp_path, images)
    out = tmp_path / "codes"
    code, _, err = run(["encode", source or vqvae2_model, "--data", data, "--out", str(out)], capsys)
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_encode_refuses_a_folder_that_holds_something_else(vqvae2_model, images, tmp_path, capsys):
    out = tmp_path / "codes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, _, err = run(["encode", vqvae2_model, "--data", images, "--out", str(out), *extra], capsys)
        assert code == 2 and "holds 1 entry that encode did not write (e.g. notes.txt)" in err, err
        assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
