"""``python -m train migrate``: legacy config + Lightning checkpoint -> a folder fit resumes from.

The source checkpoints are made here from the real upstream ``taming.models.vqgan.VQModel``
(importable in tests through a pytorch_lightning 2.x shim), its real
``configure_optimizers`` (so the optimizer parameter order is upstream's, not assumed), real
Lightning callback objects and OmegaConf hyper-parameters inside the pickle.
"""
import argparse
import collections
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from adapters import build_model
from losses.gan import build_discriminator
from train.cli import main
from train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_EMBED, EMBED_DIM = 32, 8
DISC = dict(disc_num_layers=2, disc_ndf=8, disc_in_channels=3)
DUMMY_LOSS = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}


@pytest.fixture(scope="module")
def upstream():
    from tests.conftest import import_upstream_vqgan

    return import_upstream_vqgan()


@pytest.fixture
def ddconfig(tiny_ddconfig):
    return dict(tiny_ddconfig)


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def make_upstream_vqgan(vqgan, ddconfig, seed=0):
    """taming's VQModel with a real PatchGAN at ``loss.discriminator`` (taming's layout:
    VQLPIPSWithDiscriminator itself would download LPIPS weights)."""
    torch.manual_seed(seed)
    model = quiet(vqgan.VQModel, ddconfig=ddconfig, lossconfig=DUMMY_LOSS, n_embed=N_EMBED, embed_dim=EMBED_DIM)
    model.loss = nn.Module()
    model.loss.discriminator = build_discriminator(3, n_layers=DISC["disc_num_layers"], ndf=DISC["disc_ndf"])
    model.learning_rate = 4.5e-6
    return model


def train_upstream_optimizers(model, steps=2):
    """Upstream's own configure_optimizers, stepped with random gradients: real Adam moments."""
    opts, _ = model.configure_optimizers()
    torch.manual_seed(123)
    for _ in range(steps):
        for opt in opts:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.randn_like(p)
            opt.step()
    return opts


def lightning_checkpoint(path, model, opts, global_step=40, epoch=2, prefix=""):
    """The dict Lightning 1.x saved for taming, with objects weights_only refuses."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    hp = OmegaConf.create({"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "lossconfig": DUMMY_LOSS})
    sd = collections.OrderedDict((prefix + k, v) for k, v in model.state_dict().items())
    ckpt = {
        "epoch": epoch, "global_step": global_step, "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.2),
                                        "best_model_path": "/old/ckpt/epoch=1.ckpt"},
                      "objects": [ModelCheckpoint(dirpath=str(path.parent / "ck")), LearningRateMonitor()]},
        "optimizer_states": [o.state_dict() for o in opts],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hp,
        "hparams": argparse.Namespace(base_lr=4.5e-6),
    }
    torch.save(ckpt, path)
    return path


def legacy_config(path, ddconfig, model_type="TamingVQGAN", variant="VQ", use_gan=True, n_embed=N_EMBED,
                  **train_extra):
    """A seed-002-shaped legacy JSON config."""
    doc = {"model_type": model_type,
           "model_args": {"model_variant": variant, "embed_dim": EMBED_DIM, "n_embed": n_embed,
                          "ddconfig": ddconfig,
                          "lossconfig": {"target": "models.taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                         "params": dict(disc_start=0, disc_weight=0.8, codebook_weight=1.0,
                                                        perceptual_weight=0.0, **DISC)}},
           "train_args": {"use_gan": use_gan, "learning_rate": 4.5e-6, "batch_size": 2, "image_size": 32,
                          "save_dir": "checkpoints/old", **train_extra}}
    path.write_text(json.dumps(doc, indent=2))
    return path


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def reconstruct(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0]


def migrated_model(out_dir):
    cfg = load_config(os.path.join(out_dir, "config.yaml"))
    model = build_model(cfg)
    model.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")), strict=True)
    return cfg, model


# ---------------------------------------------------------------------------------------------

def test_seed002_config_and_vq_checkpoint_become_emavq(tmp_path, ddconfig, upstream, capsys):
    """Seed 002: vqvae2 + EMAVQ config, a VQModel Lightning checkpoint with callbacks and
    OmegaConf inside -> TamingVQGAN EMAVQ, EMA statistics from the codebook, same outputs."""
    ref = make_upstream_vqgan(upstream, ddconfig)
    opts = train_upstream_optimizers(ref)
    ckpt = lightning_checkpoint(tmp_path / "last.ckpt", ref, opts)
    config = legacy_config(tmp_path / "taming.json", ddconfig, model_type="vqvae2", variant="EMAVQ", use_gan=False)
    out = tmp_path / "migrated"

    code, stdout, err = run_cli(["migrate", str(config), "--ckpt", str(ckpt), "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["config.yaml", "discriminator.safetensors", "model.safetensors",
                                       "report.json", "report.md", "train_state.pt"]
    cfg, model = migrated_model(out)
    assert (cfg.model_type, cfg.model_variant) == ("TamingVQGAN", "EMAVQ")
    assert cfg.lossconfig.target == "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
    assert "ckpt_path" not in cfg.model_args

    # EMA statistics initialised from the codebook: the EMA codebook is the old one.
    sd = load_file(str(out / "model.safetensors"))
    ref_sd = ref.state_dict()
    assert torch.equal(sd["quantize.embedding.weight"], ref_sd["quantize.embedding.weight"])
    assert torch.equal(sd["quantize.embedding.cluster_size"], torch.ones(N_EMBED))
    assert torch.equal(sd["quantize.embedding.embed_avg"], ref_sd["quantize.embedding.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(reconstruct(model, x), reconstruct(ref, x), rtol=0, atol=1e-5)

    disc = load_file(str(out / "discriminator.safetensors"))
    assert set(disc) == {"discriminator." + k for k in ref.loss.discriminator.state_dict()}
    for key, value in ref.loss.discriminator.state_dict().items():
        assert torch.equal(disc["discriminator." + key], value)

    report = json.loads((out / "report.json").read_text())
    fixes = {f["path"]: f for f in report["config"]["fixes"]}
    assert fixes["model_type"]["before"] == "vqvae2" and fixes["model_type"]["after"] == "TamingVQGAN"
    assert {i["key"] for i in report["weights"]["initialised"]} == {"quantize.embedding.cluster_size",
                                                                    "quantize.embedding.embed_avg"}
    assert report["checkpoint"]["load_method"] == "restricted"
    assert any("ModelCheckpoint" in d for d in report["checkpoint"]["dropped_objects"])
    assert report["checkpoint"]["hyper_parameters"]["n_embed"] == N_EMBED
    gen_info = report["train_state"]["optimizers"]["generator"]
    assert gen_info["carried"] and "quantize.embedding.weight" in gen_info["detail"]
    assert not report["train_state"]["optimizers"]["discriminator"]["carried"]
    whats = " ".join(item["what"] + " " + item["why"] for item in report["not_carried"])
    assert "use_gan is false" in whats
    md = (out / "report.md").read_text()
    assert "vqvae2 -> TamingVQGAN" in md and "cluster_size" in md and "Not carried" in md
    assert "resume" in stdout.lower()

    # Optimizer moments: upstream opt_ae indexes encoder, decoder, quantize, quant_conv,
    # post_quant_conv; EMAVQ's generator optimizer leaves the codebook out.
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["global_step"] == 40 and state["epoch"] == 2
    up_names = ([f"encoder.{n}" for n, _ in ref.encoder.named_parameters()] +
                [f"decoder.{n}" for n, _ in ref.decoder.named_parameters()] +
                [f"quantize.{n}" for n, _ in ref.quantize.named_parameters()] +
                [f"quant_conv.{n}" for n, _ in ref.quant_conv.named_parameters()] +
                [f"post_quant_conv.{n}" for n, _ in ref.post_quant_conv.named_parameters()])
    up_state = opts[0].state_dict()["state"]
    up_by_name = {name: up_state[i] for i, name in enumerate(up_names)}
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [names[id(p)] for p in model.generator_parameters()]
    gen_state = state["optimizer_states"]["generator"]
    assert len(gen_state["state"]) == len(ours) == len(up_names) - 1
    for i, name in enumerate(ours):
        assert torch.equal(gen_state["state"][i]["exp_avg"], up_by_name[name]["exp_avg"])
        assert torch.equal(gen_state["state"][i]["exp_avg_sq"], up_by_name[name]["exp_avg_sq"])
    # ...and the trainer's optimizer (Adam over generator_parameters) accepts it.
    opt = torch.optim.Adam(model.generator_parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt.load_state_dict(gen_state)
    assert "discriminator" not in state["optimizer_states"]


def test_vq_checkpoint_migrates_resumes_and_exports_back(tmp_path, ddconfig, upstream, capsys):
    ref = make_upstream_vqgan(upstream, ddconfig, seed=1)
    opts = train_upstream_optimizers(ref)
    ckpt = lightning_checkpoint(tmp_path / "last.ckpt", ref, opts, global_step=7, epoch=1)
    config = legacy_config(tmp_path / "vq.json", ddconfig, variant="VQ", use_gan=True)
    out = tmp_path / "migrated"
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(ckpt), "--out", str(out)], capsys)
    assert code == 0, err

    _, model = migrated_model(out)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(reconstruct(model, x), reconstruct(ref, x), rtol=0, atol=1e-5)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert set(state["optimizer_states"]) == {"generator", "discriminator"}
    disc_up = opts[1].state_dict()["state"]
    disc_ours = state["optimizer_states"]["discriminator"]["state"]
    assert len(disc_ours) == len(disc_up)
    for i in disc_up:
        assert torch.equal(disc_ours[i]["exp_avg"], disc_up[i]["exp_avg"])
    up_gen = opts[0].state_dict()["state"]
    ours_gen = state["optimizer_states"]["generator"]["state"]
    assert len(ours_gen) == len(up_gen)  # VQ: the same parameters in the same order
    for i in up_gen:
        assert torch.equal(ours_gen[i]["exp_avg_sq"], up_gen[i]["exp_avg_sq"])

    # fit continues at the recorded step.
    from train.fit import run as fit_run

    run = tmp_path / "run"
    code, trainer = fit_run([str(out / "config.yaml"), "--resume", str(out), "--max-steps", "8",
                             "--data", "builtin", "--out", str(run), "--no-bar"])
    assert code == 0
    # the trainer took both carried optimizer states (it notes when one does not fit)
    assert not [n for n in trainer.notes if "optimizer" in n], trainer.notes
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 8
    assert "discriminator" in resumed["optimizers"]

    # Export back to upstream: a plain checkpoint upstream VQModel loads strictly.
    exported = tmp_path / "export.ckpt"
    code, _, err = run_cli(["migrate", "--export", str(out), "--out", str(exported)], capsys)
    assert code == 0, err
    plain = torch.load(exported, weights_only=True)
    assert set(plain) == {"state_dict", "global_step", "epoch"} and plain["global_step"] == 7
    back = make_upstream_vqgan(upstream, ddconfig, seed=99)
    back.load_state_dict(plain["state_dict"], strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # upstream's own ckpt_path loading (init_from_ckpt) takes the file too
    loaded = quiet(upstream.VQModel, ddconfig=ddconfig, lossconfig=DUMMY_LOSS, n_embed=N_EMBED,
                   embed_dim=EMBED_DIM, ckpt_path=str(exported))
    torch.testing.assert_close(reconstruct(loaded, x), reconstruct(ref, x), rtol=0, atol=0)

    # Round trip: migrating the export again gives identical tensors.
    again = tmp_path / "again"
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(exported), "--out", str(again)], capsys)
    assert code == 0, err
    for name in ("model.safetensors", "discriminator.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(again / name))
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.load(again / "train_state.pt", weights_only=True)["global_step"] == 7

    # A trainer run folder exports as well (its last.ckpt holds model + loss).
    code, _, err = run_cli(["migrate", "--export", str(run), "--out", str(tmp_path / "run.ckpt")], capsys)
    assert code == 0, err
    from_run = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert from_run["global_step"] == 8
    assert any(k.startswith("loss.discriminator.") for k in from_run["state_dict"])
    # ...while the trainer's own checkpoint needs no migration, and migrate says so.
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(run / "checkpoints" / "last.ckpt"),
                            "--out", str(tmp_path / "again2")], capsys)
    assert code == 2 and "--resume" in err


def test_weight_decay_run_resumes_with_the_carried_optimizer_moments(tmp_path, ddconfig, upstream, capsys):
    """train.weight_decay > 0: migrate lays the moments out for the trainer's own AdamW
    groups (built by the same function), so fit --resume takes them instead of starting
    Adam fresh while report.md says they were carried."""
    ref = make_upstream_vqgan(upstream, ddconfig, seed=2)
    opts = train_upstream_optimizers(ref)
    ckpt = lightning_checkpoint(tmp_path / "last.ckpt", ref, opts, global_step=5)
    config = legacy_config(tmp_path / "wd.json", ddconfig, variant="VQ", use_gan=True, weight_decay=0.05)
    out = tmp_path / "migrated"
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(ckpt), "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["train_state"]["optimizers"]["generator"]["carried"]
    assert report["train_state"]["optimizers"]["discriminator"]["carried"]

    # upstream's moments by parameter name (opt_ae: encoder, decoder, quantize, quant_conv,
    # post_quant_conv; opt_disc: loss.discriminator)
    up_names = [n for part in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")
                for n, _ in ref.named_parameters() if n.startswith(part + ".")]
    up = {name: opts[0].state_dict()["state"][i] for i, name in enumerate(up_names)}
    up.update({f"discriminator.{n}": opts[1].state_dict()["state"][i]
               for i, (n, _) in enumerate(ref.loss.discriminator.named_parameters())})

    from train.fit import run as fit_run

    # --max-steps at the migrated step: the run loads, trains nothing and saves.
    code, trainer = fit_run([str(out / "config.yaml"), "--resume", str(out), "--max-steps", "5",
                             "--data", "builtin", "--out", str(tmp_path / "run"), "--no-bar"])
    assert code == 0
    assert not [n for n in trainer.notes if "optimizer" in n or "starts fresh" in n], trainer.notes
    model_names = {id(p): n for n, p in trainer.model.named_parameters()}
    disc_names = {id(p): f"discriminator.{n}" for n, p in trainer.disc.module.named_parameters()}
    for opt, names in ((trainer.gen.optimizer, model_names), (trainer.disc.optimizer, disc_names)):
        assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
        params = [p for g in opt.param_groups for p in g["params"]]
        assert params and all(p in opt.state for p in params)
        for p in params:
            assert torch.equal(opt.state[p]["exp_avg"], up[names[id(p)]]["exp_avg"]), names[id(p)]
            assert torch.equal(opt.state[p]["exp_avg_sq"], up[names[id(p)]]["exp_avg_sq"]), names[id(p)]


def test_emavq_checkpoint_carries_its_statistics(tmp_path, ddconfig, capsys):
    from train.schema import make_config

    torch.manual_seed(3)
    src = build_model(make_config(model_type="TamingVQGAN", model_variant="EMAVQ",
                                  model_args=dict(ddconfig=ddconfig, n_embed=N_EMBED, embed_dim=EMBED_DIM)))
    src.train()
    with torch.no_grad():  # a few EMA updates so the statistics are not the initial ones
        for _ in range(3):
            src(torch.rand(2, 3, 32, 32) * 2 - 1)
    # A DDP-wrapped plain state dict, no optimizer states.
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "ema.pt")
    config = legacy_config(tmp_path / "ema.json", ddconfig, variant="EMAVQ", use_gan=False)
    out = tmp_path / "m"
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(tmp_path / "ema.pt"), "--out", str(out)], capsys)
    assert code == 0, err
    sd = load_file(str(out / "model.safetensors"))
    for key in ("quantize.embedding.weight", "quantize.embedding.cluster_size", "quantize.embedding.embed_avg"):
        assert torch.equal(sd[key], src.state_dict()[key])
    assert not torch.equal(sd["quantize.embedding.cluster_size"], torch.zeros(N_EMBED))
    report = json.loads((out / "report.json").read_text())
    assert report["weights"]["prefixes_stripped"] == {"module.": len(sd)}
    assert report["weights"]["initialised"] == []
    assert any(i["what"] == "optimizer states" for i in report["not_carried"])
    assert report["checkpoint"]["load_method"] == "weights_only"
    assert any(i["what"] == "global_step" for i in report["not_carried"])

    # A .safetensors file (e.g. the migrated weights themselves) is a checkpoint too.
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(out / "model.safetensors"), "--out",
                            str(tmp_path / "m3")], capsys)
    assert code == 0, err
    again = load_file(str(tmp_path / "m3" / "model.safetensors"))
    assert all(torch.equal(again[k], sd[k]) for k in sd)

    # EMAVQ -> VQ drops the statistics, with a note.
    config_vq = legacy_config(tmp_path / "vq.json", ddconfig, variant="VQ", use_gan=False)
    code, _, err = run_cli(["migrate", str(config_vq), "--ckpt", str(tmp_path / "ema.pt"), "--out",
                            str(tmp_path / "m2")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "m2" / "report.json").read_text())
    assert any("cluster_size" in d["keys"] for d in report["weights"]["dropped"])


def test_shape_mismatch_exits_2_naming_the_key_and_writes_nothing(tmp_path, ddconfig, upstream, capsys):
    ref = make_upstream_vqgan(upstream, ddconfig)
    ckpt = lightning_checkpoint(tmp_path / "last.ckpt", ref, train_upstream_optimizers(ref, steps=1))
    config = legacy_config(tmp_path / "big.json", ddconfig, variant="EMAVQ", n_embed=64)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["migrate", str(config), "--ckpt", str(ckpt), "--out", str(out)], capsys)
    assert code == 2
    assert "quantize.embedding.weight" in err and "(64, 8)" in err and "(32, 8)" in err
    assert "n_embed" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []


def test_wrong_optimizer_order_is_not_carried_with_reason(tmp_path, ddconfig, upstream, capsys):
    ref = make_upstream_vqgan(upstream, ddconfig)
    # An optimizer over the parameters in another order (quant_conv first): moments no longer
    # line up with upstream's order, so they must not be carried.
    params = list(ref.quant_conv.parameters()) + list(ref.encoder.parameters()) + \
        list(ref.decoder.parameters()) + list(ref.quantize.parameters()) + list(ref.post_quant_conv.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    ckpt = lightning_checkpoint(tmp_path / "odd.ckpt", ref, [opt])
    config = legacy_config(tmp_path / "vq.json", ddconfig, variant="VQ", use_gan=True)
    out = tmp_path / "out"
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(ckpt), "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    gen = report["train_state"]["optimizers"]["generator"]
    assert not gen["carried"] and "shape" in gen["detail"]
    assert "generator" not in torch.load(out / "train_state.pt", weights_only=True)["optimizer_states"]
    assert any(i["what"] == "generator optimizer state" for i in report["not_carried"])


@pytest.mark.parametrize("prefix", ["model.", "module.model.", "models.taming."])
def test_vendored_and_wrapped_prefixes(tmp_path, ddconfig, upstream, capsys, prefix):
    ref = make_upstream_vqgan(upstream, ddconfig)
    ckpt = lightning_checkpoint(tmp_path / "v.ckpt", ref, [], prefix=prefix)
    config = legacy_config(tmp_path / "vq.json", ddconfig, variant="VQ")
    out = tmp_path / "out"
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(ckpt), "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["weights"]["prefixes_stripped"] == {prefix: len(ref.state_dict())}
    assert report["weights"]["renamed"][0] == [prefix + "encoder.conv_in.weight", "encoder.conv_in.weight"]
    assert "prefix `" + prefix + "`" in (out / "report.md").read_text()


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_checkpoint_runs_nothing_through_the_cli(tmp_path, ddconfig):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.ones(1)}, "callbacks": {"x": _Payload(target)}}, evil)
    config = legacy_config(tmp_path / "vq.json", ddconfig)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "train", "migrate", str(config), "--ckpt", str(evil),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "refused" in proc.stderr and ("posix.system" in proc.stderr or "os.system" in proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not target.exists() and not out.exists()


def test_cli_exit_codes(tmp_path, ddconfig, upstream, capsys):
    config = legacy_config(tmp_path / "vq.json", ddconfig)
    # no --out / no CONFIG / unknown flag
    assert run_cli(["migrate", str(config)], capsys)[0] == 2
    assert run_cli(["migrate", "--out", str(tmp_path / "x")], capsys)[0] == 2
    assert run_cli(["migrate", str(config), "--out", str(tmp_path / "x"), "--bogus"], capsys)[0] == 2
    # missing config / checkpoint files
    code, _, err = run_cli(["migrate", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(tmp_path / "nope.ckpt"), "--out",
                            str(tmp_path / "x")], capsys)
    assert code == 2 and "does not exist" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli(["migrate", str(config), "--ckpt", str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "is a folder" in err
    # config only: migrates the config, says the weights were not carried
    code, out, err = run_cli(["migrate", str(config), "--out", str(tmp_path / "cfg_only")], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "cfg_only")) == ["config.yaml", "report.json", "report.md"]
    assert "no --ckpt" in out
    # an existing folder is not overwritten without --force
    code, _, err = run_cli(["migrate", str(config), "--out", str(tmp_path / "cfg_only")], capsys)
    assert code == 2 and "--force" in err
    assert run_cli(["migrate", str(config), "--out", str(tmp_path / "cfg_only"), "--force"], capsys)[0] == 0
    # a config whose errors --fix cannot correct
    bad = json.loads(config.read_text())
    del bad["model_args"]["n_embed"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, _, err = run_cli(["migrate", str(tmp_path / "bad.json"), "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "n_embed" in err and not (tmp_path / "y").exists()
    # a checkpoint of another variant: strict load explains the fix
    ref = make_upstream_vqgan(upstream, ddconfig)
    gumbel_cfg = legacy_config(tmp_path / "g.json", ddconfig, variant="Gumbel")
    ckpt = lightning_checkpoint(tmp_path / "vq.ckpt", ref, [])
    code, _, err = run_cli(["migrate", str(gumbel_cfg), "--ckpt", str(ckpt), "--out", str(tmp_path / "z")], capsys)
    assert code == 2 and "quantize" in err and not (tmp_path / "z").exists()
    # export: bad source / existing target
    assert run_cli(["migrate", "--export", str(tmp_path / "nothing"), "--out", str(tmp_path / "e.ckpt")],
                   capsys)[0] == 2
    assert run_cli(["migrate", "--export", str(tmp_path / "cfg_only"), "--out", str(tmp_path / "e.ckpt")],
                   capsys)[0] == 2


def test_taming_yaml_with_ckpt_path_and_perceptual_entries(tmp_path, ddconfig, upstream, capsys):
    """An official-style taming YAML naming its checkpoint in model.params.ckpt_path; the
    checkpoint carries LPIPS entries (loss.perceptual_loss.*) as real VQGAN checkpoints do."""
    import yaml

    ref = make_upstream_vqgan(upstream, ddconfig, seed=4)
    ckpt = lightning_checkpoint(tmp_path / "vq.ckpt", ref, [])
    raw = torch.load(ckpt, weights_only=False)
    raw["state_dict"]["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    raw["state_dict"]["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    torch.save(raw, ckpt)
    doc = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ckpt_path": str(ckpt),
                                "ignore_keys": [], "ddconfig": ddconfig,
                                "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                               "params": dict(disc_start=10, perceptual_weight=0.0, **DISC)}}},
           "lightning": {"trainer": {"max_steps": 100}}}
    config = tmp_path / "vqgan.yaml"
    config.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    code, _, err = run_cli(["migrate", str(config), "--out", str(out)], capsys)
    assert code == 0, err
    cfg, model = migrated_model(out)
    assert "ckpt_path" not in cfg.model_args and cfg.train.max_steps == 100
    assert cfg.train.base_learning_rate == 4.5e-6
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(reconstruct(model, x), reconstruct(ref, x), rtol=0, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert any("ckpt_path" in n for n in report["config"]["notes"])
    dropped = {d["keys"]: d for d in report["weights"]["dropped"]}
    assert dropped["loss.perceptual_loss.*"]["count"] == 2
    assert "lpips" in dropped["loss.perceptual_loss.*"]["reason"].lower()
