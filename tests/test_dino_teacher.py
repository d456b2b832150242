"""The frozen DINO teacher: local checkpoints in timm / DINO / DINOv2 layouts, token grids,
and the extract-features cache that fit reads."""
import argparse
import logging
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from adapters.dinovq import build_teacher, teacher_features_hook
from adapters.dino_teacher import (DinoTeacher, features_for_batch, load_teacher,
                                   read_state_dict)
from train.errors import UserError
from train.schema import make_config

ARCH = "vit_tiny_patch16_224"   # 5.7M parameters: DINO ViT layout at CPU size


def random_vit(arch=ARCH, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=0, **kw)


def assert_same_weights(teacher, reference, rounded=()):
    got, want = teacher.vit.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for k in want:
        if k in rounded:   # recombined from two tensors by the layout conversion: float rounding
            assert torch.allclose(got[k].float(), want[k].float(), atol=1e-6), k
        else:
            assert torch.equal(got[k].float(), want[k].float()), k


@pytest.fixture(scope="module")
def vit_and_file(tmp_path_factory):
    vit = random_vit(img_size=(32, 32))
    path = str(tmp_path_factory.mktemp("teacher") / "vit_tiny.pth")
    torch.save(vit.state_dict(), path)
    return vit, path


def test_timm_state_dict_round_trip(vit_and_file, tmp_path):
    vit, path = vit_and_file
    teacher = load_teacher(ARCH, path, grid_size=(2, 2), image_size=(32, 32))
    assert_same_weights(teacher, vit)
    from safetensors.torch import save_file

    st = str(tmp_path / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, st)
    assert_same_weights(load_teacher(ARCH, st, grid_size=(2, 2)), vit)


def test_features_are_normalised_patch_tokens(vit_and_file):
    vit, path = vit_and_file
    teacher = load_teacher(ARCH, path, grid_size=(2, 2), image_size=(32, 32))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    feats = features_for_batch(teacher, images)
    # The arch's own normalisation (timm's pretrained_cfg: ImageNet's for DINO, 0.5 for this one).
    mean = torch.tensor(vit.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(vit.pretrained_cfg["std"]).view(1, 3, 1, 1)
    vit.eval()
    with torch.no_grad():
        want = vit.forward_features(((images + 1) / 2 - mean) / std)[:, 1:]   # no CLS token
    assert feats.shape == (3, 4, 192) and feats.dtype == torch.float32
    assert torch.allclose(feats, want, atol=1e-5)
    assert not feats.requires_grad
    with pytest.raises(UserError, match="data.image_size"):
        teacher(torch.zeros(1, 3, 64, 64))


def test_frozen_eval_and_bf16(vit_and_file):
    _, path = vit_and_file
    teacher = load_teacher(ARCH, path, grid_size=(2, 2), dtype="bf16")
    teacher.train()
    assert not teacher.training and not teacher.vit.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    out = teacher(torch.zeros(1, 3, 32, 32))
    assert out.dtype == torch.float32 and out.shape == (1, 4, 192)
    with pytest.raises(UserError, match="teacher.dtype"):
        load_teacher(ARCH, path, grid_size=(2, 2), dtype="fp8")


def test_dino_training_checkpoint_layout(vit_and_file, tmp_path):
    """DINO's checkpoint.pth: teacher/student entries, backbone./module. prefixes, a
    projection head and argparse args."""
    vit, _ = vit_and_file
    sd = vit.state_dict()
    head = {"head.mlp.0.weight": torch.randn(4, 192), "head.last_layer.weight_g": torch.ones(8, 1)}
    ckpt = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head},
            "student": {**{f"module.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()}},
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16), "epoch": 100}
    path = str(tmp_path / "checkpoint.pth")
    torch.save(ckpt, path)
    assert_same_weights(load_teacher(ARCH, path, grid_size=(2, 2)), vit)
    assert set(read_state_dict(path)) == set(sd)


def test_dinov2_release_layouts_and_patch14_grid(tmp_path):
    """DINOv2 releases: mask_token, and register_tokens with the CLS position folded in."""
    arch = "vit_small_patch14_reg4_dinov2"
    # Built for 28 px = a 2x2 grid of 14 px patches: the teacher grid of a 32 px / 16 px student.
    ref = random_vit(arch, img_size=(28, 28))
    sd = ref.state_dict()
    p0 = torch.randn(1, 1, sd["pos_embed"].shape[-1])
    original = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    original.update({"mask_token": torch.zeros(1, 384), "register_tokens": sd["reg_token"],
                     "cls_token": sd["cls_token"] - p0, "pos_embed": torch.cat([p0, sd["pos_embed"]], 1)})
    path = str(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    torch.save(original, path)
    teacher = load_teacher(arch, path, grid_size=(2, 2), image_size=(32, 32))
    assert_same_weights(teacher, ref, rounded=("cls_token",))
    assert teacher.patch_size == 14 and teacher.input_size == (28, 28)
    # The 32 px batch is resized to the teacher's 28 px: CLS + 4 registers dropped, 2x2 grid left.
    feats = teacher(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, 4, 384)


def test_dinov2_release_at_518_is_resampled(tmp_path):
    arch = "vit_small_patch14_dinov2"
    release = random_vit(arch)   # 518 px, a 37x37 position grid, as published
    sd = dict(release.state_dict(), mask_token=torch.zeros(1, 384))
    path = str(tmp_path / "dinov2_vits14_pretrain.pth")
    torch.save(sd, path)
    teacher = load_teacher(arch, path, grid_size=(2, 2))
    assert teacher.vit.pos_embed.shape == (1, 1 + 4, 384)
    assert torch.equal(teacher.vit.blocks[0].attn.qkv.weight, release.blocks[0].attn.qkv.weight)
    assert teacher(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 384)


def test_missing_checkpoint_random_teacher_and_bad_files(tmp_path, caplog, vit_and_file):
    with pytest.raises(UserError, match="teacher.ckpt_path"):
        load_teacher(ARCH, None, grid_size=(2, 2))
    with caplog.at_level(logging.WARNING):
        teacher = load_teacher(ARCH, None, grid_size=(2, 2), allow_random=True)
    assert isinstance(teacher, DinoTeacher) and "RANDOMLY INITIALISED" in caplog.text
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(ARCH, str(tmp_path / "nope.pth"), grid_size=(2, 2))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_teacher(ARCH, str(junk), grid_size=(2, 2))
    # A checkpoint of another model: missing / unexpected keys named, with the fix.
    _, path = vit_and_file
    with pytest.raises(UserError, match="teacher.arch") as info:
        load_teacher("vit_small_patch16_224", path, grid_size=(2, 2))
    assert "vit_small_patch16_224" in str(info.value)
    with pytest.raises(UserError, match="vit_tiny_patch16_224"):
        load_teacher("vit_tiny_patch16_244", None, grid_size=(2, 2), allow_random=True)


def test_build_teacher_checks_the_model(vit_and_file):
    _, path = vit_and_file
    args = dict(img_size=[32, 32], patch_size=8, dino_dim=192)
    cfg = make_config(model_type="DinoVQ", model_args=args, teacher={"arch": ARCH, "ckpt_path": path})
    teacher = build_teacher(cfg)
    assert teacher.grid_size == (4, 4) and teacher.input_size == (64, 64)   # 8 px vs 16 px patches
    assert teacher(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 192)
    bad = make_config(model_type="DinoVQ", model_args={**args, "dino_dim": 768},
                      teacher={"arch": ARCH, "ckpt_path": path})
    with pytest.raises(UserError, match="dino_dim: 192"):
        build_teacher(bad)


# ---- extract-features and the cache --------------------------------------------------------

TINY_YAML = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "dinovq_tiny.yaml")


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 32), (32, 48), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    return folder


def test_extract_features_cli_and_cache_lookup(tmp_path, image_folder, vit_and_file):
    from train.cli import main
    from train.config import load_config
    from train.data import crop_image, load_rgb, to_tensor
    from train.features import FeatureCache

    _, teacher_file = vit_and_file
    out = str(tmp_path / "cache.safetensors")
    rc = main(["extract-features", TINY_YAML, "--data", str(image_folder), "--out", out, "--batch-size", "2",
               "--device", "cpu", f"teacher.ckpt_path={teacher_file}", "teacher.allow_random=false"])
    assert rc == 0 and os.path.isfile(out)
    cache = FeatureCache(out)
    paths = sorted(str(p) for p in image_folder.glob("im*.png"))
    assert sorted(cache.keys) == paths and cache.grid == (4, 4) and cache.dino_dim == 192
    cfg = load_config(TINY_YAML, [f"teacher.ckpt_path={teacher_file}", f"data.feature_cache={out}",
                                  "data.random_crop=false"])
    teacher = build_teacher(cfg)
    crops = torch.stack([to_tensor(crop_image(load_rgb(p), 32, None, False, (1.0, 1.0))) for p in paths])
    want = teacher(crops)
    got = cache.lookup(paths)
    assert torch.allclose(got, want, atol=2e-3, rtol=2e-3)   # stored as fp16
    # The DinoVQ batch hook reads the cache by batch["path"].
    hook = teacher_features_hook(cfg)
    assert isinstance(hook.source, FeatureCache)
    batch = {"image": crops[:2], "path": paths[1::-1]}
    assert torch.equal(hook(batch, 0)["dino_features"], cache.lookup(paths[1::-1]))
    with pytest.raises(UserError, match="not in the feature cache"):
        hook({"image": crops[:1], "path": [str(tmp_path / "other.png")]}, 0)
    # A cache used with random crops, or made for another grid, is refused with the fix.
    from losses.dinovq_loss import DinoVQLossCalculator

    with pytest.raises(UserError, match="random_crop"):
        DinoVQLossCalculator.build(load_config(TINY_YAML, [f"data.feature_cache={out}"]))
    with pytest.raises(UserError, match="random_crop"):
        teacher_features_hook(load_config(TINY_YAML, [f"data.feature_cache={out}"]))
    with pytest.raises(UserError, match="re-run extract-features"):
        teacher_features_hook(load_config(TINY_YAML, [f"data.feature_cache={out}", "data.random_crop=false",
                                                      "model_args.patch_size=16"]))


def test_extract_features_cli_errors(tmp_path, capsys):
    from train.cli import main

    assert main(["extract-features", TINY_YAML, "--data", "builtin", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "builtin" in capsys.readouterr().err
    assert main(["extract-features", TINY_YAML, "--data", str(tmp_path), "--out", str(tmp_path / "c.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
