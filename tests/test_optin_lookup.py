"""Lookup opt-ins of TamingVQGAN's VectorQuantizer2 (``model_args.codebook_l2_norm``,
``model_args.codebook_embed_dim``; ``adapters/vq_lookup.py``): off by default and then
taming's quantizer exactly; the l2 lookup on a hand-made codebook; the low-dimensional
layout; a real training step; validate findings; ``fit`` and ``migrate --export`` refusing."""
import json
import os
import subprocess
import sys

import pytest
import torch
from taming.modules.vqvae.quantize import VectorQuantizer2

from adapters import build_model
from adapters.vq_lookup import LookupQuantizer

from tests.test_fit import tiny_config
from train.cli import main as cli
from train.fit import run
from train.schema import make_config
from train.validate import validate_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(ddconfig, seed=0, variant="VQ", **extra):
    torch.manual_seed(seed)
    args = dict(n_embed=32, embed_dim=8, ddconfig=ddconfig, **extra)
    return build_model(make_config(model_type="TamingVQGAN", model_variant=variant, model_args=args))


def _edit(path, variant=None, **model_args):
    with open(path) as fh:
        doc = json.load(fh)
    doc["model_args"].update(model_args)
    if variant:
        doc["model_variant"] = variant
    with open(path, "w") as fh:
        json.dump(doc, fh)
    return path


def test_defaults_and_no_op_values_build_taming_quantizer_exactly(tiny_ddconfig):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    base = _model(tiny_ddconfig)
    for extra in ({"codebook_l2_norm": False}, {"codebook_embed_dim": 8}, {"codebook_embed_dim": None}):
        other = _model(tiny_ddconfig, **extra)
        assert type(other.quantize) is VectorQuantizer2, extra
        sd_a, sd_b = base.state_dict(), other.state_dict()
        assert list(sd_a) == list(sd_b)
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        base.eval(), other.eval()
        with torch.no_grad():
            assert torch.equal(base(x)[0], other(x)[0])


def test_l2_lookup_ranks_by_angle_and_returns_unit_codes():
    codes = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    z = torch.tensor([0.5, 0.6]).reshape(1, 2, 1, 1)     # Euclid: code 0 (dist 1.6); angle: code 1
    plain = VectorQuantizer2(3, 2, 0.25)
    l2 = LookupQuantizer(3, 2, 0.25, l2_norm=True)
    with torch.no_grad():
        plain.embedding.weight.copy_(codes)
        l2.embedding.weight.copy_(codes)
    assert plain(z)[2][2].item() == 0
    z_q, loss, (_, _, idx) = l2(z)
    assert idx.item() == 1
    assert torch.allclose(z_q.flatten(), torch.tensor([0.0, 1.0]), atol=1e-6)
    # The loss is measured between the normalised vectors: |(0, 1) - (0.5, 0.6)/|.||^2 / 2 * 1.25.
    zn = torch.tensor([0.5, 0.6]) / torch.tensor([0.5, 0.6]).norm()
    assert torch.allclose(loss, 1.25 * ((torch.tensor([0.0, 1.0]) - zn) ** 2).mean())
    # Every code handed to the decoder has unit norm, and decode_code's lookup agrees.
    z_many = torch.randn(4, 2, 3, 3)
    out, _, (_, _, idx) = l2(z_many)
    assert torch.allclose(out.norm(dim=1), torch.ones(4, 3, 3), atol=1e-5)
    assert torch.allclose(l2.get_codebook_entry(idx, (4, 3, 3, 2)), out, atol=1e-6)
    # A codebook starts normalised (LlamaGen).
    assert torch.allclose(LookupQuantizer(16, 4, 0.25, l2_norm=True).embedding.weight.norm(dim=1), torch.ones(16))


def test_low_dimensional_lookup_layout_and_decoding(tiny_ddconfig):
    model = _model(tiny_ddconfig, codebook_l2_norm=True, codebook_embed_dim=4)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reference = {k: tuple(v.shape) for k, v in _model(tiny_ddconfig).state_dict().items()}
    # Upstream tensors keep names and shapes, except the codebook, which lives in the small space.
    assert shapes["quantize.embedding.weight"] == (32, 4)
    assert {k: s for k, s in shapes.items() if k != "quantize.embedding.weight" and k in reference} == \
        {k: s for k, s in reference.items() if k != "quantize.embedding.weight"}
    assert sorted(set(shapes) - set(reference)) == ["quantize.proj_down.bias", "quantize.proj_down.weight",
                                                    "quantize.proj_up.bias", "quantize.proj_up.weight"]
    assert shapes["quantize.proj_down.weight"] == (4, 8) and shapes["quantize.proj_up.weight"] == (8, 4)
    model.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        xrec, _, (idx,) = model(x, return_codes=True)
        assert idx.shape == (2, 8, 8) and int(idx.max()) < 32
        assert torch.allclose(model.decode_code(idx), xrec, atol=1e-5)


def _codes(findings):
    return {(f.path, f.code) for f in findings if f.level == "error"}


@pytest.mark.parametrize("variant,args,expected", [
    ("VQ", {"codebook_l2_norm": "yes"}, ("model_args.codebook_l2_norm", "bad_type")),
    ("VQ", {"codebook_embed_dim": 0}, ("model_args.codebook_embed_dim", "bad_value")),
    ("VQ", {"codebook_embed_dim": 32}, ("model_args.codebook_embed_dim", "too_large")),   # embed_dim is 16
    ("VQ", {"codebook_embed_dim": 2.5}, ("model_args.codebook_embed_dim", "bad_type")),
    ("EMAVQ", {"codebook_l2_norm": True}, ("model_args.codebook_l2_norm", "lookup_needs_vq2")),
    ("Gumbel", {"codebook_embed_dim": 4}, ("model_args.codebook_embed_dim", "lookup_needs_vq2")),
    ("VQ", {"codebook_l2_nrom": True}, ("model_args.codebook_l2_nrom", "unknown_model_arg")),
])
def test_validate_findings_for_bad_lookup_values(tmp_path, variant, args, expected):
    path = _edit(tiny_config(tmp_path, variant=variant), **args)
    _, findings = validate_file(path)
    assert expected in _codes(findings), [f.as_dict() for f in findings]
    hit = next(f for f in findings if (f.path, f.code) == expected)
    assert hit.fix
    if expected[1] == "lookup_needs_vq2":
        assert "VQ and NoDisc" in hit.message and "VectorQuantizer2" in hit.message
    if expected[1] == "unknown_model_arg":
        assert "codebook_l2_norm" in hit.message


def test_lookup_keys_on_another_model_type_are_refused(tmp_path):
    path = tmp_path / "vqvae2.json"
    doc = json.load(open(os.path.join(ROOT, "configs", "vqvae2_tiny.json")))
    doc.setdefault("model_args", {})["codebook_l2_norm"] = True
    path.write_text(json.dumps(doc))
    _, findings = validate_file(str(path))
    assert ("model_args.codebook_l2_norm", "opt_in_unsupported") in _codes(findings)
    hit = next(f for f in findings if f.code == "opt_in_unsupported")
    assert "TamingVQGAN" in hit.message and "TamingVQGAN" in hit.fix


def test_valid_opt_ins_have_no_findings(tmp_path):
    path = _edit(tiny_config(tmp_path, variant="NoDisc", use_gan=False), codebook_l2_norm=True, codebook_embed_dim=4)
    _, findings = validate_file(path)
    assert not [f for f in findings if f.path.startswith("model_args.codebook")]


def test_fit_refuses_a_bad_lookup_before_training(tmp_path):
    path = _edit(tiny_config(tmp_path, variant="EMAVQ"), codebook_l2_norm=True)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "train", "fit", path, "--out", str(out), "--no-bar",
                           "--max-steps", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert "codebook_l2_norm" in said and "VectorQuantizer2" in said and "Traceback" not in said
    assert not (out / "checkpoints").exists()


def test_one_training_step_then_export_is_refused(tmp_path, capsys):
    path = _edit(tiny_config(tmp_path, variant="VQ", ckpt_every=1), codebook_l2_norm=True, codebook_embed_dim=4)
    out = tmp_path / "run"
    code, trainer = run([path, "--out", str(out), "--max-steps", "1", "--no-bar"])
    assert code == 0 and trainer.step == 1
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["model"]["quantize.embedding.weight"].shape == (64, 4)
    assert "codebook_l2_norm: true" in saved["config"]
    capsys.readouterr()
    target = tmp_path / "upstream.ckpt"
    assert cli(["migrate", "--export", str(out), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "codebook_l2_norm" in err and "codebook_embed_dim" in err and "decode" in err
    assert not target.exists()
