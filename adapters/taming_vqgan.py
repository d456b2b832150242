"""TamingVQGAN: taming-transformers' first-stage VQGAN as a plain ``nn.Module``.

Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image Synthesis" (CVPR
2021).  The encoder, decoder and quantizers are the installed ``taming.modules`` classes;
only the Lightning shell of ``taming.models.vqgan`` is replaced (it cannot be imported with
current pytorch_lightning, and the training loop and the loss live elsewhere here).

Variants and the upstream classes whose state-dict layout they reproduce (minus ``loss.*``,
which belongs to the ``LossCalculator``):

=========  =================================================  ======================================
variant    upstream                                           quantizer
=========  =================================================  ======================================
VQ         taming.models.vqgan.VQModel,                       ``VectorQuantizer2`` (beta 0.25)
           ldm.models.autoencoder.VQModel
EMAVQ      taming.models.vqgan.EMAVQ                          ``adapters.ema_quantizer`` (EMA codebook)
Gumbel     taming.models.vqgan.GumbelVQ                       ``GumbelQuantize`` (proj + embed)
NoDisc     taming.models.vqgan.VQNoDiscModel                  ``VectorQuantizer2``
=========  =================================================  ======================================

``ddconfig`` takes every option of taming's and latent-diffusion's ``Encoder``/``Decoder``:
``attn_type`` ("vanilla" | "linear" | "none") and ``use_linear_attn`` (latent-diffusion,
e.g. the ``vq-f4-noattn`` first stage), ``tanh_out`` and ``give_pre_end``.

Usage::

    from train.schema import make_config
    from adapters import build_model
    model = build_model(make_config(model_type="TamingVQGAN", model_variant="EMAVQ",
                                    model_args=dict(n_embed=1024, embed_dim=256, ddconfig={...})))
    xrec, qloss, indices = model(x, return_pred_indices=True)
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import io
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from adapters.ema_quantizer import EMAVectorQuantizer
from adapters.weights import (drop_prefixes, load_checkpoint_state_dict, load_model_weights,
                              strip_wrapper_prefixes)
from train.errors import UserError

VARIANTS = ("VQ", "EMAVQ", "Gumbel", "NoDisc")

# Constructor arguments each upstream class takes (plus ``beta``/``decay``/``eps``, which
# upstream hard-codes).  Arguments that only steer Lightning training (image_key, monitor,
# scheduler_config, ...) are accepted and ignored by the model.
_COMMON = ("ddconfig", "lossconfig", "n_embed", "embed_dim", "ckpt_path", "ignore_keys", "image_key",
           "colorize_nlabels")
ACCEPTED_ARGS: Dict[str, Tuple[str, ...]] = {
    "VQ": _COMMON + ("monitor", "remap", "sane_index_shape", "beta",
                     # ldm.models.autoencoder.VQModel
                     "batch_resize_range", "scheduler_config", "lr_g_factor", "use_ema"),
    "EMAVQ": _COMMON + ("monitor", "remap", "sane_index_shape", "beta", "decay", "eps"),
    "Gumbel": _COMMON + ("monitor", "remap", "temperature_scheduler_config", "kl_weight", "temp_init",
                         "straight_through"),
    "NoDisc": _COMMON + ("beta",),
}
# Keys a legacy config may leave inside model_args; they are read elsewhere.
_PASSED_THROUGH = ("model_variant",)
REQUIRED_ARGS = ("ddconfig", "n_embed", "embed_dim")
REQUIRED_DDCONFIG = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels",
                     "resolution", "z_channels")
ATTN_TYPES = ("vanilla", "linear", "none")

# Upstream defaults that are not constructor arguments there.
DEFAULT_BETA = 0.25          # VQModel / EMAVQ commitment weight
DEFAULT_DECAY = 0.99         # EmbeddingEMA decay
DEFAULT_EPS = 1e-5           # EmbeddingEMA Laplace smoothing
DEFAULT_KL_WEIGHT = 1e-8     # GumbelVQ kl_weight
DEFAULT_TEMP_INIT = 1.0      # GumbelVQ temp_init


# --------------------------------------------------------------------------------------
# Building blocks: latent-diffusion's attention options on top of taming's Encoder/Decoder.

class LinAttnBlock(nn.Module):
    """latent-diffusion's ``LinAttnBlock`` (``LinearAttention`` with one head).

    Keys ``to_qkv.weight`` and ``to_out.{weight,bias}``.  Like upstream it returns the
    projected attention output with no residual connection.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.to_qkv = nn.Conv2d(in_channels, 3 * in_channels, 1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, c, h * w).unbind(1)
        k = k.softmax(dim=-1)
        context = torch.einsum("bdn,ben->bde", k, v)
        out = torch.einsum("bde,bdn->ben", context, q)
        return self.to_out(out.reshape(b, c, h, w))


def _replace_attention(net: nn.Module, attn_type: str) -> None:
    """Swap taming's AttnBlocks for latent-diffusion's ``attn_type`` choice."""
    if attn_type == "vanilla":
        return

    def make(block: nn.Module) -> nn.Module:
        return nn.Identity() if attn_type == "none" else LinAttnBlock(block.in_channels)

    for level in list(getattr(net, "down", [])) + list(getattr(net, "up", [])):
        for i, block in enumerate(level.attn):
            level.attn[i] = make(block)
    net.mid.attn_1 = make(net.mid.attn_1)


def _quiet_build(cls, **kwargs):
    # taming's Decoder prints the latent shape on construction; keep the CLI output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return cls(**kwargs)


def build_encoder_decoder(ddconfig: Dict[str, Any]) -> Tuple[nn.Module, nn.Module]:
    """taming ``Encoder``/``Decoder`` for ``ddconfig``, with latent-diffusion's attention options."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    cfg = dict(ddconfig)
    attn_type = "linear" if cfg.pop("use_linear_attn", False) else cfg.pop("attn_type", "vanilla")
    cfg.pop("attn_type", None)
    cfg.pop("tanh_out", None)
    encoder = _quiet_build(Encoder, **cfg)
    decoder = _quiet_build(Decoder, **cfg)
    _replace_attention(encoder, attn_type)
    _replace_attention(decoder, attn_type)
    return encoder, decoder


# --------------------------------------------------------------------------------------
# The model.

class TamingVQGAN(nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (taming's VQModel).

    ``forward(x)`` returns ``(xrec, codebook_loss)``; ``forward(x, return_pred_indices=True)``
    returns ``(xrec, codebook_loss, indices)`` with ``indices`` a (B, h, w) LongTensor of the
    codes used for this batch (after ``remap``), which losses use for codebook statistics.
    Call it through the (possibly DDP-wrapped) model, not via ``.module``, so DDP sees the
    forward.  The adapter keeps no per-batch state of its own (taming's Decoder does record
    ``last_z_shape``).
    """

    def __init__(self, variant: str, ddconfig: Dict[str, Any], n_embed: int, embed_dim: int, *,
                 remap: Optional[str] = None, sane_index_shape: bool = False, beta: float = DEFAULT_BETA,
                 decay: float = DEFAULT_DECAY, eps: float = DEFAULT_EPS, kl_weight: float = DEFAULT_KL_WEIGHT,
                 temp_init: float = DEFAULT_TEMP_INIT, straight_through: bool = True, temperature_scheduler=None,
                 colorize_nlabels: Optional[int] = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown TamingVQGAN variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.n_embed = int(n_embed)
        self.embed_dim = int(embed_dim)
        self.tanh_out = bool(ddconfig.get("tanh_out", False))
        self.give_pre_end = bool(ddconfig.get("give_pre_end", False))
        z_channels = int(ddconfig["z_channels"])

        self.encoder, self.decoder = build_encoder_decoder(ddconfig)
        if variant == "EMAVQ":
            self.quantize = EMAVectorQuantizer(n_embed, embed_dim, beta=beta, decay=decay, eps=eps,
                                               remap=remap, sane_index_shape=sane_index_shape)
        elif variant == "Gumbel":
            from taming.modules.vqvae.quantize import GumbelQuantize

            # Upstream feeds quant_conv's output (embed_dim channels) into proj, which it
            # builds for z_channels; the builder checks that the two agree.
            self.quantize = _quiet_build(GumbelQuantize, num_hiddens=z_channels, embedding_dim=embed_dim,
                                         n_embed=n_embed, kl_weight=kl_weight, temp_init=temp_init,
                                         straight_through=straight_through, remap=remap)
        else:
            from taming.modules.vqvae.quantize import VectorQuantizer2

            self.quantize = _quiet_build(VectorQuantizer2, n_e=n_embed, e_dim=embed_dim, beta=beta,
                                         remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if colorize_nlabels is not None:
            # Upstream keeps this random projection (segmentation maps -> RGB) in the state dict.
            self.register_buffer("colorize", torch.randn(3, int(colorize_nlabels), 1, 1))
        self.temperature_scheduler = temperature_scheduler

    # ---- the contract ------------------------------------------------------------------
    @property
    def codebook_sizes(self) -> Tuple[int, ...]:
        return (self.n_embed,)

    @property
    def uses_ema_codebook(self) -> bool:
        return self.variant == "EMAVQ"

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def generator_parameters(self) -> List[nn.Parameter]:
        """Parameters for the generator optimizer, in upstream's ``configure_optimizers`` order.

        encoder, decoder, quantize (not for EMAVQ: its codebook is EMA-only), quant_conv,
        post_quant_conv -- the same order, so upstream optimizer states line up.
        """
        parts = [self.encoder, self.decoder]
        if not self.uses_ema_codebook:
            parts.append(self.quantize)
        parts += [self.quant_conv, self.post_quant_conv]
        return [p for part in parts for p in part.parameters()]

    @torch.no_grad()
    def init_codebook_from_data(self, images: torch.Tensor, seed: int = 0, batch_size: int = 16) -> Tuple[int]:
        """EMAVQ only: start the EMA codebook from encoder outputs of ``images`` (B, 3, H, W).

        Each code takes one distinct random pre-quantization vector and a count of 1 (see
        ``adapters/ema_quantizer.py``; ``train.init_codebook_from_data``).  The encoder runs
        in eval mode (no dropout, no RNG use), ``batch_size`` images at a time.  Returns the
        number of vectors drawn from, per codebook.  Raises ``TooFewVectors`` when the
        images give fewer vectors than codes.
        """
        if not self.uses_ema_codebook:
            raise UserError(f"train.init_codebook_from_data is for EMA codebooks; TamingVQGAN {self.variant} "
                            "learns its codebook by gradients. Set train.init_codebook_from_data=false "
                            "(or use model_variant EMAVQ)")
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            chunks = [self.encode_to_prequant(images[i:i + batch_size].to(device)).float()
                      for i in range(0, images.shape[0], batch_size)]
        finally:
            self.train(was_training)
        flat = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim) for z in chunks])
        self.quantize.embedding.init_from_vectors(flat, seed)
        return (int(flat.shape[0]),)

    # ---- taming's API ------------------------------------------------------------------
    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor):
        """``(quant, codebook_loss, (perplexity, min_encodings, indices))`` as taming's encode."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        dec = self.decoder(self.post_quant_conv(quant))
        if self.tanh_out and not self.give_pre_end:
            dec = torch.tanh(dec)
        return dec

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Decode a (B, h, w) tensor of code indices (upstream's ``embed_code`` never existed)."""
        if code_b.dim() != 3:
            raise ValueError(f"decode_code expects (batch, height, width) indices, got shape {tuple(code_b.shape)}")
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, x: torch.Tensor, return_pred_indices: bool = False):
        quant, qloss, info = self.encode(x)
        dec = self.decode(quant)
        if not return_pred_indices:
            return dec, qloss
        b, _, h, w = quant.shape
        return dec, qloss, info[2].reshape(b, h, w)

    def forward_with_indices(self, x: torch.Tensor):
        """``(xrec, codebook_loss, indices)`` -- same as ``forward(x, return_pred_indices=True)``."""
        return self(x, return_pred_indices=True)

    # ---- Gumbel temperature ----------------------------------------------------------
    def update_temperature(self, global_step: int) -> Optional[float]:
        """GumbelVQ's ``temperature_scheduling``: set the Gumbel temperature for ``global_step``.

        Returns the temperature (None for other variants).  The trainer calls it before each
        generator step, as upstream's training_step does.
        """
        if self.variant != "Gumbel":
            return None
        if self.temperature_scheduler is not None:
            self.quantize.temperature = float(self.temperature_scheduler(int(global_step)))
        return float(self.quantize.temperature)


# --------------------------------------------------------------------------------------
# Config -> model.

def _near(key: str, choices) -> str:
    near = difflib.get_close_matches(key, list(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


def _check_args(variant: str, args: Dict[str, Any]) -> None:
    accepted = ACCEPTED_ARGS[variant]
    unknown = [k for k in args if k not in accepted and k not in _PASSED_THROUGH]
    if unknown:
        other = [v for v in VARIANTS if all(k in ACCEPTED_ARGS[v] for k in unknown)]
        where = f" ({', '.join(other)} take{'s' if len(other) == 1 else ''} {'it' if len(unknown) == 1 else 'them'})" if other else ""
        details = "; ".join(f"{k!r}{_near(k, accepted)}" for k in unknown)
        raise UserError(f"model_args for TamingVQGAN variant {variant}: unknown argument(s) {details}{where}. "
                        f"Accepted: {', '.join(accepted)}. Remove or rename them.")
    missing = [k for k in REQUIRED_ARGS if args.get(k) is None]
    if missing:
        raise UserError(f"model_args for TamingVQGAN: missing {', '.join(missing)}; "
                        "add them (the sizes the checkpoint or the experiment uses)")
    dd = args["ddconfig"]
    if not isinstance(dd, dict):
        raise UserError("model_args.ddconfig must be a mapping of Encoder/Decoder arguments (ch, ch_mult, ...)")
    missing_dd = [k for k in REQUIRED_DDCONFIG if k not in dd]
    if missing_dd:
        raise UserError(f"model_args.ddconfig: missing {', '.join(missing_dd)}; "
                        "add them as in taming's configs (e.g. configs/faceshq_vqgan.yaml)")
    try:
        widths = sorted({int(dd["ch"]) * int(m) for m in [1, *dd["ch_mult"]]})
    except (TypeError, ValueError):
        raise UserError("model_args.ddconfig: ch must be an integer and ch_mult a list of integers") from None
    odd = [w for w in widths if w % 32]
    if odd:
        # taming's Normalize is GroupNorm(32 groups): every feature width must divide by 32.
        raise UserError(f"model_args.ddconfig: channel widths {odd} (ch x ch_mult) are not multiples of 32, "
                        "which taming's GroupNorm(32) needs; use ch: 32, 64, 128, ...")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in ATTN_TYPES:
        raise UserError(f"model_args.ddconfig.attn_type: {attn_type!r} is not one of {', '.join(ATTN_TYPES)}")
    for key in ("n_embed", "embed_dim"):
        if not isinstance(args[key], int) or isinstance(args[key], bool) or args[key] <= 0:
            raise UserError(f"model_args.{key} must be a positive integer, got {args[key]!r}")
    if dd.get("double_z", True):
        # A VQ model's quant_conv takes z_channels; double_z doubles the encoder output.
        raise UserError("model_args.ddconfig.double_z is true (the Encoder default), but a VQ model "
                        "needs z_channels encoder outputs: set double_z: false as taming's VQGAN configs do")
    if variant == "Gumbel" and int(args["embed_dim"]) != int(dd["z_channels"]):
        raise UserError(f"Gumbel: embed_dim ({args['embed_dim']}) must equal ddconfig.z_channels "
                        f"({dd['z_channels']}): upstream GumbelVQ passes quant_conv's embed_dim channels to a "
                        "quantizer built for z_channels inputs. Set both to the same value.")
    if args.get("use_ema"):
        raise UserError("model_args.use_ema: latent-diffusion's weight EMA (model_ema.*) is not supported; "
                        "set use_ema: false")
    remap = args.get("remap")
    if remap is not None and not os.path.isfile(str(remap)):
        raise UserError(f"model_args.remap: file not found: {remap}; give the .npy file of used code "
                        "indices or remove remap")


def _build_temperature_scheduler(config):
    """Instantiate ``temperature_scheduler_config`` (only taming's own ``lr_scheduler`` classes)."""
    if config is None:
        return None
    from adapters.registry import canonical_loss_target

    if not isinstance(config, dict) or "target" not in config:
        raise UserError("model_args.temperature_scheduler_config must be {target: ..., params: {...}}")
    target, _ = canonical_loss_target(str(config["target"]))
    module_name, _, cls_name = target.rpartition(".")
    if module_name != "taming.lr_scheduler":
        raise UserError(f"model_args.temperature_scheduler_config.target {config['target']!r}: only "
                        "taming.lr_scheduler classes are supported (e.g. "
                        "taming.lr_scheduler.LambdaWarmUpCosineScheduler)")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if cls is None:
        raise UserError(f"model_args.temperature_scheduler_config.target: taming.lr_scheduler has no {cls_name!r}")
    try:
        return cls(**dict(config.get("params") or {}))
    except TypeError as exc:
        raise UserError(f"model_args.temperature_scheduler_config.params: {exc}") from None


def _config_parts(cfg) -> Tuple[str, Dict[str, Any]]:
    from adapters.registry import RegistryError, get_model_type, resolve_variant
    from train.schema import as_dict

    args = as_dict(cfg.model_args) if cfg.model_args is not None else {}
    variant = cfg.model_variant or args.get("model_variant") or "VQ"
    try:
        variant = resolve_variant(get_model_type("TamingVQGAN"), variant)
    except RegistryError as exc:
        raise UserError(str(exc)) from None
    return variant, args


def build_taming_vqgan(cfg) -> TamingVQGAN:
    """Build the TamingVQGAN that ``cfg`` (``ExperimentConfig`` or its DictConfig) describes.

    ``model_args.ckpt_path`` loads weights (Lightning ``.ckpt``, plain state dict or
    ``.safetensors``): ``loss.*`` entries are dropped (they belong to the loss), keys under
    ``ignore_keys`` prefixes are skipped and keep their initial values, everything else must
    match exactly (:func:`adapters.weights.load_model_weights`).  Upstream's EMAVQ silently
    ignored ``ckpt_path``; here every variant honours it.
    """
    variant, args = _config_parts(cfg)
    _check_args(variant, args)
    ddconfig = dict(args["ddconfig"])
    model = TamingVQGAN(
        variant, ddconfig, int(args["n_embed"]), int(args["embed_dim"]),
        remap=args.get("remap"),
        sane_index_shape=bool(args.get("sane_index_shape", False)),
        beta=float(args.get("beta", DEFAULT_BETA)),
        decay=float(args.get("decay", DEFAULT_DECAY)),
        eps=float(args.get("eps", DEFAULT_EPS)),
        kl_weight=float(args.get("kl_weight", DEFAULT_KL_WEIGHT)),
        temp_init=float(args.get("temp_init", DEFAULT_TEMP_INIT)),
        straight_through=bool(args.get("straight_through", True)),
        temperature_scheduler=_build_temperature_scheduler(args.get("temperature_scheduler_config")),
        colorize_nlabels=args.get("colorize_nlabels"),
    )
    if args.get("ckpt_path"):
        ignore_keys = args.get("ignore_keys") or ()
        if isinstance(ignore_keys, str):  # one prefix written without a list
            ignore_keys = [ignore_keys]
        load_taming_checkpoint(model, str(args["ckpt_path"]), ignore_keys=ignore_keys)
    return model


def load_taming_checkpoint(model: nn.Module, path: str, ignore_keys=()) -> None:
    """Load an upstream or own checkpoint into ``model`` (``loss.*`` and ``ignore_keys`` dropped)."""
    ignore = tuple(str(k) for k in ignore_keys)
    state_dict = strip_wrapper_prefixes(load_checkpoint_state_dict(path))
    state_dict = drop_prefixes(state_dict, ("loss.",) + ignore)
    load_model_weights(model, state_dict, strict=True, source=path, allow_missing=ignore)
