"""``train.init_codebook_from_data``: EMA codebooks start from encoder outputs of the run's
first training crops on a fresh start, never on resume, identically on every rank."""
import io
import os
from contextlib import redirect_stdout

import pytest
import torch

from adapters import build_model
from adapters.ema_quantizer import TooFewVectors
from tests.test_fit import tiny_config
from train.config import load_config
from train.data import fixed_crops, resolve_data
from train.errors import UserError
from train.fit import run
from train.codebook_init import CODEBOOK_INIT_CROPS
from train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMA_KEYS = ("quantize.embedding.weight", "quantize.embedding.embed_avg", "quantize.embedding.cluster_size")


def _trainer(config, *overrides):
    cfg = load_config(config, list(overrides))
    return Trainer(cfg, resolve_data(cfg), None, use_bar=False)


def _nearest(codes, vectors):
    """Distance of each code (rows) to its nearest vector (rows)."""
    return torch.cdist(codes.double(), vectors.double()).min(1).values


def test_fresh_start_takes_distinct_encoder_outputs_of_the_first_crops(tmp_path):
    config = tiny_config(tmp_path, use_gan=False)
    off = _trainer(config)
    on = _trainer(config, "train.init_codebook_from_data=true")

    # The codes are the encoder outputs of the run's first 64 training crops at the positions
    # a private generator seeded with train.seed picks, each counted once.
    seed = on.cfg.train.seed
    crops = fixed_crops(on.data, CODEBOOK_INIT_CROPS, seed=seed)
    off.model.eval()
    with torch.no_grad():
        z = off.model.encode_to_prequant(crops)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:64]
    codebook = on.model.quantize.embedding
    assert torch.allclose(codebook.weight, flat[pick], atol=1e-6)
    assert torch.equal(codebook.embed_avg, codebook.weight)
    assert torch.equal(codebook.cluster_size, torch.ones(64))
    assert on.codebook_init == {"crops": 64, "vectors": (flat.shape[0],), "codes": (64,)}
    # Starting again draws no global random number (the resumable RNG stream stays put).
    rng = torch.get_rng_state()
    on.model.init_codebook_from_data(crops, seed=seed)
    assert torch.equal(torch.get_rng_state(), rng) and torch.allclose(codebook.weight, flat[pick], atol=1e-6)

    # Everything else is what the run would have started from without the option.
    a, b = off.model.state_dict(), on.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k not in EMA_KEYS)
    assert torch.equal(off.model.quantize.embedding.cluster_size, torch.zeros(64))   # upstream's start
    assert off.codebook_init is None


def test_vqvae2_and_dinovq_start_every_codebook_from_data(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32) * 2 - 1

    model = build_model(load_config(os.path.join(ROOT, "configs", "vqvae2_tiny.json")))
    assert model.init_codebook_from_data(images, seed=3) == (8 * 16, 8 * 64)   # 4x4 top, 8x8 bottom codes
    assert model.training                                                   # mode restored
    model.eval()
    with torch.no_grad():
        enc_b = model.enc_b(images)
        top = model.quantize_conv_t(model.enc_t(enc_b)).permute(0, 2, 3, 1)
        quant_t = model.quantize_t(top)[0].permute(0, 3, 1, 2)
        bottom = model.quantize_conv_b(torch.cat([model.dec_t(quant_t), enc_b], 1)).permute(0, 2, 3, 1)
    for q, vectors in ((model.quantize_t, top), (model.quantize_b, bottom)):
        assert _nearest(q.embed.t(), vectors.reshape(-1, 16)).max() < 1e-5
        assert torch.equal(q.embed_avg, q.embed) and torch.equal(q.cluster_size, torch.ones(64))
        assert torch.unique(q.embed.t(), dim=0).shape[0] == 64              # distinct codes
    with pytest.raises(TooFewVectors):
        model.init_codebook_from_data(images[:1])                           # 16 top vectors, 64 codes

    dino = build_model(load_config(os.path.join(ROOT, "configs", "dinovq_tiny.yaml")))
    assert dino.init_codebook_from_data(images, seed=3) == (8 * 16,)
    with torch.no_grad():
        vectors = dino.eval().encode(images).reshape(-1, 16)
    assert _nearest(dino.quantize.embedding, vectors).max() < 1e-5
    assert torch.equal(dino.quantize.cluster_size, torch.ones(64))


def test_models_without_an_ema_codebook_refuse(tmp_path):
    trainer = _trainer(tiny_config(tmp_path, variant="VQ", use_gan=False))
    with pytest.raises(UserError, match="init_codebook_from_data=false"):
        trainer.model.init_codebook_from_data(torch.zeros(4, 3, 32, 32))
    with pytest.raises(UserError, match="VQ learns its codebook by gradients"):
        _trainer(tiny_config(tmp_path, variant="VQ", use_gan=False), "train.init_codebook_from_data=true")


def test_more_crops_when_the_codes_outnumber_the_encoder_outputs(tmp_path):
    # 16 px vqvae2: 2x2 top codes per crop, so 64 crops give 256 vectors for 512 codes.
    config = os.path.join(ROOT, "configs", "vqvae2_tiny.json")
    trainer = _trainer(config, "data.path=builtin", "data.image_size=16", "model_args.n_embed=512",
                       "train.init_codebook_from_data=true")
    assert trainer.codebook_init == {"crops": 128, "vectors": (512, 2048), "codes": (512, 512)}


def test_resume_does_not_start_again_and_stays_bit_exact(tmp_path, capsys):
    config = tiny_config(tmp_path, use_gan=False, ckpt_every=2, init_codebook_from_data=True)
    full, part = tmp_path / "full", tmp_path / "part"
    assert run([config, "--out", str(full), "--max-steps", "4", "--no-bar"])[0] == 0
    assert run([config, "--out", str(part), "--max-steps", "2", "--no-bar"])[0] == 0
    assert capsys.readouterr().out.count("codebook initialised from data") == 2
    code, resumed = run(["--resume", str(part), "--max-steps", "4", "--no-bar"])
    assert code == 0 and resumed.cfg.train.init_codebook_from_data and resumed.codebook_init is None
    assert "codebook initialised from data" not in capsys.readouterr().out
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def _usage_after(config, steps, *overrides):
    trainer = _trainer(config, f"train.max_steps={steps}", *overrides)
    with redirect_stdout(io.StringIO()):
        trainer.fit()
    heldout = fixed_crops(resolve_data(trainer.cfg, split="validation"), 16, seed=0)
    with torch.no_grad():
        _, _, codes = trainer.model.eval()(heldout, return_pred_indices=True)
    return torch.unique(codes).numel()


def test_data_start_keeps_the_codebook_in_use(tmp_path):
    # 30 steps on the built-in photographs: upstream's start collapses to a code or two
    # (measured 1-2 of 64 codes on held-out crops, seeds 23/1/2); the data start keeps
    # most of them (54-56).
    config = tiny_config(tmp_path, use_gan=False, learning_rate=5e-4)
    without = _usage_after(config, 30)
    with_init = _usage_after(config, 30, "train.init_codebook_from_data=true")
    assert with_init >= 32 and with_init >= 4 * without, (with_init, without)


def test_torchrun_two_ranks_start_from_the_same_codebook(torchrun_jobs):
    folder = torchrun_jobs / "codebook_init"
    r0, r1 = (torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["code"] == 0 and r0["step"] == r1["step"] == 2
    assert [k for k in r0["digest"] if r0["digest"][k] != r1["digest"][k]] == []
    # 64 codes counted once, decayed twice (0.99^2 x 64 = 62.7), plus two steps of 2 x 2 crops
    # x 256 vectors x 0.01; upstream's zero counts would give about 20.
    cluster_size_sum = float(r0["tensors"]["model.quantize.embedding.cluster_size"].sum())
    assert cluster_size_sum == pytest.approx(0.99 ** 2 * 64 + 0.01 * 1024 * (1 + 0.99), rel=1e-4)
    output = "".join((folder / f"rank{r}.log").read_text() for r in (0, 1))
    assert output.count("codebook initialised from data") == 1              # rank 0 logs it
