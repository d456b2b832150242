"""One run-config path: every command checks its config with the rules ``validate`` runs."""
import json
import os

import pytest
import yaml

from train.cli import main
from train.errors import UserError
from train.run_config import load_run_config, load_stored_config
from train.validate import fix_document, validate_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY = os.path.join(ROOT, "configs", "legacy", "taming_emavq_nogan.json")


def legacy(tmp_path, **changes):
    with open(LEGACY) as fh:
        doc = json.load(fh)
    for dotted, value in changes.items():
        node = doc
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_a_silently_normalised_name_is_a_finding_and_fix_writes_the_canonical_one(tmp_path):
    path = legacy(tmp_path, model_type="TamingVQGan", model_args__model_variant="emavq")
    norm, findings = validate_file(path)
    named = {f.path: f for f in findings if f.code == "noncanonical_name"}
    assert set(named) == {"model_type", "model_variant"} and all(f.level == "info" for f in named.values())
    assert "'TamingVQGan' is read as 'TamingVQGAN'" in named["model_type"].message
    fixed = fix_document(norm, findings)
    assert fixed["model_type"] == "TamingVQGAN" and fixed["model_args"]["model_variant"] == "EMAVQ"
    out = tmp_path / "fixed.json"
    assert main(["validate", path, "--fix", str(out)]) == 0
    again, after = validate_file(str(out))
    assert not [f for f in after if f.code == "noncanonical_name"]
    # The canonical spelling is also what the typed config carries.
    cfg = load_run_config(path).cfg
    assert (cfg.model_type, cfg.model_variant) == ("TamingVQGAN", "EMAVQ")


def test_an_alias_is_reported_too(tmp_path):
    _, findings = validate_file(legacy(tmp_path, model_type="VQGAN"))
    assert [f.message for f in findings if f.code == "noncanonical_name"] == \
        ["model_type 'VQGAN' is read as 'TamingVQGAN'"]


def test_load_run_config_refuses_every_error_at_once(tmp_path):
    path = legacy(tmp_path, model_type="vqvae2", train_args__batch_size=0)
    with pytest.raises(UserError) as err:
        load_run_config(path)
    text = str(err.value)
    assert "2 config error(s)" in text
    assert "TamingVQGAN" in text and "train.batch_size" in text and "--fix OUT" in text


def test_a_stored_config_goes_through_the_same_rules():
    with open(os.path.join(ROOT, "configs", "vqvae2_tiny.json")) as fh:
        doc = json.load(fh)
    text = yaml.safe_dump(doc)
    assert load_stored_config(text, "run/checkpoints/last.ckpt (stored config)").cfg.model_type == "vqvae2"
    with pytest.raises(UserError, match=r"last.ckpt \(stored config\): 2 config error.*model_variant"):
        load_stored_config(text, "run/checkpoints/last.ckpt (stored config)", ["model_variant=EMAVQ"])


def test_model_scope_ignores_loss_and_train_errors_but_not_model_errors(tmp_path):
    path = legacy(tmp_path, train_args__batch_size=0)
    assert load_run_config(path, scope="model").cfg.train.batch_size == 0
    with pytest.raises(UserError, match="train.batch_size"):
        load_run_config(path)
    bad_model = legacy(tmp_path, model_args__n_embed=-3)
    with pytest.raises(UserError, match="n_embed"):
        load_run_config(bad_model, scope="model")


def test_validate_finds_what_fit_would_refuse(tmp_path, capsys):
    """Values the trainer used to refuse only after validate said ok."""
    for change, words in ((dict(train_args__batch_size=0), "batch_size"),
                          (dict(train_args__precision="fp64"), "precision"),
                          (dict(train_args__adam_betas=[0.5, 0.9, 0.99]), "adam_betas")):
        path = legacy(tmp_path, **change)
        assert main(["validate", path]) == 1
        assert words in capsys.readouterr().out
        assert main(["fit", path, "--data", "builtin", "--max-steps", "1", "--out", str(tmp_path / "run")]) == 2
        assert words in capsys.readouterr().err


def test_fit_resume_checks_the_stored_config(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    from adapters import registry

    config.write_text(yaml.safe_dump(registry.get_model_type("vqvae2").tiny_config()))
    run = tmp_path / "run"
    assert main(["fit", str(config), "--data", "builtin", "--max-steps", "1", "--out", str(run), "--no-bar"]) == 0
    capsys.readouterr()
    assert main(["fit", "--resume", str(run), "--max-steps", "2", "--no-bar", "model_variant=EMAVQ"]) == 2
    err = capsys.readouterr().err
    assert "stored config" in err and "TamingVQGAN" in err
