"""taming's LPIPS built offline (losses/perceptual.py): real files on disk, the real classes."""
import logging
import os
import pickle

import pytest
import torch
import torchvision

import taming.modules.losses.lpips as taming_lpips
from losses.perceptual import (LPIPS_VGG_MD5, VGG16_HUB_FILENAME, _md5, build_taming_lpips,
                               lpips_linear_weights_path)
from train.errors import UserError

# taming's vgg16 wrapper: slice name -> torchvision features indices it holds.
SLICES = {"slice1": range(0, 4), "slice2": range(4, 9), "slice3": range(9, 16), "slice4": range(16, 23),
          "slice5": range(23, 30)}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A real torchvision vgg16 checkpoint file (random weights: there is no network here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16_random.pth"
    state = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(state, path)
    return str(path), {k: v for k, v in state.items() if k.startswith("features.")}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub directory with no cached VGG16."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def _assert_trunk_equals(module, features):
    for slice_name, indices in SLICES.items():
        block = getattr(module.net, slice_name)
        for i in indices:
            layer = block._modules[str(i)]
            if isinstance(layer, torch.nn.Conv2d):
                assert torch.equal(layer.weight, features[f"features.{i}.weight"])
                assert torch.equal(layer.bias, features[f"features.{i}.bias"])


def _assert_lin_equals_package(module):
    lin = torch.load(lpips_linear_weights_path(), map_location="cpu", weights_only=True)
    assert sorted(lin) == [f"lin{i}.model.1.weight" for i in range(5)]
    for key, value in lin.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_lpips_package_file_is_tamings_vgg_pth():
    path = lpips_linear_weights_path()
    assert _md5(path) == LPIPS_VGG_MD5 == "d507d7349b931f0638a25a48a722f98a"


def test_builds_real_taming_lpips_from_vgg_file(vgg_file, empty_hub):
    path, features = vgg_file
    module = build_taming_lpips(path)
    assert type(module) is taming_lpips.LPIPS
    _assert_trunk_equals(module, features)
    _assert_lin_equals_package(module)
    # as taming leaves it: frozen and in eval mode
    assert not module.training
    assert not any(p.requires_grad for p in module.parameters())
    # the installed package is untouched afterwards
    assert taming_lpips.models is torchvision.models
    from taming.util import get_ckpt_path
    assert taming_lpips.get_ckpt_path is get_ckpt_path


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")   # lpips calls vgg16(pretrained=)
def test_matches_the_lpips_package_metric(vgg_file, empty_hub):
    """Independent reference: the lpips package's own LPIPS with the same trunk and lin file."""
    import lpips

    path, features = vgg_file
    ours = build_taming_lpips(path)
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    trunk = {f"net.{name}.{i}.{p}": features[f"features.{i}.{p}"]
             for name, idx in SLICES.items() for i in idx if f"features.{i}.weight" in features
             for p in ("weight", "bias")}
    missing, unexpected = ref.load_state_dict(trunk, strict=False)
    assert not unexpected and all(not k.startswith("net.") for k in missing)
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours(a, b).flatten(), ref(a, b).flatten(), atol=1e-5)
        assert torch.allclose(ours(a, a), torch.zeros(2, 1, 1, 1), atol=1e-6)


def test_hub_cache_file_is_used(vgg_file, tmp_path, monkeypatch):
    path, features = vgg_file
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    os.symlink(path, hub / "checkpoints" / VGG16_HUB_FILENAME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    module = build_taming_lpips()
    _assert_trunk_equals(module, features)


def test_no_trunk_file_is_a_user_error_naming_the_file(empty_hub):
    with pytest.raises(UserError) as err:
        build_taming_lpips()
    message = str(err.value)
    assert "vgg_ckpt_path" in message and VGG16_HUB_FILENAME in message
    assert str(empty_hub / "checkpoints") in message
    # the module-level names are restored even when construction fails
    assert taming_lpips.models is torchvision.models


def test_missing_named_file_is_a_user_error(tmp_path, empty_hub):
    missing = tmp_path / "nope" / "vgg16.pth"
    with pytest.raises(UserError, match="does not exist"):
        build_taming_lpips(str(missing))


def test_random_trunk_only_when_asked_and_logged(empty_hub, caplog):
    with caplog.at_level(logging.WARNING, logger="losses.perceptual"):
        module = build_taming_lpips(allow_random_vgg=True)
    assert type(module) is taming_lpips.LPIPS
    warnings_ = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings_) == 1 and "RANDOM" in warnings_[0].getMessage()
    _assert_lin_equals_package(module)


def test_random_flag_does_not_override_a_real_file(vgg_file, empty_hub, caplog):
    path, features = vgg_file
    with caplog.at_level(logging.WARNING, logger="losses.perceptual"):
        module = build_taming_lpips(path, allow_random_vgg=True)
    _assert_trunk_equals(module, features)
    assert not caplog.records


@pytest.fixture(scope="module")
def bad_files(vgg_file, tmp_path_factory):
    """Files that are not torchvision vgg16 checkpoints, written once."""
    _, features = vgg_file
    tmp_path = tmp_path_factory.mktemp("bad")
    files = {}
    files["garbage"] = tmp_path / "garbage.pth"
    files["garbage"].write_bytes(b"this is not a torch file at all")
    files["truncated"] = tmp_path / "truncated.pth"
    torch.save({k: v for k, v in list(features.items())[:2]}, tmp_path / "full_small.pth")
    files["truncated"].write_bytes((tmp_path / "full_small.pth").read_bytes()[:200])
    files["list"] = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], files["list"])
    files["resnet"] = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, files["resnet"])
    files["wrong_shape"] = tmp_path / "wrong_shape.pth"
    bad = dict(features)
    bad["features.28.weight"] = torch.zeros(512, 512, 1, 1)
    torch.save(bad, files["wrong_shape"])
    files["missing_keys"] = tmp_path / "missing_keys.pth"
    torch.save({k: v for k, v in features.items() if not k.startswith("features.2")}, files["missing_keys"])
    files["wrapped"] = tmp_path / "wrapped.pth"
    torch.save({"state_dict": features, "epoch": 3}, files["wrapped"])
    files["pickled_module"] = tmp_path / "module.pth"
    torch.save(torch.nn.Conv2d(3, 3, 1), files["pickled_module"])  # weights_only refuses objects
    files["raw_pickle"] = tmp_path / "raw.pkl"
    files["raw_pickle"].write_bytes(pickle.dumps({"features.0.weight": [1, 2, 3]}))
    return files


BAD_FILES = ["garbage", "truncated", "list", "resnet", "wrong_shape", "missing_keys", "wrapped",
             "pickled_module", "raw_pickle"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_file_that_is_not_vgg16_is_a_user_error(kind, bad_files, empty_hub):
    path = bad_files[kind]
    with pytest.raises(UserError) as err:
        build_taming_lpips(str(path))
    message = str(err.value)
    assert str(path) in message and "vgg16" in message
    assert "\n" not in message
    if kind == "wrong_shape":
        assert "features.28.weight" in message and "(512, 512, 1, 1)" in message
    assert taming_lpips.models is torchvision.models


def test_legacy_format_features_only_file(vgg_file, tmp_path, empty_hub):
    """torchvision's 2017 hub files use torch's legacy (non-zip) format; the classifier is optional."""
    _, features = vgg_file
    legacy = tmp_path / "vgg16_legacy.pth"
    torch.save(features, legacy, _use_new_zipfile_serialization=False)
    module = build_taming_lpips(str(legacy))
    _assert_trunk_equals(module, features)
