"""taming's LPIPS perceptual loss, built without a network connection.

``taming.modules.losses.lpips.LPIPS()`` (Zhang et al. 2018, "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric", stripped down by taming) downloads
two files when it is constructed: the LPIPS linear-layer weights (``vgg.pth``) and the
ImageNet VGG16 trunk (through ``torchvision.models.vgg16(pretrained=True)``).  Neither
download works here, so :func:`build_taming_lpips` constructs the *same* class with both
files taken from disk:

* the linear weights come from the ``lpips`` package, whose ``weights/v0.1/vgg.pth`` is
  byte-identical to taming's ``vgg.pth`` (the md5 taming checks, verified at load);
* the VGG16 trunk comes from ``vgg_ckpt_path`` (a torchvision ``vgg16`` state-dict file,
  keys ``features.N.weight`` ...) or from the torch hub cache
  (``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``, the file torchvision itself
  would have downloaded);
* a randomly initialised trunk only when ``allow_random_vgg=True`` (tests, demos), and
  then with a loud warning: the perceptual loss is meaningless with it.

The installed package is not edited: the two module-level names taming's constructor uses
(``models`` for ``models.vgg16`` and ``get_ckpt_path``) are swapped for local ones while the
object is built and restored afterwards (not thread-safe; construction is single-threaded).

    >>> from losses.perceptual import build_taming_lpips
    >>> lpips = build_taming_lpips("vgg16-397923af.pth")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from types import SimpleNamespace
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from train.errors import UserError
from train.safe_load import UnreadableFile, load_weights_file

log = logging.getLogger(__name__)

# md5 of taming's vgg.pth (taming.util.MD5_MAP["vgg_lpips"]); the lpips package ships the
# same bytes as lpips/weights/v0.1/vgg.pth.
LPIPS_VGG_MD5 = "d507d7349b931f0638a25a48a722f98a"
# File name torchvision gives the ImageNet VGG16 weights in the hub cache.
VGG16_HUB_FILENAME = "vgg16-397923af.pth"
# torchvision's VGG16 ("D") feature layout: conv widths and max-pools.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

_HOW_TO_GET_VGG = (
    "give train.vgg_ckpt_path: a torchvision vgg16 state-dict file (e.g. "
    "torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.pth') on a "
    f"machine with internet), or copy {VGG16_HUB_FILENAME} into {{hub_dir}}; "
    "for demos and tests only, set train.allow_random_vgg: true (random trunk, meaningless LPIPS)")


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lpips_linear_weights_path() -> str:
    """Path of the lpips package's ``vgg.pth``, checked against taming's md5."""
    try:
        import lpips
    except ImportError:
        raise UserError("the lpips package is not installed; it provides LPIPS' linear weights "
                        "(pip install lpips==0.1.4)") from None
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    if not os.path.isfile(path):
        raise UserError(f"LPIPS linear weights not found at {path}; reinstall the lpips package "
                        "(pip install --force-reinstall lpips==0.1.4)")
    digest = _md5(path)
    if digest != LPIPS_VGG_MD5:
        raise UserError(f"LPIPS linear weights {path} have md5 {digest}, expected {LPIPS_VGG_MD5} "
                        "(taming's vgg.pth); reinstall the lpips package")
    return path


def hub_vgg16_path() -> str:
    """Where torchvision keeps the ImageNet VGG16 weights in the torch hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_HUB_FILENAME)


def find_vgg16_checkpoint(vgg_ckpt_path: Optional[str] = None) -> Optional[str]:
    """The VGG16 file to use: ``vgg_ckpt_path`` if given (it must exist), else the hub cache
    file if present, else None."""
    if vgg_ckpt_path:
        path = os.path.expanduser(str(vgg_ckpt_path))
        if not os.path.isfile(path):
            raise UserError(f"vgg_ckpt_path {vgg_ckpt_path!r} does not exist; "
                            + _HOW_TO_GET_VGG.format(hub_dir=os.path.dirname(hub_vgg16_path())))
        return path
    cached = hub_vgg16_path()
    return cached if os.path.isfile(cached) else None


def _make_vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (same module indices, so the same state-dict keys)."""
    layers = []
    channels = 3
    for width in _VGG16_CFG:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


def _random_init_(features: nn.Sequential) -> None:
    # torchvision's own initialisation of a fresh VGG (kaiming, fan_out, zero bias), so a random
    # trunk has the activation scale a freshly built torchvision vgg16 would have.
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)


def load_vgg16_features(path: str) -> Dict[str, torch.Tensor]:
    """Read a torchvision vgg16 state-dict file; return the ``features`` part, keys without the
    ``features.`` prefix.  Anything that is not such a file is a :class:`UserError`."""
    fix = "vgg_ckpt_path must be a torchvision vgg16 state dict (torch.save(vgg16().state_dict(), path))"
    try:
        # Memory-mapped where the format allows it: a full vgg16 file is 528 MB, of which
        # LPIPS reads the 59 MB trunk.
        state = load_weights_file(path)
    except UnreadableFile as exc:  # corrupt file, not a torch file, or a pickle with objects in it
        if exc.objects:
            reason = "it holds Python objects besides tensors, which are never unpickled (that could run code)"
        else:
            reason = f"not a readable torch file: corrupt, truncated or another format ({exc.reason})"
        raise UserError(f"cannot read VGG16 checkpoint {path}: {reason}; {fix}") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise UserError(f"VGG16 checkpoint {path} holds a {type(state).__name__}, not a state dict; {fix}")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping) and not any(k.startswith("features.") for k in state):
            raise UserError(f"VGG16 checkpoint {path} looks like a training checkpoint (weights under "
                            f"{wrapper!r}); save just the vgg16 state dict: {fix}")
    non_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise UserError(f"VGG16 checkpoint {path}: entry {non_tensor[0]!r} is not a tensor; {fix}")
    foreign = [k for k in state if not k.startswith(("features.", "classifier."))]
    if foreign:
        raise UserError(f"VGG16 checkpoint {path} is not a torchvision vgg16 state dict (unexpected key "
                        f"{foreign[0]!r}, {len(foreign)} such keys); {fix}")
    expected = {k: v.shape for k, v in _make_vgg16_features().state_dict().items()}
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    missing = [k for k in expected if k not in features]
    if missing:
        raise UserError(f"VGG16 checkpoint {path} lacks 'features.{missing[0]}' ({len(missing)} VGG16 trunk "
                        f"keys missing); {fix}")
    extra = [k for k in features if k not in expected]
    if extra:
        raise UserError(f"VGG16 checkpoint {path} has key 'features.{extra[0]}' that vgg16 does not have "
                        f"(a vgg16_bn or another VGG depth?); {fix}")
    for key, shape in expected.items():
        if tuple(features[key].shape) != tuple(shape):
            raise UserError(f"VGG16 checkpoint {path}: 'features.{key}' has shape {tuple(features[key].shape)}, "
                            f"vgg16 expects {tuple(shape)}; {fix}")
    return {k: v.float() for k, v in features.items()}


def _load_linear_weights(lpips_module: nn.Module, path: str) -> None:
    """Load (again, explicitly and with ``weights_only``) the lin0..lin4 weights and insist they
    all land: taming's own loader uses ``strict=False`` and would not notice a missing key."""
    state = load_weights_file(path)
    own = lpips_module.state_dict()
    lin_keys = [k for k in own if k.startswith("lin")]
    if sorted(lin_keys) != sorted(state):
        raise UserError(f"LPIPS linear weights {path} hold keys {sorted(state)}, taming's LPIPS expects "
                        f"{sorted(lin_keys)}; reinstall the lpips package")
    lpips_module.load_state_dict(state, strict=False)


def build_taming_lpips(vgg_ckpt_path: Optional[str] = None, allow_random_vgg: bool = False) -> nn.Module:
    """Construct ``taming.modules.losses.lpips.LPIPS`` offline (see the module docstring).

    Returns the real taming class, in eval mode, with every parameter frozen (as taming's
    constructor leaves it).  Raises :class:`UserError` when no VGG16 trunk file is available
    and ``allow_random_vgg`` is false, or when the file is not a VGG16 checkpoint.
    """
    import taming.modules.losses.lpips as taming_lpips

    lin_path = lpips_linear_weights_path()
    vgg_path = find_vgg16_checkpoint(vgg_ckpt_path)
    if vgg_path is not None:
        features_state: Optional[Dict[str, torch.Tensor]] = load_vgg16_features(vgg_path)
    elif allow_random_vgg:
        features_state = None
        log.warning("LPIPS uses a RANDOMLY INITIALISED VGG16 trunk (allow_random_vgg=True): the "
                    "perceptual loss is NOT the LPIPS metric. Use this for tests and demos only; "
                    "for real training give train.vgg_ckpt_path.")
    else:
        raise UserError("LPIPS (perceptual_weight > 0) needs the ImageNet VGG16 trunk and no file was "
                        "found; " + _HOW_TO_GET_VGG.format(hub_dir=os.path.dirname(hub_vgg16_path())))

    def vgg16(pretrained: bool = True, **_ignored):
        # Stands in for torchvision.models.vgg16 inside taming's vgg16 wrapper, which only reads
        # ``.features`` from the result.
        features = _make_vgg16_features()
        if features_state is None:
            _random_init_(features)
        else:
            features.load_state_dict(features_state, strict=True)
        return SimpleNamespace(features=features)

    def get_ckpt_path(name, root=None, check=False):
        # taming asks for "vgg_lpips"; answer with the md5-verified lpips package file.
        if name != "vgg_lpips":
            raise UserError(f"taming asked for unknown pretrained file {name!r}")
        return lin_path

    saved = (taming_lpips.models, taming_lpips.get_ckpt_path)
    taming_lpips.models = SimpleNamespace(vgg16=vgg16)
    taming_lpips.get_ckpt_path = get_ckpt_path
    try:
        # taming prints "loaded pretrained LPIPS loss from ..."; a loss must not print.
        with contextlib.redirect_stdout(io.StringIO()):
            module = taming_lpips.LPIPS()
    finally:
        taming_lpips.models, taming_lpips.get_ckpt_path = saved
    _load_linear_weights(module, lin_path)
    return module.eval()


__all__ = ["build_taming_lpips", "find_vgg16_checkpoint", "hub_vgg16_path", "load_vgg16_features",
           "lpips_linear_weights_path", "LPIPS_VGG_MD5", "VGG16_HUB_FILENAME"]
