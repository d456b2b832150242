"""Crop size from the config itself: a legacy JSON or taming YAML config that names no image
size trains at ``ddconfig.resolution``; ``validate`` says which size is used and where it came
from; a crop that moves taming's attention layers is a warning."""
import json
import os

import yaml

from train.config import load_config
from train.validate import INFO, WARNING, validate_file

TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"


def ddconfig(resolution=32, ch_mult=(1, 2), attn_resolutions=()):
    return {"double_z": False, "z_channels": 16, "resolution": resolution, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": list(ch_mult), "num_res_blocks": 1,
            "attn_resolutions": list(attn_resolutions), "dropout": 0.0}


def legacy_json(folder, train_args=None, name="legacy", **dd):
    doc = {"model_type": "TamingVQGAN",
           "model_args": {"model_variant": "EMAVQ", "embed_dim": 16, "n_embed": 64, "ddconfig": ddconfig(**dd),
                          "lossconfig": {"target": TAMING_LOSS,
                                         "params": {"disc_start": 0, "perceptual_weight": 0.0, "disc_ndf": 16,
                                                    "disc_num_layers": 2}}},
           "train_args": {"learning_rate": 1e-4, "batch_size": 2, "log_every": 1, "image_every": 2,
                          "ckpt_every": 2, **(train_args or {})}}
    path = os.path.join(str(folder), f"{name}.json")
    with open(path, "w") as fh:
        json.dump(doc, fh)
    return path


def taming_yaml(folder, size=None, **dd):
    doc = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": 16, "n_embed": 64, "ddconfig": ddconfig(**dd),
                                "lossconfig": {"target": TAMING_LOSS,
                                               "params": {"disc_start": 0, "perceptual_weight": 0.0}}}},
           "data": {"target": "main.DataModuleFromConfig",
                    "params": {"batch_size": 2,
                               "train": {"target": "taming.data.custom.CustomTrain",
                                         "params": {"training_images_list_file": "train.txt"}}}}}
    if size is not None:
        doc["data"]["params"]["train"]["params"]["size"] = size
    path = os.path.join(str(folder), "taming.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh)
    return path


def native(folder, data=None, **dd):
    doc = {"name": "native", "model_type": "TamingVQGAN", "model_variant": "EMAVQ",
           "model_args": {"embed_dim": 16, "n_embed": 64, "ddconfig": ddconfig(**dd)},
           "lossconfig": {"target": TAMING_LOSS, "params": {"disc_start": 0, "perceptual_weight": 0.0}},
           "train": {"learning_rate": 1e-4, "batch_size": 2}}
    if data is not None:
        doc["data"] = data
    path = os.path.join(str(folder), "native.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh)
    return path


def crop_findings(path, overrides=()):
    _, findings = validate_file(path, overrides)
    source = [f for f in findings if f.code == "crop_size_source"]
    assert len(source) == 1 and source[0].level == INFO and source[0].path == "data.image_size"
    return source[0], [f for f in findings if f.code == "crop_moves_attention"]


def test_legacy_json_without_a_size_trains_at_the_resolution(tmp_path):
    path = legacy_json(tmp_path, resolution=32)
    assert load_config(path).data.image_size == 32
    info, moves = crop_findings(path)
    assert info.message == ("training crops are 32 px: from model_args.ddconfig.resolution "
                            "(the config names no image size)")
    assert "data.image_size" in info.fix and moves == []


def test_taming_yaml_without_a_size_trains_at_the_resolution(tmp_path):
    path = taming_yaml(tmp_path, resolution=64, ch_mult=(1, 2, 2), attn_resolutions=(16,))
    assert load_config(path).data.image_size == 64
    info, moves = crop_findings(path)
    assert "64 px: from model_args.ddconfig.resolution" in info.message and moves == []


def test_taming_yaml_size_from_its_data_section(tmp_path):
    path = taming_yaml(tmp_path, size=48, resolution=64, ch_mult=(1, 2))
    assert load_config(path).data.image_size == 48
    info, _ = crop_findings(path)
    assert info.message == "training crops are 48 px: from data.params.train.params.size in the config"


def test_native_config_keeps_the_schema_default(tmp_path):
    path = native(tmp_path, resolution=256, ch_mult=(1, 2))
    assert load_config(path).data.image_size == 256     # the schema default, not derived
    info, _ = crop_findings(path)
    assert info.message == "training crops are 256 px: the schema default (the config names no image size)"
    # A native resolution-32 model at the default 256 px crop: the mid block runs over 64x positions.
    path = native(tmp_path, resolution=32, ch_mult=(1, 2))
    assert load_config(path).data.image_size == 256
    _, moves = crop_findings(path)
    assert len(moves) == 1 and moves[0].level == WARNING
    assert "16384 positions instead of 256" in moves[0].message


def test_explicit_size_wins_over_the_resolution(tmp_path):
    path = legacy_json(tmp_path, {"image_size": 64}, resolution=32)
    assert load_config(path).data.image_size == 64
    info, _ = crop_findings(path)
    assert info.message == "training crops are 64 px: from train_args.image_size in the config"
    path = native(tmp_path, {"image_size": 48}, resolution=32)
    assert load_config(path).data.image_size == 48
    assert crop_findings(path)[0].message == "training crops are 48 px: from data.image_size in the config"


def test_override_wins_and_a_derived_size_follows_the_resolution(tmp_path):
    path = legacy_json(tmp_path, {"image_size": 64}, resolution=32)
    assert load_config(path, ["data.image_size=40"]).data.image_size == 40
    info, _ = crop_findings(path, ["data.image_size=40"])
    assert info.message == "training crops are 40 px: from the override data.image_size=40"
    derived = legacy_json(tmp_path, name="derived", resolution=32)
    assert load_config(derived, ["data.image_size=40"]).data.image_size == 40
    # No size named anywhere: an overridden resolution is the crop size.
    assert load_config(derived, ["model_args.ddconfig.resolution=64"]).data.image_size == 64
    info, _ = crop_findings(derived, ["model_args.ddconfig.resolution=64"])
    assert "64 px: from model_args.ddconfig.resolution" in info.message


def test_warning_when_the_crop_moves_attention_layers(tmp_path):
    # Attention built at the 16x16 grid of a 32 px model runs at 32x32 on 64 px crops.
    path = legacy_json(tmp_path, {"image_size": 64}, resolution=32, ch_mult=(1, 2), attn_resolutions=(16,))
    _, moves = crop_findings(path)
    assert len(moves) == 1 and moves[0].level == WARNING and moves[0].path == "data.image_size"
    assert "built for the [16] grids" in moves[0].message and "run on [32] grids" in moves[0].message
    assert "data.image_size: 32" in moves[0].fix
    # A smaller crop moves them too (16x16 attention running at 8x8).
    _, moves = crop_findings(path, ["data.image_size=16"])
    assert len(moves) == 1 and "run on [8] grids" in moves[0].message
    # The case: a resolution-32 model at 256 px crops, mid-block attention over 128 x 128.
    path = legacy_json(tmp_path, {"image_size": 256}, name="big", resolution=32, ch_mult=(1, 2))
    _, moves = crop_findings(path)
    assert len(moves) == 1 and "16384 positions instead of 256" in moves[0].message


def test_no_warning_when_attention_layers_stay(tmp_path):
    # Same size as the resolution.
    path = legacy_json(tmp_path, {"image_size": 32}, resolution=32, attn_resolutions=(16,))
    assert crop_findings(path)[1] == []
    # No attn_resolutions level is built and the mid block grows less than 4x (40 px vs 32 px).
    path = legacy_json(tmp_path, {"image_size": 40}, name="near", resolution=32, ch_mult=(1, 2))
    assert crop_findings(path)[1] == []
    # attn_type none builds no attention at all.
    path = legacy_json(tmp_path, {"image_size": 256}, name="none", resolution=32, ch_mult=(1, 2),
                       attn_resolutions=(16,))
    assert crop_findings(path, ["model_args.ddconfig.attn_type=none"])[1] == []


def test_fit_trains_a_legacy_config_at_its_resolution(tmp_path):
    from train.fit import run

    path = legacy_json(tmp_path, {"data_path": "builtin"}, resolution=32)
    code, trainer = run([path, "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-bar"])
    assert code == 0
    assert trainer.data.image_size == 32 and trainer.cfg.data.image_size == 32
    with open(tmp_path / "run" / "config.yaml") as fh:
        assert yaml.safe_load(fh)["data"]["image_size"] == 32     # a resume trains at 32 too
