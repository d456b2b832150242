"""Training data: folders, file lists, taming CustomTrain sections, builtin photos, bad files,
and the step-addressed sampling that makes resume exact."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from train.data import (BUILTIN_HELDOUT, BUILTIN_TRAIN, ImageCrops, StepBatchSampler, fixed_crops, make_loader,
                        resolve_data)
from train.errors import UserError
from train.schema import make_config


def cfg_for(**data):
    return OmegaConf.structured(make_config(data={"image_size": 16, **data}))


def write_images(folder, n, size=(40, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_folder_skips_and_counts_unreadable_files(tmp_path, capsys):
    folder = tmp_path / "images"
    good = write_images(folder / "sub", 3)
    (folder / "notes.txt").write_text("not an image")            # ignored: not an image name
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")      # unreadable header
    truncated = folder / "truncated.png"                         # header fine, pixels cut off
    data = open(good[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])

    spec = resolve_data(cfg_for(path=str(folder)))
    assert sorted(spec.paths) == sorted(good + [str(truncated)])
    assert spec.unreadable == [str(folder / "broken.png")]
    assert spec.random_crop and spec.image_size == 16

    # The truncated file fails at decode time: replaced by the next file, counted.
    dataset = ImageCrops(spec, seed=0)
    items = [dataset[k] for k in range(4 * len(dataset))]
    assert sum(i["skipped"] for i in items) > 0
    assert all(i["image"].shape == (3, 16, 16) for i in items)
    assert all(i["path"] != str(truncated) for i in items)
    assert "skipping unreadable image" in capsys.readouterr().err


def test_no_readable_image_is_an_error_before_training(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="no readable image"):
        resolve_data(cfg_for(path=str(folder)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable image"):
        resolve_data(cfg_for(path=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="no training data"):
        resolve_data(cfg_for())
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_data(cfg_for(), data_arg=str(tmp_path / "missing"))


def test_file_list_follows_taming_custom_train(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "imgs", 2)
    listing = tmp_path / "train.txt"
    # Absolute, relative to the list's folder, and blank lines.
    listing.write_text(f"{paths[0]}\n\nimgs/img1.png\n")
    monkeypatch.chdir("/")
    spec = resolve_data(cfg_for(), data_arg=str(listing))
    assert spec.paths == [paths[0], str(tmp_path / "imgs" / "img1.png")]


def test_taming_yaml_data_section(tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(paths))
    section = {"target": "main.DataModuleFromConfig",
               "params": {"batch_size": 2, "train": {"target": "taming.data.custom.CustomTrain",
                                                     "params": {"size": 24, "training_images_list_file": str(listing)}}}}
    cfg = OmegaConf.structured(make_config(upstream={"data": section}))
    spec = resolve_data(cfg)
    assert spec.paths == paths and spec.image_size == 24
    assert spec.random_crop is False            # taming's CustomTrain centre-crops
    # --data wins over the section.
    assert resolve_data(cfg, data_arg="builtin").source.startswith("builtin")

    section["params"]["train"] = {"target": "taming.data.imagenet.ImageNetTrain", "params": {"config": {}}}
    cfg = OmegaConf.structured(make_config(upstream={"data": section}))
    with pytest.raises(UserError, match="--data /path/to/image/folder"):
        resolve_data(cfg)


def test_fit_reads_a_taming_yaml_with_custom_train(tmp_path):
    import yaml

    from train.fit import run

    paths = write_images(tmp_path / "imgs", 3, size=(48, 40))
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(paths))
    ddconfig = {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    doc = {"model": {"base_learning_rate": 2.0e-6, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": 16, "n_embed": 32, "ddconfig": ddconfig,
                                "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                               "params": {"disc_start": 100, "perceptual_weight": 0.0,
                                                          "disc_ndf": 16, "disc_num_layers": 2}}}},
           "data": {"target": "main.DataModuleFromConfig",
                    "params": {"batch_size": 3, "train": {"target": "taming.data.custom.CustomTrain",
                                                          "params": {"size": 32,
                                                                     "training_images_list_file": str(listing)}}}}}
    config = tmp_path / "custom_vqgan.yaml"
    config.write_text(yaml.safe_dump(doc))
    code, trainer = run([str(config), "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-bar"])
    assert code == 0
    assert trainer.gen.optimizer.param_groups[0]["lr"] == pytest.approx(2.0e-6 * 3)    # base x batch x 1 x 1
    assert trainer.data.paths == paths


def test_builtin_photos_hold_some_out():
    spec = resolve_data(cfg_for(path="builtin", image_size=32))
    held = resolve_data(cfg_for(path="builtin", image_size=32), split="validation")
    assert len(spec.paths) == len(BUILTIN_TRAIN) and len(held.paths) == len(BUILTIN_HELDOUT)
    assert not set(spec.paths) & set(held.paths)
    crops = fixed_crops(held, 4)
    assert crops.shape == (4, 3, 32, 32) and crops.min() >= -1 and crops.max() <= 1
    assert torch.equal(crops, fixed_crops(held, 4))              # deterministic
    # Real photographs, not noise: neighbouring pixels are strongly correlated.
    x = fixed_crops(spec, 8)
    assert torch.corrcoef(torch.stack([x[..., 1:].flatten(), x[..., :-1].flatten()]))[0, 1] > 0.5


def test_samples_are_a_function_of_seed_and_sample_number():
    spec = resolve_data(cfg_for(path="builtin", image_size=16))
    a, b = ImageCrops(spec, seed=3), ImageCrops(spec, seed=3)
    for k in (0, 7, 100, 31):                       # any order, any instance
        assert torch.equal(a[k]["image"], b[k]["image"])
    assert not torch.equal(a[0]["image"], ImageCrops(spec, seed=4)[0]["image"])
    # Each epoch visits every file once.
    n = len(a)
    assert sorted(a[k]["file_index"] for k in range(n, 2 * n)) == list(range(n))


def test_step_sampler_resumes_mid_run_and_splits_ranks():
    full = list(StepBatchSampler(2, accumulate=3, world_size=2, rank=1, start_step=0, end_step=4))
    resumed = list(StepBatchSampler(2, accumulate=3, world_size=2, rank=1, start_step=2, end_step=4))
    assert resumed == full[2 * 3:]
    r0 = {k for b in StepBatchSampler(2, 3, 2, 0, 0, 4) for k in b}
    r1 = {k for b in full for k in b}
    assert not r0 & r1 and r0 | r1 == set(range(4 * 3 * 2 * 2))

    spec = resolve_data(cfg_for(path="builtin", image_size=16))
    loader = make_loader(spec, seed=0, batch_size=2, accumulate=1, world_size=1, rank=0, start_step=0, end_step=3)
    rng_before = torch.get_rng_state()
    batches = list(loader)
    assert torch.equal(rng_before, torch.get_rng_state())        # the loader never draws from the global RNG
    late = list(make_loader(spec, 0, 2, 1, 1, 0, start_step=2, end_step=3))
    assert torch.equal(batches[2]["image"], late[0]["image"])
