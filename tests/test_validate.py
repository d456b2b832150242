"""Consistency rules of ``python -m train validate``: one table row per rule."""
import copy
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from train.validate import ERROR, INFO, WARNING, validate_file, fix_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"

BASE = {
    "model_type": "TamingVQGAN",
    "model_args": {
        "model_variant": "EMAVQ", "embed_dim": 16, "n_embed": 64,
        "ddconfig": {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3,
                     "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                     "dropout": 0.0},
        "lossconfig": {"target": TAMING_LOSS,
                       "params": {"disc_start": 100, "disc_weight": 0.8, "codebook_weight": 1.0,
                                  "disc_in_channels": 3}},
    },
    "train_args": {"use_gan": True, "learning_rate": 1e-4, "batch_size": 2, "max_steps": 1000},
}


def write(tmp_path, doc, name="cfg.json"):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(doc))
    else:
        path.write_text(yaml.safe_dump(doc))
    return str(path)


def mutate(fn):
    doc = copy.deepcopy(BASE)
    fn(doc)
    return doc


def _set(doc, keys, value):
    node = doc
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value


def _del(doc, keys):
    node = doc
    for k in keys[:-1]:
        node = node[k]
    del node[keys[-1]]


RULES = [
    # (id, mutation, level, code, path, words the message or fix must contain)
    ("seed002_vqvae2_emavq", lambda d: _set(d, ["model_type"], "vqvae2"), ERROR, "variant_mismatch",
     "model_variant", ["TamingVQGAN", "remove model_variant", "silently dropped"]),
    ("unknown_variant", lambda d: _set(d, ["model_args", "model_variant"], "EMAVQQ"), ERROR, "unknown_variant",
     "model_variant", ["EMAVQ"]),
    ("loss_family_mismatch",
     lambda d: (_set(d, ["model_type"], "vqvae2"), _del(d, ["model_args", "model_variant"])), ERROR,
     "loss_family_mismatch", "lossconfig.target", ["vqvae2", "taming", "TamingVQGAN"]),
    ("vendored_target", lambda d: _set(d, ["model_args", "lossconfig", "target"], "models." + TAMING_LOSS), INFO,
     "vendored_target", "lossconfig.target", [TAMING_LOSS]),
    ("unknown_loss_target", lambda d: _set(d, ["model_args", "lossconfig", "target"], "foo.Bar"), ERROR,
     "unknown_loss_target", "lossconfig.target", []),
    ("loss_param_typo", lambda d: d["model_args"]["lossconfig"]["params"].update(disc_strat=5), ERROR,
     "unknown_loss_param", "lossconfig.params.disc_strat", ["disc_start"]),
    ("loss_param_type", lambda d: _set(d, ["model_args", "lossconfig", "params", "disc_start"], "100"), ERROR,
     "bad_type", "lossconfig.params.disc_start", ["disc_start"]),
    ("train_type", lambda d: _set(d, ["train_args", "batch_size"], "eight"), ERROR, "bad_type",
     "train.batch_size", ["batch_size"]),
    ("model_arg_type", lambda d: _set(d, ["model_args", "n_embed"], "1024"), ERROR, "bad_type",
     "model_args.n_embed", ["n_embed"]),
    ("gan_off_inert", lambda d: _set(d, ["train_args", "use_gan"], False), INFO, "gan_settings_inert",
     "train.use_gan", ["inert", "disc_start"]),
    ("gan_never_starts", lambda d: _set(d, ["train_args", "max_steps"], 100), WARNING, "gan_never_starts",
     "lossconfig.params.disc_start", ["never starts"]),
    ("double_z", lambda d: _set(d, ["model_args", "ddconfig", "double_z"], True), ERROR, "double_z_on_vq",
     "model_args.ddconfig.double_z", ["double_z: false"]),
    ("attn_unreachable", lambda d: _set(d, ["model_args", "ddconfig", "attn_resolutions"], [5]), WARNING,
     "attn_unreachable", "model_args.ddconfig.attn_resolutions", ["never reached"]),
    ("non_positive", lambda d: _set(d, ["model_args", "ddconfig", "ch"], 0), ERROR, "bad_value",
     "model_args.ddconfig.ch", ["positive"]),
    ("disc_channels", lambda d: _set(d, ["model_args", "lossconfig", "params", "disc_in_channels"], 4), ERROR,
     "disc_channels_mismatch", "lossconfig.params.disc_in_channels", ["out_ch"]),
    ("groupnorm_width", lambda d: _set(d, ["model_args", "ddconfig", "ch"], 24), ERROR, "groupnorm_width",
     "model_args.ddconfig.ch", ["32"]),
    ("gumbel_embed_dim", lambda d: (_set(d, ["model_args", "model_variant"], "Gumbel"),
                                    _set(d, ["model_args", "embed_dim"], 8)), ERROR, "gumbel_embed_dim",
     "model_args.embed_dim", ["z_channels"]),
    ("model_arg_typo", lambda d: d["model_args"].update(n_embd=3), ERROR, "unknown_model_arg",
     "model_args.n_embd", ["n_embed"]),
    ("model_arg_other_variant", lambda d: d["model_args"].update(kl_weight=1e-8), ERROR, "unknown_model_arg",
     "model_args.kl_weight", ["EMAVQ"]),
    ("ignored_key", lambda d: _set(d, ["train_args", "wandb_project"], "x"), WARNING, "ignored_key",
     "extras.train_args.wandb_project", ["ignored"]),
    ("unknown_model_type", lambda d: _set(d, ["model_type"], "TamingVQGNA"), ERROR, "unknown_model_type",
     "model_type", ["TamingVQGAN"]),
    ("codebook_init_needs_ema", lambda d: (_set(d, ["model_args", "model_variant"], "VQ"),
                                           _set(d, ["train_args", "init_codebook_from_data"], True)), ERROR,
     "codebook_init_needs_ema", "train.init_codebook_from_data", ["EMA", "init_codebook_from_data: false"]),
    ("codebook_init_overwrites_weights", lambda d: (_set(d, ["model_args", "ckpt_path"], "last.ckpt"),
                                                    _set(d, ["train_args", "init_codebook_from_data"], True)),
     ERROR, "codebook_init_overwrites_weights", "train.init_codebook_from_data", ["ckpt_path", "false"]),
    ("negative_learning_rate", lambda d: _set(d, ["train_args", "learning_rate"], -1e-4), ERROR, "bad_value",
     "train.learning_rate", ["positive"]),
    ("nan_grad_clip", lambda d: _set(d, ["train_args", "grad_clip"], float("nan")), ERROR, "bad_value",
     "train.grad_clip", ["positive"]),
    ("negative_weight_decay", lambda d: _set(d, ["train_args", "weight_decay"], -0.1), ERROR, "bad_value",
     "train.weight_decay", [">= 0"]),
    ("negative_seed", lambda d: _set(d, ["train_args", "seed"], -5), ERROR, "bad_value", "train.seed", [">= 0"]),
    ("negative_num_workers", lambda d: _set(d, ["train_args", "num_workers"], -1), ERROR, "bad_value",
     "train.num_workers", [">= 0"]),
]


@pytest.mark.parametrize("case", RULES, ids=[r[0] for r in RULES])
def test_rule(tmp_path, case):
    _, fn, level, code, path, words = case
    _, findings = validate_file(write(tmp_path, mutate(fn)))
    hits = [f for f in findings if f.code == code and f.path == path]
    assert hits, f"expected {code} at {path}, got {[(f.code, f.path) for f in findings]}"
    assert hits[0].level == level
    text = hits[0].message + " " + hits[0].fix
    for word in words:
        assert word in text, (word, text)


def test_base_is_clean(tmp_path):
    _, findings = validate_file(write(tmp_path, BASE))
    assert [f for f in findings if f.level != INFO] == []


@pytest.mark.parametrize("target,what", [
    ("taming.models.cond_transformer.Net2NetTransformer", "second-stage transformer"),
    ("taming.models.vqgan.VQSegmentationModel", "segmentation"),
])
def test_not_first_stage(tmp_path, target, what):
    doc = {"model": {"target": target, "params": {"transformer_config": {}, "first_stage_config": {},
                                                  "cond_stage_config": "__is_unconditional__"}}}
    _, findings = validate_file(write(tmp_path, doc, "net2net.yaml"))
    errors = [f for f in findings if f.level == ERROR]
    assert len(errors) == 1 and errors[0].code == "not_first_stage"
    assert what in errors[0].message and "first-stage" in errors[0].message


def test_upstream_data_and_lightning_never_stop(tmp_path):
    doc = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": 16, "n_embed": 64, "ddconfig": BASE["model_args"]["ddconfig"],
                                "lossconfig": {"target": TAMING_LOSS, "params": {"disc_start": 10}}}},
           "data": {"target": "main.DataModuleFromConfig",
                    "params": {"batch_size": 3, "train": {"target": "taming.data.imagenet.ImageNetTrain",
                                                          "params": {"config": {"size": 32}}}}},
           "lightning": {"trainer": {"benchmark": True, "accumulate_grad_batches": 2},
                         "callbacks": {"x": {"target": "some.Callback"}}}}
    _, findings = validate_file(write(tmp_path, doc, "imagenet.yaml"))
    assert not [f for f in findings if f.level == ERROR]
    from train.config import load_config
    cfg = load_config(write(tmp_path, doc, "imagenet.yaml"))
    assert (cfg.model_type, cfg.model_variant) == ("TamingVQGAN", "VQ")
    assert cfg.train.batch_size == 3 and cfg.train.accumulate_grad_batches == 2
    assert cfg.upstream["data"]["params"]["train"]["target"] == "taming.data.imagenet.ImageNetTrain"


@pytest.mark.parametrize("syntax", ["json", "yaml"])
def test_fix_writes_same_format_and_validates_clean(tmp_path, syntax):
    doc = mutate(lambda d: (_set(d, ["model_type"], "vqvae2"),
                            _set(d, ["model_args", "lossconfig", "target"], "models." + TAMING_LOSS),
                            d["model_args"]["lossconfig"]["params"].update(disc_strat=5),
                            _set(d, ["model_args", "ddconfig", "double_z"], True),
                            _set(d, ["model_args", "lossconfig", "params", "disc_in_channels"], 4)))
    src = write(tmp_path, doc, f"in.{syntax}")
    out = str(tmp_path / f"out.{syntax}")
    before, after = fix_file(src, out)
    assert sum(f.level == ERROR for f in before) >= 4
    assert [f for f in after if f.level == ERROR] == []
    fixed = json.load(open(out)) if syntax == "json" else yaml.safe_load(open(out))
    assert fixed["model_type"] == "TamingVQGAN"
    assert fixed["model_args"]["model_variant"] == "EMAVQ"
    assert fixed["model_args"]["lossconfig"]["target"] == TAMING_LOSS
    assert fixed["model_args"]["lossconfig"]["params"]["disc_start"] == 5
    assert "disc_strat" not in fixed["model_args"]["lossconfig"]["params"]


def test_fix_taming_yaml_keeps_upstream_shape(tmp_path):
    doc = yaml.safe_load(open(os.path.join(ROOT, "configs/taming/custom_vqgan.yaml")))
    doc["model"]["params"]["lossconfig"]["params"]["disc_weigth"] = 0.5
    src = write(tmp_path, doc, "up.yaml")
    before, after = fix_file(src, str(tmp_path / "fixed.yaml"))
    assert any(f.code == "unknown_loss_param" for f in before) and not [f for f in after if f.level == ERROR]
    fixed = yaml.safe_load(open(tmp_path / "fixed.yaml"))
    assert fixed["model"]["target"] == "taming.models.vqgan.VQModel"
    assert fixed["model"]["params"]["lossconfig"]["params"]["disc_weight"] == 0.5


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "train", "validate", *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_cli_exit_codes_and_json(tmp_path):
    ok = run_cli("configs/legacy/taming_emavq_nogan.json")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("configs/legacy/taming_vqvae2_mismatch.json", "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    findings = report["configs/legacy/taming_vqvae2_mismatch.json"]["findings"]
    assert {"level", "path", "code", "message", "fix"} <= set(findings[0])
    assert any(f["code"] == "variant_mismatch" and f["level"] == "error" for f in findings)


def _unusable_files(tmp_path):
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "broken.json").write_text('{"model_type": "TamingVQGAN",\n "model_args": {,}}')
    (tmp_path / "broken.yaml").write_text("model:\n  target: [unclosed\n  params: 1\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "other.yaml").write_text("foo: 1\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x01")
    return {"missing": str(tmp_path / "nope.json"), "empty": str(tmp_path / "empty.json"),
            "json_syntax": str(tmp_path / "broken.json"), "yaml_syntax": str(tmp_path / "broken.yaml"),
            "not_mapping": str(tmp_path / "list.yaml"), "not_config": str(tmp_path / "other.yaml"),
            "directory": str(tmp_path / "adir"), "binary": str(tmp_path / "binary.json")}


def test_cli_unusable_files_exit_2_one_line(tmp_path):
    files = _unusable_files(tmp_path)
    results = {}
    for kind, path in files.items():
        res = results[kind] = run_cli(path)
        assert res.returncode == 2, (kind, res.stdout, res.stderr)
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, (kind, res.stderr)
        assert path in lines[0], (kind, lines[0])
    assert ":2:" in results["json_syntax"].stderr  # the line of the syntax error


def test_every_shipped_config_validates():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.json"), recursive=True)
                   + glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    assert len(paths) >= 6
    for path in paths:
        _, findings = validate_file(path)
        errors = [f for f in findings if f.level == ERROR]
        if path.endswith("taming_vqvae2_mismatch.json"):
            assert [f.code for f in errors] == ["variant_mismatch"]
        else:
            assert errors == [], (path, errors)


@pytest.mark.parametrize("args,code,level", [
    ({"chanel": 64}, "unknown_model_arg", ERROR),
    ({"n_res_block": 0}, None, None),
    ({"n_res_channel": 0}, "bad_value", ERROR),
    ({"something_else": 1}, "ignored_model_arg", WARNING),
])
def test_vqvae2_model_args(tmp_path, args, code, level):
    doc = {"model_type": "vqvae2", "model_args": dict(args), "train_args": {"use_gan": False}}
    _, findings = validate_file(write(tmp_path, doc))
    relevant = [f for f in findings if f.path.startswith("model_args")]
    if code is None:
        assert relevant == []
    else:
        assert relevant and relevant[0].code == code and relevant[0].level == level


def test_dinovq_rules(tmp_path):
    tiny = yaml.safe_load(open(os.path.join(ROOT, "configs/dinovq_tiny.yaml")))
    tiny["data"]["image_size"] = tiny["model_args"]["img_size"] * 2 if isinstance(
        tiny["model_args"]["img_size"], int) else 64
    tiny["teacher"]["allow_random"] = False
    tiny["teacher"]["ckpt_path"] = None
    _, findings = validate_file(write(tmp_path, tiny, "d.yaml"))
    codes = {(f.code, f.level) for f in findings}
    assert ("image_size_mismatch", ERROR) in codes
    assert ("teacher_weights_missing", WARNING) in codes


def test_cli_override_argument_is_named(tmp_path):
    res = run_cli("configs/demo_emavq.json", "train.batch_size=abc")
    assert res.returncode == 2 and "not key=value overrides" in res.stderr and "Traceback" not in res.stderr
