"""DinoVQ: a ViT tokenizer whose codes are distilled from a frozen DINO teacher.

    images (B, 3, H, W) in [-1, 1]
      -> ViT encoder over p x p patches                    (Dosovitskiy et al. 2021)
      -> Linear-Tanh-Linear to a low-dim code space, l2-normalised
                                                            (BEiT v2 VQ-KD, Peng et al. 2022;
                                                             factorized codes, ViT-VQGAN,
                                                             Yu et al. 2022)
      -> nearest code by cosine, straight-through, EMA codebook
      -> pixel decoder (ViT blocks, per-patch linear to pixels: ViT-VQGAN's decoder)
         and a semantic head (ViT blocks, linear to the teacher's width: VQ-KD's decoder)

Codebook: updated by exponential moving averages (van den Oord et al. 2017, appendix; as in
VQ-KD) of the l2-normalised encoder outputs, then re-normalised.  It is a set of buffers,
so it is in no optimizer (``model.parameters()`` does not list it) and it is saved in the
state dict as ``quantize.{embedding,cluster_size,embed_avg}``.  In DDP the per-step counts
and sums are all-reduced before the update, so every rank keeps the same codebook.  Only
the commitment term reaches the encoder (``vq_loss``).

This module holds the network (:class:`DinoVQNet`, the registry's model), the rules a
DinoVQ config must satisfy, and the batch hook that gives every training batch its teacher
features (online from ``adapters/dino_teacher.py``, or from an ``extract-features`` cache,
``adapters/dino_features.py``).  The DinoVQ reference API, a model that owns its loss::

    from losses.dinovq_model import DinoVQModel
    model = DinoVQModel(img_size=(224, 224), encoder_embed_dim=768, codebook_size=8192)
    losses = model.compute_loss(imgs, dino_features_gt)      # (B, 196, 768) features
    losses["total_loss"].backward()

lives with the loss family (``losses/dinovq_model.py``): a network never imports its loss.
With the defaults the network is ViT-B scale (12 encoder blocks of width 768, 12
pixel-decoder blocks, a 3-block semantic head).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from adapters.contract import Tokenizer, encode_in_chunks, straight_through
from adapters.dino_features import FeatureCache, FeatureShapeError
from adapters.dino_teacher import DinoTeacher, load_teacher
from adapters.distributed import all_reduce_sum_
from adapters.ema_quantizer import ema_step_, pick_code_vectors
from adapters.registry import (IMAGE_CHANNELS, MAX_BLOCKS, MAX_CODES, MAX_IMAGE_SIZE, MAX_WIDTH, LossFamilySpec,
                               check_model_args, get_model_type, int_findings, number_findings, register_model_type)
from train.errors import (ERROR, WARNING, Finding, UserError, is_int, is_number, raise_for_errors,
                          type_finding)
from train.schema import DataSection, as_dict, config_data

# Defaults in one visible place (ViT-B / VQ-KD scale).
DEFAULTS = dict(
    img_size=(224, 224),        # input size in pixels (H, W); the position embeddings are fixed to it
    patch_size=16,              # student patch size in pixels: one code per patch
    in_channels=3,
    encoder_embed_dim=768,      # ViT-B width
    encoder_depth=12,
    encoder_num_heads=12,
    decoder_embed_dim=768,
    decoder_depth=12,           # pixel decoder blocks
    decoder_num_heads=12,
    dino_head_depth=3,          # semantic head blocks (VQ-KD uses a shallow decoder)
    mlp_ratio=4.0,
    codebook_size=8192,
    codebook_dim=32,            # factorized code width (VQ-KD and ViT-VQGAN use 32)
    codebook_decay=0.99,        # EMA decay of the codebook statistics
    codebook_eps=1e-5,          # Laplace smoothing of the cluster sizes
    dino_dim=768,               # the teacher's feature width (DINO ViT-B/16: 768)
)


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise UserError(f"DinoVQ img_size must be an int or (H, W), got {list(size)}")
    return size


class ViTStack(nn.Module):
    """Learned position embeddings + pre-norm transformer blocks (timm's ``Block``) + norm."""

    def __init__(self, num_tokens: int, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        # Imported here: timm pulls in torchvision and torch._dynamo (about 2 s), which every
        # command that merely reads the registry (validate) would otherwise pay.
        from timm.models.vision_transformer import Block

        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class EMACodebook(nn.Module):
    """Cosine-distance codebook on the unit sphere, updated by EMA (no gradients)."""

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.dim, self.decay, self.eps = int(num_codes), int(dim), float(decay), float(eps)
        embedding = F.normalize(torch.randn(self.num_codes, self.dim), dim=-1)
        self.register_buffer("embedding", embedding)
        self.register_buffer("cluster_size", torch.zeros(self.num_codes))
        self.register_buffer("embed_avg", embedding.clone())

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor, update: bool = False):
        """``z``: (..., dim), l2-normalised.  Returns (z_q straight-through, commitment, indices)."""
        z = z.float()
        flat = z.reshape(-1, self.dim)
        # On the unit sphere the nearest code in l2 is the one with the largest dot product.
        indices = (flat @ self.embedding.t()).argmax(dim=-1)
        z_q = self.embedding[indices].view_as(z)
        if update:
            self._ema_update(flat.detach(), indices)
        commitment = F.mse_loss(z, z_q.detach())
        z_q = straight_through(z, z_q)
        return z_q, commitment, indices.view(z.shape[:-1])

    @torch.no_grad()
    def init_from_vectors(self, vectors: torch.Tensor, seed: int = 0) -> None:
        """Data-dependent start (``train.init_codebook_from_data``): each code is one of the
        l2-normalised ``vectors`` (N, dim), counted once (see ``adapters/ema_quantizer.py``)."""
        chosen = F.normalize(pick_code_vectors(vectors.reshape(-1, self.dim), self.num_codes, seed).float(), dim=-1)
        self.embedding.copy_(chosen.to(self.embedding))
        self.embed_avg.copy_(chosen.to(self.embed_avg))
        self.cluster_size.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.num_codes).float()
        sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, flat)
        # Every rank must apply the same update, or the codebooks drift apart.
        all_reduce_sum_(counts)
        all_reduce_sum_(sums)
        smoothed = ema_step_(self.cluster_size, self.embed_avg, counts, sums, self.decay, self.eps)
        self.embedding.copy_(F.normalize(self.embed_avg / smoothed.unsqueeze(1), dim=-1))


class DinoVQNet(Tokenizer):
    """The DinoVQ network (no loss): the registry's model for ``model_type: DinoVQ``.

    ``forward(x)`` returns ``(reconstruction, vq_loss)`` like every registered model;
    ``forward(x, return_codes=True)`` adds ``(indices,)`` with indices (B, H/p, W/p);
    ``forward(x, return_dict=True)`` returns ``reconstructions``, ``dino_pred`` (B, N,
    dino_dim), ``vq_loss`` and ``indices`` (what the DinoVQ loss family reads).
    """

    codebook_names = ("codebook",)

    def __init__(self, img_size=DEFAULTS["img_size"], encoder_embed_dim: int = 768,
                 codebook_size: int = 8192, patch_size: int = 16, dino_dim: int = 768, in_channels: int = 3,
                 encoder_depth: int = 12, encoder_num_heads: int = 12,
                 decoder_embed_dim: Optional[int] = None, decoder_depth: int = 12,
                 decoder_num_heads: Optional[int] = None, dino_head_depth: int = 3,
                 mlp_ratio: float = 4.0, codebook_dim: int = 32, codebook_decay: float = 0.99,
                 codebook_eps: float = 1e-5):
        super().__init__()
        # The same geometry rules validate runs on a config.
        raise_for_errors(_geometry_findings(dict(img_size=img_size, patch_size=patch_size,
                                                 encoder_embed_dim=encoder_embed_dim,
                                                 encoder_num_heads=encoder_num_heads,
                                                 decoder_embed_dim=decoder_embed_dim,
                                                 decoder_num_heads=decoder_num_heads)), "DinoVQ")
        self.img_size = _pair(img_size)
        self.patch_size = int(patch_size)
        h, w = self.img_size
        self.grid_size = (h // self.patch_size, w // self.patch_size)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.in_channels = int(in_channels)
        self.dino_dim = int(dino_dim)
        self.codebook_size = int(codebook_size)
        self.codebook_dim = int(codebook_dim)
        decoder_embed_dim = int(decoder_embed_dim or encoder_embed_dim)
        decoder_num_heads = int(decoder_num_heads or encoder_num_heads)

        p, c = self.patch_size, self.in_channels
        self.patch_embed = nn.Conv2d(c, encoder_embed_dim, kernel_size=p, stride=p)
        self.encoder = ViTStack(self.num_tokens, encoder_embed_dim, encoder_depth,
                                encoder_num_heads, mlp_ratio)
        # VQ-KD's "encode task layer": a small MLP into the low-dim code space.
        self.quant_proj = nn.Sequential(nn.Linear(encoder_embed_dim, encoder_embed_dim), nn.Tanh(),
                                        nn.Linear(encoder_embed_dim, self.codebook_dim))
        self.quantize = EMACodebook(self.codebook_size, self.codebook_dim, codebook_decay, codebook_eps)
        self.post_quant_proj = nn.Linear(self.codebook_dim, decoder_embed_dim)
        self.decoder = ViTStack(self.num_tokens, decoder_embed_dim, decoder_depth,
                                decoder_num_heads, mlp_ratio)
        self.pixel_head = nn.Linear(decoder_embed_dim, p * p * c)
        self.dino_proj = nn.Linear(self.codebook_dim, decoder_embed_dim)
        self.dino_head = ViTStack(self.num_tokens, decoder_embed_dim, dino_head_depth,
                                  decoder_num_heads, mlp_ratio)
        self.dino_out = nn.Linear(decoder_embed_dim, self.dino_dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # timm's ViT initialisation: truncated normal linears, zero biases.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- the model contract (adapters/contract.py) ---------------------------------------
    @property
    def codebook_sizes(self) -> Tuple[int]:
        return (self.codebook_size,)

    @torch.no_grad()
    def init_codebook_from_data(self, images: torch.Tensor, seed: int = 0, batch_size: int = 16) -> Tuple[int]:
        """Start the EMA codebook from encoder outputs of ``images`` (one distinct random
        code-space vector per code, counted once); eval mode, ``batch_size`` images at a
        time.  Returns the number of vectors drawn from."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            flat = torch.cat([self.encode(images[i:i + batch_size].to(device)).reshape(-1, self.codebook_dim)
                              for i in range(0, images.shape[0], batch_size)]).float()
        finally:
            self.train(was_training)
        self.quantize.init_from_vectors(flat, seed)
        return (int(flat.shape[0]),)

    def codebook_vectors(self, images: torch.Tensor, batch_size: int = 16) -> Tuple[torch.Tensor]:
        """The l2-normalised code-space vectors of ``images``, flat (N, codebook_dim)."""
        chunks = encode_in_chunks(self, lambda x: self.encode(x).reshape(-1, self.codebook_dim).float(),
                                  images, batch_size)
        return (torch.cat(chunks),)

    @torch.no_grad()
    def set_codes(self, index: int, ids: torch.Tensor, vectors: torch.Tensor) -> List[torch.Tensor]:
        """Codes ``ids`` become the l2-normalised ``vectors``, counted once."""
        q = self.quantize
        unit = F.normalize(vectors.float(), dim=-1).to(q.embedding)
        q.embedding[ids] = unit
        q.embed_avg[ids] = unit
        q.cluster_size[ids] = 1.0
        return [q.embedding, q.embed_avg, q.cluster_size]

    def get_last_layer(self) -> torch.Tensor:
        return self.pixel_head.weight

    def generator_parameters(self):
        """Everything the generator optimizer owns: no discriminator, no LPIPS, no codebook
        (the codebook is EMA buffers)."""
        return [p for name, p in self.named_parameters() if not name.startswith("loss_fn.")]

    # ---- network -----------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.img_size):
            raise ValueError(f"DinoVQ expects images of shape (B, {self.in_channels}, "
                             f"{self.img_size[0]}, {self.img_size[1]}), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> l2-normalised code-space vectors (B, N, codebook_dim)."""
        self._check_images(x)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return F.normalize(self.quant_proj(self.encoder(tokens)), dim=-1)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, N, codebook_dim) -> images (B, C, H, W)."""
        patches = self.pixel_head(self.decoder(self.post_quant_proj(z_q)))
        b = patches.shape[0]
        (gh, gw), p, c = self.grid_size, self.patch_size, self.in_channels
        # (B, gh*gw, p*p*c) -> (B, c, gh*p, gw*p)
        return patches.view(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * p, gw * p)

    def predict_dino(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.dino_out(self.dino_head(self.dino_proj(z_q)))

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H/p, W/p) -> code vectors (B, N, codebook_dim)."""
        return self.quantize.embedding[indices.reshape(indices.shape[0], -1)]

    def encode_code(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        """``(indices,)`` (B, H/p, W/p) without the decoder or the DINO head; ``forward``'s
        codes, and the codebook never moves here."""
        _, _, indices = self.quantize(self.encode(x), update=False)
        return (indices.view(x.shape[0], *self.grid_size),)

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.get_codebook_entry(indices))

    def forward(self, x: torch.Tensor, return_codes: bool = False, return_dict: bool = False,
                update_codebook: bool = True):
        z = self.encode(x)
        z_q, vq_loss, indices = self.quantize(z, update=self.training and update_codebook)
        recon = self.decode(z_q)
        indices = indices.view(x.shape[0], *self.grid_size)
        if return_dict:
            return {"reconstructions": recon, "dino_pred": self.predict_dino(z_q), "vq_loss": vq_loss,
                    "indices": indices}
        return (recon, vq_loss, (indices,)) if return_codes else (recon, vq_loss)


# --------------------------------------------------------------------------------------
# Config: argument names, rules, geometry

MODEL_ARG_NAMES = ("img_size", "encoder_embed_dim", "codebook_size", "patch_size", "dino_dim",
                   "in_channels", "encoder_depth", "encoder_num_heads", "decoder_embed_dim",
                   "decoder_depth", "decoder_num_heads", "dino_head_depth", "mlp_ratio",
                   "codebook_dim", "codebook_decay", "codebook_eps")
# The loss settings a DinoVQ config carries in model_args (the reference API's constructor
# names); the DinoVQ loss family reads them (losses/dinovq_loss.py).
LOSS_ARG_NAMES = ("dino_loss_weight", "recon_loss_weight", "vq_loss_weight", "use_perceptual",
                  "perceptual_weight", "vgg_ckpt_path", "allow_random_vgg", "use_gan", "disc_start",
                  "disc_weight", "disc_factor", "disc_dim", "disc_num_layers", "disc_adaptive_weight",
                  "disc_loss", "disc_in_channels",
                  # adversarial opt-ins (losses/gan.py, losses/lecam.py); off by default
                  "generator_loss", "lecam_weight", "lecam_ema_decay")


def accepted_args(variant: Optional[str]) -> Tuple[List[str], bool]:
    return sorted(set(MODEL_ARG_NAMES) | set(LOSS_ARG_NAMES)), True


def _geometry_findings(args: Dict[str, Any]) -> List[Finding]:
    """img_size a multiple of patch_size; widths divisible by their head counts."""
    out: List[Finding] = []
    img, patch = args.get("img_size", DEFAULTS["img_size"]), args.get("patch_size", DEFAULTS["patch_size"])
    if img is not None and is_int(patch) and patch > 0:
        sizes = img if isinstance(img, (list, tuple)) else [img, img]
        if not (len(sizes) == 2 and all(is_int(s) and s > 0 and s % patch == 0 for s in sizes)):
            out.append(Finding(ERROR, "model_args.img_size", "bad_value",
                               f"img_size {img!r} must be positive multiples of patch_size {patch}",
                               f"use a multiple of {patch}"))
    enc_dim = args.get("encoder_embed_dim", DEFAULTS["encoder_embed_dim"])
    enc_heads = args.get("encoder_num_heads", DEFAULTS["encoder_num_heads"])
    dims = (("encoder", enc_dim, enc_heads),
            ("decoder", args.get("decoder_embed_dim") or enc_dim, args.get("decoder_num_heads") or enc_heads))
    for name, dim, heads in dims:
        if is_int(dim) and is_int(heads) and heads > 0 and dim % heads:
            out.append(Finding(ERROR, f"model_args.{name}_num_heads", "bad_value",
                               f"DinoVQ {name}_embed_dim {dim} is not divisible by {name}_num_heads {heads}",
                               "pick a head count that divides it"))
    return out


def dinovq_rules(data: Dict[str, Any], variant: Optional[str], out: List[Finding]) -> None:
    """Findings about a DinoVQ config: argument types, geometry, crops, teacher features."""
    args = data.get("model_args") or {}
    if not isinstance(args, dict):
        return
    ints = ("encoder_embed_dim", "codebook_size", "patch_size", "dino_dim", "disc_start", "disc_dim",
            "disc_num_layers")
    for key in ints:
        if key in args and not is_int(args[key]):
            type_finding(out, f"model_args.{key}", args[key], 1, "an integer")
    for key in ("dino_loss_weight", "recon_loss_weight", "vq_loss_weight", "perceptual_weight", "disc_weight"):
        if key in args and not is_number(args[key]):
            type_finding(out, f"model_args.{key}", args[key], 1.0, "a number")
    _value_rules(args, out)
    # Unset sizes are the defaults fit uses (224 for the model, 256 for the crops): they differ.
    img_size = args.get("img_size", list(DEFAULTS["img_size"]))
    data_section = data.get("data") or {}
    data_size = data_section.get("image_size", DataSection.image_size)
    if img_size is not None and is_int(data_size):
        sizes = img_size if isinstance(img_size, (list, tuple)) else [img_size, img_size]
        if any(s != data_size for s in sizes):
            out.append(Finding(ERROR, "data.image_size", "image_size_mismatch",
                               f"data.image_size {data_size} differs from model_args.img_size {img_size!r}: "
                               "DinoVQ's position embeddings and token grid are built for img_size",
                               f"set data.image_size: {sizes[0]}" if sizes[0] == sizes[-1] else
                               "make them agree (training crops are square)",
                               [("data.image_size", sizes[0])] if sizes[0] == sizes[-1] else []))
    teacher = data.get("teacher") or {}
    if teacher.get("dtype", "fp32") not in ("fp32", "bf16"):
        out.append(Finding(ERROR, "teacher.dtype", "bad_value",
                           f"teacher.dtype is {teacher['dtype']!r}; valid choices: fp32, bf16", "write dtype: fp32",
                           [("teacher.dtype", "fp32")]))
    if not teacher.get("ckpt_path") and not teacher.get("allow_random") and not data_section.get("feature_cache"):
        out.append(Finding(WARNING, "teacher.ckpt_path", "teacher_weights_missing",
                           "no DINO teacher weights: fit needs teacher.ckpt_path (a local DINO / DINOv2 checkpoint) "
                           "or a data.feature_cache made by extract-features",
                           "set teacher.ckpt_path=/path/to/dino_vitbase16_pretrain.pth"))
    if data_section.get("feature_cache") and data_section.get("random_crop", True):
        out.append(Finding(ERROR, "data.random_crop", "feature_cache_random_crop",
                           "data.feature_cache holds features of centre crops, but data.random_crop is true",
                           "set data.random_crop=false, or drop data.feature_cache to compute features online",
                           [("data.random_crop", False)]))
    out.extend(_geometry_findings(args))


# model_args -> (lowest, highest) for the integer arguments; the highs are the registry's
# shared size bounds, so no config makes fit try to allocate a ViT of absurd width.
INT_BOUNDS = {"encoder_embed_dim": (1, MAX_WIDTH), "decoder_embed_dim": (1, MAX_WIDTH), "dino_dim": (1, MAX_WIDTH),
              "codebook_dim": (1, MAX_WIDTH), "codebook_size": (1, MAX_CODES), "patch_size": (1, 256),
              "encoder_depth": (0, MAX_BLOCKS), "decoder_depth": (0, MAX_BLOCKS), "dino_head_depth": (0, MAX_BLOCKS),
              "encoder_num_heads": (1, 256), "decoder_num_heads": (1, 256), "disc_dim": (1, MAX_WIDTH),
              "disc_num_layers": (0, 8), "disc_start": (0, 2 ** 62), "in_channels": (1, 64),
              "disc_in_channels": (1, 64)}
BOOL_ARGS = ("use_perceptual", "allow_random_vgg", "use_gan", "disc_adaptive_weight")
MAX_TOKENS = 4096            # tokens per image (a 64 x 64 grid): attention memory grows with its square


def _value_rules(args: Dict[str, Any], out: List[Finding]) -> None:
    """Types, ranges and sizes of DinoVQ's arguments: what the network and its loss would
    otherwise reject with a traceback (``int("x")``, division by zero heads, empty codebooks)
    or try to allocate (``codebook_size: 1e10``)."""
    typed_elsewhere = ("encoder_embed_dim", "codebook_size", "patch_size", "dino_dim", "disc_start", "disc_dim",
                       "disc_num_layers")     # dinovq_rules reports their types already
    for key, (low, high) in INT_BOUNDS.items():
        # null means "same as the encoder" for the decoder's width and heads only.
        if key in args and not (args[key] is None and key in ("decoder_embed_dim", "decoder_num_heads")) and \
                (is_int(args[key]) or key not in typed_elsewhere):
            int_findings(out, f"model_args.{key}", args[key], low, high, key)
    for key in ("in_channels", "disc_in_channels"):
        if is_int(args.get(key)) and args[key] != IMAGE_CHANNELS and 1 <= args[key] <= 64:
            out.append(Finding(ERROR, f"model_args.{key}", "channels_mismatch",
                               f"model_args.{key} is {args[key]}, but training images are RGB "
                               f"({IMAGE_CHANNELS} channels)", f"set {key}: {IMAGE_CHANNELS}",
                               [(f"model_args.{key}", IMAGE_CHANNELS)]))
    if "mlp_ratio" in args:
        number_findings(out, "model_args.mlp_ratio", args["mlp_ratio"], 0.01, 16.0, "mlp_ratio")
    if "codebook_decay" in args:
        number_findings(out, "model_args.codebook_decay", args["codebook_decay"], 0.0, 1.0, "the EMA decay",
                        high_open=True)
    if "codebook_eps" in args:
        number_findings(out, "model_args.codebook_eps", args["codebook_eps"], 0.0, 1.0, "the EMA smoothing eps")
    for key in ("disc_factor",):
        if key in args and not is_number(args[key]):
            type_finding(out, f"model_args.{key}", args[key], 1.0, "a number")
    for key in BOOL_ARGS:
        if key in args and not isinstance(args[key], bool):
            out.append(Finding(ERROR, f"model_args.{key}", "bad_type",
                               f"model_args.{key} is {args[key]!r}; expected true or false", "write true or false"))
    if "disc_loss" in args and args["disc_loss"] not in ("hinge", "vanilla"):
        out.append(Finding(ERROR, "model_args.disc_loss", "bad_value",
                           f"model_args.disc_loss {args['disc_loss']!r} is unknown; valid choices: hinge, vanilla",
                           "use one of hinge, vanilla"))
    if args.get("vgg_ckpt_path") is not None and not isinstance(args["vgg_ckpt_path"], str):
        out.append(Finding(ERROR, "model_args.vgg_ckpt_path", "bad_type",
                           f"model_args.vgg_ckpt_path is {args['vgg_ckpt_path']!r}; expected a file path",
                           "write the path of a torchvision vgg16 state dict"))
    img = args.get("img_size", DEFAULTS["img_size"])
    sizes = img if isinstance(img, (list, tuple)) else [img, img]
    patch = args.get("patch_size", DEFAULTS["patch_size"])
    if len(sizes) == 2 and all(is_int(s) for s in sizes) and is_int(patch) and patch > 0:
        if max(sizes) > MAX_IMAGE_SIZE:
            out.append(Finding(ERROR, "model_args.img_size", "too_large",
                               f"model_args.img_size {img!r} is over {MAX_IMAGE_SIZE} pixels per side",
                               "use e.g. img_size: 224"))
        elif (sizes[0] // patch) * (sizes[1] // patch) > MAX_TOKENS:
            out.append(Finding(ERROR, "model_args.patch_size", "too_large",
                               f"img_size {img!r} in {patch}-pixel patches is {(sizes[0] // patch) * (sizes[1] // patch)} "
                               f"tokens per image, over {MAX_TOKENS} (attention memory grows with its square)",
                               "use a larger patch_size (e.g. 16)"))


def student_geometry(cfg) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The DinoVQ image size ``(H, W)`` and token grid ``(H/p, W/p)`` of a config."""
    args = as_dict(cfg.model_args)
    h, w = _pair(args.get("img_size", DEFAULTS["img_size"]))
    p = int(args.get("patch_size", DEFAULTS["patch_size"]))
    if h % p or w % p:
        raise UserError(f"model_args.img_size {[h, w]} is not divisible by patch_size {p}")
    return (h, w), (h // p, w // p)


def _dino_dim(cfg) -> int:
    return int(as_dict(cfg.model_args).get("dino_dim", DEFAULTS["dino_dim"]))


# --------------------------------------------------------------------------------------
# Teacher features for every batch (the registry's batch hook)

def build_teacher(cfg) -> DinoTeacher:
    """The teacher of an ``ExperimentConfig`` (``cfg.teacher``), checked against the model."""
    t = cfg.teacher
    image_size, grid = student_geometry(cfg)
    teacher = load_teacher(t.arch, t.ckpt_path, grid, allow_random=bool(t.allow_random),
                           dtype=str(t.dtype), image_size=image_size)
    dino_dim = _dino_dim(cfg)
    if teacher.embed_dim != dino_dim:
        raise UserError(f"teacher {t.arch!r} has feature width {teacher.embed_dim} but "
                        f"model_args.dino_dim is {dino_dim}; set model_args.dino_dim: {teacher.embed_dim}")
    return teacher


def open_feature_cache(cfg) -> FeatureCache:
    """Open ``cfg.data.feature_cache`` and check it fits the config's model and data."""
    cache = FeatureCache(str(cfg.data.feature_cache))
    image_size, grid = student_geometry(cfg)
    dino_dim = _dino_dim(cfg)
    if cache.grid != tuple(grid) or cache.dino_dim != dino_dim:
        raise FeatureShapeError(
            f"data.feature_cache {cache.path!r} holds features on a {cache.grid[0]}x{cache.grid[1]} grid "
            f"of width {cache.dino_dim}, this config needs {grid[0]}x{grid[1]} of width {dino_dim} "
            f"(img_size {list(image_size)}); re-run extract-features with this config")
    if bool(cfg.data.random_crop):
        raise UserError("data.feature_cache holds features of centre crops, but data.random_crop is "
                        "true; set data.random_crop=false, or drop data.feature_cache to compute "
                        "features online")
    return cache


def teacher_features_hook(cfg, device: Optional[torch.device] = None) -> Callable[[Dict, int], Dict]:
    """``hook(batch, step) -> batch`` adding ``batch["dino_features"]`` (B, N, dino_dim):
    looked up in ``data.feature_cache`` by ``batch["path"]``, or computed by the frozen
    teacher (``teacher.ckpt_path``) without gradients.  A batch that already has features
    is left alone."""
    if getattr(cfg.data, "feature_cache", None):
        source: Any = open_feature_cache(cfg)

        def features(batch):
            return source.features_for_batch(batch)
    else:
        source = build_teacher(cfg)
        if device is not None:
            source.to(device)

        def features(batch):
            return source(batch["image"].to(source.mean.device)).to(batch["image"].device)

    def hook(batch: Dict, step: int) -> Dict:
        if batch.get("dino_features") is None:
            batch = dict(batch, dino_features=features(batch))
        return batch

    hook.source = source   # the teacher or the cache (tests and extract-features read it)
    return hook


# --------------------------------------------------------------------------------------
# Registration and builder

def _gan_settings(data: Dict[str, Any]):
    """DinoVQ keeps its GAN switch and discriminator settings in model_args."""
    args = data.get("model_args") or {}
    return (args.get("use_gan", False) if isinstance(args, dict) else None), args


def _tiny_config() -> Dict[str, Any]:
    """A 32 px DinoVQ small enough for CPU tests (random teacher, GAN from step 0)."""
    return {"model_type": "DinoVQ",
            "model_args": {"img_size": [32, 32], "patch_size": 8, "encoder_embed_dim": 32, "encoder_depth": 1,
                           "encoder_num_heads": 2, "decoder_depth": 1, "dino_head_depth": 1, "codebook_size": 16,
                           "codebook_dim": 8, "dino_dim": 192, "use_gan": True, "disc_start": 0, "disc_dim": 8,
                           "disc_num_layers": 1},
            "teacher": {"arch": "vit_tiny_patch16_224", "allow_random": True},
            "train": {"batch_size": 2, "learning_rate": 1e-4}, "data": {"image_size": 32}}


@register_model_type(
    "DinoVQ",
    description="semantic tokenizer distilled from a DINO teacher (BEiT v2 VQ-KD style)",
    loss=LossFamilySpec("dinovq", "DinoVQ: DINO cosine + MSE + VQ commitment, optional LPIPS and PatchGAN",
                        "losses.dinovq_loss.DinoVQLoss"),
    aliases=("dinovq", "DinoVQModel", "dino_vq"),
    accepted_args=accepted_args,
    rules=dinovq_rules,
    gan_settings=_gan_settings,
    codebooks=lambda variant: ("codebook",),
    ema_codebook=lambda variant: True,
    vector_codebook=lambda variant: True,
    tiny_config=_tiny_config,
    batch_hook=teacher_features_hook,
)
def build_dinovq(cfg) -> DinoVQNet:
    """Registry builder: the network without its loss (the DinoVQ loss family reads the loss
    settings of ``model_args``).  The config must pass :func:`dinovq_rules`."""
    data = config_data(cfg)
    findings = check_model_args(get_model_type("DinoVQ"), data, None)
    raise_for_errors([f for f in findings if f.path.startswith("model_args")], "DinoVQ model_args")
    args = data.get("model_args") or {}
    return DinoVQNet(**{k: args[k] for k in MODEL_ARG_NAMES if k in args})
