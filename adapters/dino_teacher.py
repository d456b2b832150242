"""The frozen DINO / DINOv2 teacher whose patch features DinoVQ distils.

The network is a timm ``VisionTransformer`` (``timm.create_model(arch, pretrained=False)``);
its weights come from a LOCAL file named by ``teacher.ckpt_path`` (nothing is downloaded).
Accepted layouts:

* timm's own state dict (``model.state_dict()``, ``.pth``/``.pt``/``.bin`` or ``.safetensors``);
* the original DINO releases (``dino_vitbase16_pretrain.pth``: backbone keys only) and DINO
  training checkpoints (``checkpoint.pth``: the ``teacher`` entry, ``module.``/``backbone.``
  prefixes and the projection ``head.*`` dropped);
* the original DINOv2 releases (``dinov2_vitb14_pretrain.pth``, with ``mask_token``,
  ``register_tokens``, SwiGLU ``w12``/``w3``), converted by timm's own
  ``vision_transformer.checkpoint_filter_fn``, which also resamples position embeddings to
  the grid used here.

Features are the final-norm patch tokens, ``(B, N, dim)``, without CLS / register tokens.

Token grids.  The student makes one token per ``patch_size`` pixels; the teacher is built
for the image size ``student grid x teacher patch`` and each batch is resized to it
(bilinear, antialiased), so both grids agree by construction even when the patch sizes
differ by design (DINOv2's 14 vs the student's 16).  Images of any other size than the
configured one are an error, as are features whose grid does not match.

Without a checkpoint file the teacher is an error naming what to provide; a random
teacher only with ``teacher.allow_random: true`` (tests, demos), logged as a warning.

    teacher = load_teacher(arch, ckpt_path, grid_size)   # adapters.dinovq.build_teacher(cfg) for a config
    feats = features_for_batch(teacher, images)          # (B, N, dino_dim), float32, no grad
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from train.errors import UserError
from train.safe_load import UnreadableFile, load_safetensors, load_weights_file

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}

# Prefixes that wrap a ViT backbone in DINO training checkpoints (DDP's ``module.`` and
# DINO's ``MultiCropWrapper.backbone``).
_WRAPPER_PREFIXES = ("module.", "backbone.")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file, unwrapped to the ViT backbone's own keys.

    Never runs code from the file: :func:`train.safe_load.load_weights_file`
    (``argparse.Namespace``, which DINO stores as ``args``, is the only class allowed) or
    safetensors.
    """
    if not os.path.isfile(path):
        raise UserError(f"teacher checkpoint {path!r} does not exist; set teacher.ckpt_path to a "
                        "local DINO / DINOv2 weights file (e.g. dino_vitbase16_pretrain.pth)")
    try:
        if path.endswith(".safetensors"):
            obj = load_safetensors(path)
        else:
            obj = load_weights_file(path, allow=[argparse.Namespace])
    except UnreadableFile as exc:  # unpickling / format errors all mean "not a usable file"
        raise UserError(f"teacher checkpoint {path!r} cannot be read safely ({exc.reason}); save the ViT's "
                        "state dict alone with torch.save(state_dict, path) or as .safetensors") from None
    for key in ("teacher", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"teacher checkpoint {path!r} holds no state dict of tensors; provide the "
                        "ViT's weights (a DINO / DINOv2 release file or a timm state dict)")
    from adapters.weights import strip_wrapper_prefixes

    # DINO's projection head (``head.*``) is not part of the feature extractor.
    return {k: v for k, v in strip_wrapper_prefixes(obj, _WRAPPER_PREFIXES).items() if not k.startswith("head.")}


def _create_vit(arch: str, img_size: Tuple[int, int]) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {} if img_size is None else {"img_size": img_size}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        near = difflib.get_close_matches(arch, timm.list_models("*dino*") + timm.list_models("vit_*"),
                                         n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise UserError(f"teacher.arch {arch!r} is not a timm model.{hint} Use a timm ViT name such "
                        "as 'vit_base_patch16_224.dino' or 'vit_base_patch14_dinov2.lvd142m'") from None
    if not isinstance(model, VisionTransformer):
        raise UserError(f"teacher.arch {arch!r} is a {type(model).__name__}, not a ViT; use a DINO or "
                        "DINOv2 ViT such as 'vit_base_patch16_224.dino'")
    return model


class DinoTeacher(nn.Module):
    """A frozen timm ViT returning patch features on the student's token grid."""

    def __init__(self, vit: nn.Module, grid_size: Tuple[int, int], dtype: str = "fp32",
                 image_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        if dtype not in DTYPES:
            raise UserError(f"teacher.dtype {dtype!r} is not supported; valid choices: "
                            f"{', '.join(sorted(DTYPES))}")
        self.vit = vit
        self.grid_size = tuple(int(g) for g in grid_size)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.input_size = (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
        # The student's image size: any other size is an error, not a silent resize.
        self.image_size = tuple(int(s) for s in image_size) if image_size else None
        self.dtype = DTYPES[dtype]
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1),
                             persistent=False)
        self.vit.to(self.dtype)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout / drop-path stay off

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) in [-1, 1] -> patch features (B, gh*gw, dim), float32."""
        if self.image_size and tuple(images.shape[-2:]) != self.image_size:
            raise UserError(f"teacher got images of size {tuple(images.shape[-2:])}, expected "
                            f"{self.image_size} (model_args.img_size); set data.image_size to match")
        x = (images.float() + 1.0) / 2.0
        x = (x - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False,
                              antialias=True)
        tokens = self.vit.forward_features(x.to(self.dtype))
        patches = tokens[:, self.vit.num_prefix_tokens:]  # drop CLS and register tokens
        expected = self.grid_size[0] * self.grid_size[1]
        if patches.shape[1] != expected:
            raise UserError(f"teacher produced {patches.shape[1]} patch tokens, expected {expected} "
                            f"for a {self.grid_size[0]}x{self.grid_size[1]} grid; check teacher.arch")
        return patches.float()


def load_teacher(arch: str, ckpt_path: Optional[str], grid_size: Sequence[int],
                 allow_random: bool = False, dtype: str = "fp32",
                 image_size: Optional[Sequence[int]] = None) -> DinoTeacher:
    """Build the teacher for a student token grid and load its weights from ``ckpt_path``."""
    grid_size = tuple(int(g) for g in grid_size)
    if not ckpt_path and not allow_random:
        raise UserError(f"DinoVQ needs a DINO teacher checkpoint: set teacher.ckpt_path to a local "
                        f"weights file for {arch!r} (e.g. dino_vitbase16_pretrain.pth for "
                        "vit_base_patch16_224.dino), or teacher.allow_random: true for tests and demos")
    state = read_state_dict(ckpt_path) if ckpt_path else None
    probe_patch = _patch_size_of(arch)
    vit = _create_vit(arch, (grid_size[0] * probe_patch, grid_size[1] * probe_patch))
    if state is None:
        log.warning("=" * 72 + "\nDinoVQ teacher %r is RANDOMLY INITIALISED (teacher.allow_random): "
                    "its features carry no semantics. Use this for tests and demos only.\n" + "=" * 72,
                    arch)
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        try:
            state = checkpoint_filter_fn(state, vit)
        except Exception as exc:  # shapes that timm cannot reconcile
            raise UserError(f"teacher checkpoint {ckpt_path!r} does not fit teacher.arch {arch!r} "
                            f"({type(exc).__name__}: {exc}); set teacher.arch to the checkpoint's model") from None
        missing, unexpected = _mismatch(vit, state)
        if missing or unexpected:
            raise UserError(f"teacher checkpoint {ckpt_path!r} does not match teacher.arch {arch!r}: "
                            f"missing {_few(missing)}, unexpected {_few(unexpected)}; set teacher.arch "
                            "to the model the checkpoint was trained as")
        vit.load_state_dict(state, strict=True)
    return DinoTeacher(vit, grid_size, dtype, image_size=image_size)


def _patch_size_of(arch: str) -> int:
    """The patch size of a timm ViT, read from an instance on the meta device (no memory)."""
    with torch.device("meta"):
        probe = _create_vit(arch, None)
    return int(probe.patch_embed.patch_size[0])


def _mismatch(model: nn.Module, state: Dict[str, torch.Tensor]):
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    return missing + [f"{k} (shape)" for k in wrong], unexpected


def _few(keys, n: int = 4) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def features_for_batch(teacher: DinoTeacher, images: torch.Tensor) -> torch.Tensor:
    """What the trainer feeds DinoVQ as ``batch["dino_features"]`` when no cache is used:
    ``(B, N, dim)`` float32 on the teacher's device, computed without gradients."""
    return teacher(images.to(teacher.mean.device))
