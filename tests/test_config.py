"""Config loading (all three shapes, overrides) and the model-type registry."""
import json
import os

import pytest
import yaml

from adapters import registry
from train.config import load_config
from train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY = os.path.join(ROOT, "configs/legacy/taming_emavq_nogan.json")
TAMING_YAML = os.path.join(ROOT, "configs/taming/custom_vqgan.yaml")


def test_legacy_json_normalizes():
    cfg = load_config(LEGACY)
    assert (cfg.model_type, cfg.model_variant) == ("TamingVQGAN", "EMAVQ")
    assert cfg.train.use_gan is False and cfg.train.learning_rate == 4.5e-6
    assert cfg.lossconfig.target.endswith("VQLPIPSWithDiscriminator")
    assert cfg.model_args.ddconfig.z_channels == 256 and "model_variant" not in cfg.model_args
    assert cfg.source.format == "legacy_json"


def test_legacy_extras_and_renames_are_kept(tmp_path):
    doc = json.load(open(LEGACY))
    doc["train_args"].update({"epochs": 7, "lr": 1e-3, "wandb": "proj"})
    doc["train_args"].pop("learning_rate")
    doc["output_dir"] = "somewhere"
    path = tmp_path / "x.json"
    path.write_text(json.dumps(doc))
    cfg = load_config(str(path))
    assert cfg.train.max_epochs == 7 and cfg.train.learning_rate == 1e-3
    assert cfg.extras["train_args.wandb"] == "proj" and cfg.extras["output_dir"] == "somewhere"


def test_taming_yaml_normalizes():
    cfg = load_config(TAMING_YAML)
    assert (cfg.model_type, cfg.model_variant) == ("TamingVQGAN", "VQ")
    assert cfg.train.base_learning_rate == 4.5e-6 and cfg.train.learning_rate is None
    assert cfg.train.batch_size == 5 and cfg.train.accumulate_grad_batches == 2
    assert cfg.data.image_size == 256 and cfg.source.format == "taming_yaml"
    assert cfg.upstream["data"]["params"]["train"]["target"] == "taming.data.custom.CustomTrain"


def test_native_round_trip(tmp_path):
    from omegaconf import OmegaConf
    cfg = load_config(LEGACY, ["train.max_steps=5"])
    out = tmp_path / "native.yaml"
    OmegaConf.save(cfg, out)
    again = load_config(str(out))
    assert again.source.format == "native"
    assert OmegaConf.to_container(again.model_args) == OmegaConf.to_container(cfg.model_args)
    assert again.train == cfg.train and again.lossconfig == cfg.lossconfig


def test_native_unknown_key_rejected(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump({"model_type": "TamingVQGAN", "train": {"max_stepz": 3}}))
    with pytest.raises(UserError, match="max_steps"):
        load_config(str(path))


@pytest.mark.parametrize("override,expect", [
    ("train.max_steps=12", ("train", "max_steps", 12)),
    ("train.use_gan=true", ("train", "use_gan", True)),
    ("train.learning_rate=1e-3", ("train", "learning_rate", 1e-3)),
    ("model_args.n_embed=32", ("model_args", "n_embed", 32)),
    ("lossconfig.params.disc_start=7", None),
])
def test_overrides_apply(override, expect):
    cfg = load_config(LEGACY, [override])
    if expect:
        section, key, value = expect
        assert cfg[section][key] == value


@pytest.mark.parametrize("override,words", [
    ("train.max_step=3", ["max_steps"]),
    ("train.batch_size=abc", ["batch_size", "int"]),
    ("trian.batch_size=3", ["train"]),
    ("model_args.n_embd=3", ["n_embed"]),
    ("novalue", ["key=value"]),
])
def test_bad_overrides(override, words):
    with pytest.raises(UserError) as info:
        load_config(LEGACY, [override])
    for word in words:
        assert word in str(info.value)


def test_registry_resolves_aliases_and_upstream_paths():
    assert registry.resolve_model("taming.models.vqgan.GumbelVQ") == ("TamingVQGAN", "Gumbel")
    assert registry.resolve_model("ldm.models.autoencoder.VQModel") == ("TamingVQGAN", "VQ")
    assert registry.resolve_model("taming.models.vqgan.VQNoDiscModel") == ("TamingVQGAN", "NoDisc")
    assert registry.resolve_model("EMAVQ") == ("TamingVQGAN", "EMAVQ")
    assert registry.resolve_model("VQVAE2") == ("vqvae2", None)
    assert registry.resolve_model("DinoVQModel") == ("DinoVQ", None)
    assert registry.resolve_model("TamingVQGAN", "emavq") == ("TamingVQGAN", "EMAVQ")
    assert registry.list_model_types() == ["DinoVQ", "TamingVQGAN", "vqvae2"]
    assert registry.list_model_types("*VQ*") == ["DinoVQ", "TamingVQGAN"]


def test_registry_unknown_names_suggest():
    with pytest.raises(registry.RegistryError, match="TamingVQGAN"):
        registry.get_model_type("TamingVQGNA")
    with pytest.raises(registry.RegistryError, match="EMAVQ"):
        registry.resolve_model("TamingVQGAN", "EMAVG")


def test_registry_refuses_duplicates():
    def build(cfg):
        raise AssertionError("never built")

    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register_model_type("vqvae2", description="again", loss="vqvae2")(build)
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register_model_type("Other", description="", loss="taming", aliases=("VQGAN",))(build)
    assert "Other" not in registry.list_model_types()
    fam = registry.LossFamilySpec(name="taming", description="", target="a.B")
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register_model_type("Other2", description="", loss=fam)(build)
    assert "Other2" not in registry.list_model_types()


def test_a_new_model_type_plugs_in_with_one_registration():
    """A registration is all the tool needs: validate, the builder and the loss family see it."""
    from train.schema import make_config
    from adapters import build_model

    built = []

    def build(cfg):
        built.append(cfg.model_variant)
        return "model"

    registry.register_model_type("FutureModel", description="test only", loss="taming",
                                 variants={"A": registry.VariantSpec("A", "a variant")}, default_variant="A",
                                 accepted_args=lambda variant: (["size"], True))(build)
    try:
        assert registry.resolve_model("futuremodel", "a") == ("FutureModel", "A")
        spec = registry.get_model_type("FutureModel")
        assert spec.loss_family == "taming"
        findings = registry.check_model_args(spec, {"model_args": {"sise": 1}}, "A")
        assert [f.code for f in findings] == ["unknown_model_arg"] and "size" in findings[0].message
        assert build_model(make_config(model_type="FutureModel", model_variant="A")) == "model"
    finally:
        registry._MODEL_TYPES.pop("FutureModel")
        for key in ("futuremodel",):
            registry._MODEL_ALIASES.pop(key)
