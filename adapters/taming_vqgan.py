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
``attn_type`` ("vanilla" | "vanilla-xformers" | "linear" | "none") and ``use_linear_attn``
(latent-diffusion, e.g. the ``vq-f4-noattn`` first stage), ``tanh_out`` and ``give_pre_end``.

Softmax attention ("vanilla", and latent-diffusion's "vanilla-xformers", whose
``MemoryEfficientAttnBlock`` has the same weights) is computed by default with
``torch.nn.functional.scaled_dot_product_attention`` (:class:`SDPAAttnBlock`: same state
dict as taming's ``AttnBlock``, same outputs within float rounding, without the
(positions x positions) score matrix on the fused kernels); ``model_args.attn_impl: vanilla``
keeps upstream's ``AttnBlock`` and its explicit ``bmm``/``softmax``.

Usage::

    from train.schema import make_config
    from adapters import build_model
    model = build_model(make_config(model_type="TamingVQGAN", model_variant="EMAVQ",
                                    model_args=dict(n_embed=1024, embed_dim=256, ddconfig={...})))
    xrec, qloss, (indices,) = model(x, return_codes=True)
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from adapters.contract import Tokenizer, encode_in_chunks, straight_through
from adapters.ema_quantizer import EMAVectorQuantizer
from adapters.vq_lookup import LookupQuantizer
from adapters.registry import (IMAGE_CHANNELS, MAX_BLOCKS, MAX_CODES, MAX_IMAGE_SIZE, MAX_WIDTH, LossFamilySpec,
                               RegistryError, VariantSpec, canonical_loss_target, check_model_args, file_findings,
                               get_model_type, int_findings, number_findings, register_model_type,
                               resolve_variant)
from adapters.weights import (drop_prefixes, load_checkpoint_state_dict, load_model_weights,
                              strip_wrapper_prefixes)
from train.errors import (DELETE, ERROR, WARNING, Finding, UserError, coerce_like, is_int, raise_for_errors,
                          type_finding)
from train.schema import DataSection, as_dict

VARIANTS = ("VQ", "EMAVQ", "Gumbel", "NoDisc")

# Constructor arguments each upstream class takes (plus ``beta``/``decay``/``eps``, which
# upstream hard-codes).  Arguments that only steer Lightning training (image_key, monitor,
# scheduler_config, ...) are accepted and ignored by the model.
_COMMON = ("ddconfig", "lossconfig", "n_embed", "embed_dim", "ckpt_path", "ignore_keys", "image_key",
           "colorize_nlabels",
           # this tool's own: which kernel computes softmax attention (see SDPAAttnBlock)
           "attn_impl",
           # lookup opt-ins for VectorQuantizer2 (adapters/vq_lookup.py); VQ / NoDisc only
           "codebook_l2_norm", "codebook_embed_dim")
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
# ddconfig sizes that must be positive integers (ch_mult and attn_resolutions are lists).
DDCONFIG_INT_KEYS = ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels")
ATTN_TYPES = ("vanilla", "vanilla-xformers", "linear", "none")
# model_args.attn_impl: the kernel of softmax attention ("vanilla" is upstream's AttnBlock).
ATTN_IMPLS = ("sdpa", "vanilla")
DEFAULT_ATTN_IMPL = "sdpa"
# Variants whose quantizer is taming's VectorQuantizer2: the only ones the lookup opt-ins
# (model_args.codebook_l2_norm, model_args.codebook_embed_dim) apply to.
LOOKUP_VARIANTS = ("VQ", "NoDisc")
LOOKUP_ARGS = ("codebook_l2_norm", "codebook_embed_dim")

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


class SDPAAttnBlock(nn.Module):
    """taming's ``AttnBlock`` computed with ``torch.nn.functional.scaled_dot_product_attention``.

    The algorithm is upstream's, ``taming.modules.diffusionmodules.model.AttnBlock.forward``
    (Esser et al. 2021, after the DDPM code of Ho et al. 2020): GroupNorm, 1x1-conv q, k, v
    over the h*w positions with one head of ``c`` channels, scores scaled by
    ``int(c) ** -0.5`` and softmaxed over the keys, values weighted by them, 1x1-conv
    ``proj_out`` and the residual ``x + h``.  Only the middle (scores, softmax, weighted
    sum) is handed to SDPA, with the same scale passed explicitly; latent-diffusion's
    ``MemoryEfficientAttnBlock`` (``attn_type: vanilla-xformers``) does the same with
    xformers.  The submodules are the upstream block's own (:meth:`from_block`), so the
    state-dict keys, shapes, order and initial values are exactly upstream's.
    """

    def __init__(self, norm: nn.Module, q: nn.Module, k: nn.Module, v: nn.Module, proj_out: nn.Module,
                 in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = norm
        self.q = q
        self.k = k
        self.v = v
        self.proj_out = proj_out

    @classmethod
    def from_block(cls, block: nn.Module) -> "SDPAAttnBlock":
        """Wrap the submodules (and so the weights) of a taming ``AttnBlock``."""
        return cls(block.norm, block.q, block.k, block.v, block.proj_out, block.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        # (b, c, h, w) -> (b, 1 head, h*w positions, c channels), contiguous: with a strided
        # last dimension the fused CPU kernel is skipped for the math fallback, which
        # materialises the (h*w)^2 scores this block exists to avoid.
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=int(c) ** (-0.5))
        h_ = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(h_)


def _replace_attention(net: nn.Module, attn_type: str, attn_impl: str = DEFAULT_ATTN_IMPL) -> None:
    """Swap taming's AttnBlocks for latent-diffusion's ``attn_type`` choice and, for softmax
    attention ("vanilla" / "vanilla-xformers"), the kernel ``attn_impl`` names."""
    if attn_type in ("vanilla", "vanilla-xformers") and attn_impl == "vanilla":
        return

    def make(block: nn.Module) -> nn.Module:
        if attn_type == "none":
            return nn.Identity()
        if attn_type == "linear":
            return LinAttnBlock(block.in_channels)
        return SDPAAttnBlock.from_block(block)

    for level in list(getattr(net, "down", [])) + list(getattr(net, "up", [])):
        for i, block in enumerate(level.attn):
            level.attn[i] = make(block)
    net.mid.attn_1 = make(net.mid.attn_1)


def _quiet_build(cls, **kwargs):
    # taming's Decoder prints the latent shape on construction; keep the CLI output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return cls(**kwargs)


def build_encoder_decoder(ddconfig: Dict[str, Any],
                          attn_impl: str = DEFAULT_ATTN_IMPL) -> Tuple[nn.Module, nn.Module]:
    """taming ``Encoder``/``Decoder`` for ``ddconfig``, with latent-diffusion's attention
    options; softmax attention runs on ``attn_impl``'s kernel ("sdpa" or "vanilla")."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    cfg = dict(ddconfig)
    attn_type = "linear" if cfg.pop("use_linear_attn", False) else cfg.pop("attn_type", "vanilla")
    cfg.pop("attn_type", None)
    cfg.pop("tanh_out", None)
    encoder = _quiet_build(Encoder, **cfg)
    decoder = _quiet_build(Decoder, **cfg)
    _replace_attention(encoder, attn_type, attn_impl)
    _replace_attention(decoder, attn_type, attn_impl)
    return encoder, decoder


# --------------------------------------------------------------------------------------
# The model.

class TamingVQGAN(Tokenizer):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (taming's VQModel).

    ``forward(x)`` returns ``(xrec, codebook_loss)``; ``forward(x, return_codes=True)``
    returns ``(xrec, codebook_loss, (indices,))`` with ``indices`` a (B, h, w) LongTensor of
    the codes used for this batch (after ``remap``: the model contract,
    ``adapters/contract.py``).  ``return_pred_indices=True`` is latent-diffusion's spelling
    and returns ``indices`` bare.
    Call it through the (possibly DDP-wrapped) model, not via ``.module``, so DDP sees the
    forward.  The adapter keeps no per-batch state of its own (taming's Decoder does record
    ``last_z_shape``).
    """

    def __init__(self, variant: str, ddconfig: Dict[str, Any], n_embed: int, embed_dim: int, *,
                 remap: Optional[str] = None, sane_index_shape: bool = False, beta: float = DEFAULT_BETA,
                 decay: float = DEFAULT_DECAY, eps: float = DEFAULT_EPS, kl_weight: float = DEFAULT_KL_WEIGHT,
                 temp_init: float = DEFAULT_TEMP_INIT, straight_through: bool = True, temperature_scheduler=None,
                 colorize_nlabels: Optional[int] = None, attn_impl: str = DEFAULT_ATTN_IMPL,
                 codebook_l2_norm: bool = False, codebook_embed_dim: Optional[int] = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown TamingVQGAN variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.n_embed = int(n_embed)
        self.embed_dim = int(embed_dim)
        self.tanh_out = bool(ddconfig.get("tanh_out", False))
        self.give_pre_end = bool(ddconfig.get("give_pre_end", False))
        z_channels = int(ddconfig["z_channels"])

        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
        self.encoder, self.decoder = build_encoder_decoder(ddconfig, attn_impl)
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
        elif codebook_l2_norm or (codebook_embed_dim and codebook_embed_dim != embed_dim):
            if variant not in LOOKUP_VARIANTS:
                raise ValueError(f"codebook_l2_norm / codebook_embed_dim need a VectorQuantizer2 variant "
                                 f"({', '.join(LOOKUP_VARIANTS)}), not {variant}")
            self.quantize = LookupQuantizer(n_embed, embed_dim, beta, l2_norm=codebook_l2_norm,
                                            lookup_dim=codebook_embed_dim, remap=remap,
                                            sane_index_shape=sane_index_shape)
        else:
            from taming.modules.vqvae.quantize import VectorQuantizer2

            self.quantize = _quiet_build(VectorQuantizer2, n_e=n_embed, e_dim=embed_dim, beta=beta,
                                         remap=remap, sane_index_shape=sane_index_shape)
        # taming's own VectorQuantizer2: encode() replaces its rounded straight-through value.
        self._upstream_vq = type(self.quantize).__name__ == "VectorQuantizer2"
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if colorize_nlabels is not None:
            # Upstream keeps this random projection (segmentation maps -> RGB) in the state dict.
            self.register_buffer("colorize", torch.randn(3, int(colorize_nlabels), 1, 1))
        self.temperature_scheduler = temperature_scheduler

    # ---- the contract ------------------------------------------------------------------
    codebook_names = ("codebook",)

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

    def codebook_vectors(self, images: torch.Tensor, batch_size: int = 16) -> Tuple[torch.Tensor]:
        """Encoder outputs of ``images`` where codes are looked up: ``quant_conv``'s output,
        projected down and l2-normalised as the lookup does (``adapters/vq_lookup.py``)."""
        if self.variant == "Gumbel":
            raise UserError("TamingVQGAN Gumbel samples its codes from logits, it has no code vectors to start or "
                            "restart from encoder outputs; set train.init_codebook_kmeans_iters=0 and "
                            "train.dead_code_threshold=null (or use model_variant VQ or EMAVQ)")

        def lookup_space(x):
            flat = self.encode_to_prequant(x).permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()
            return self.quantize._to_lookup(flat) if isinstance(self.quantize, LookupQuantizer) else flat
        return (torch.cat(encode_in_chunks(self, lookup_space, images, batch_size)),)

    @torch.no_grad()
    def set_codes(self, index: int, ids: torch.Tensor, vectors: torch.Tensor) -> List[torch.Tensor]:
        """Codes ``ids`` become ``vectors``; EMAVQ: their ``embed_avg`` too and a count of 1."""
        emb = self.quantize.embedding
        vectors = vectors.to(emb.weight)
        emb.weight.data[ids] = vectors
        if not self.uses_ema_codebook:
            return [emb.weight.data]
        emb.embed_avg[ids] = vectors
        emb.cluster_size[ids] = 1.0
        return [emb.weight, emb.embed_avg, emb.cluster_size]

    # ---- taming's API ------------------------------------------------------------------
    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor):
        """``(quant, codebook_loss, (perplexity, min_encodings, indices))`` as taming's encode.

        With taming's own ``VectorQuantizer2`` (VQ / NoDisc, no ``remap``) ``quant`` is the
        codebook entry of ``indices`` exactly (``adapters.contract.straight_through``), where
        upstream's ``z + (z_q - z).detach()`` rounds it: the lookup and the loss stay
        upstream's, the codebook gather is repeated here.  With ``remap`` the returned
        indices are renumbered and cannot name the entry, so upstream's value is kept.
        """
        z = self.encode_to_prequant(x)
        quant, loss, info = self.quantize(z)
        if self._upstream_vq and self.quantize.remap is None:
            b, _, h, w = z.shape
            entry = self.quantize.get_codebook_entry(info[2].reshape(-1), (b, h, w, self.embed_dim))
            quant = straight_through(z, entry)
        return quant, loss, info

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        dec = self.decoder(self.post_quant_conv(quant))
        if self.tanh_out and not self.give_pre_end:
            dec = torch.tanh(dec)
        return dec

    def encode_code(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        """``(indices,)``, a (B, h, w) LongTensor, without running the decoder (the contract).

        VQ / EMAVQ / NoDisc: the quantizer's nearest codes, exactly ``forward``'s.  Gumbel:
        taming's ``GumbelQuantize`` draws Gumbel noise even in eval mode (``hard=True``, then
        the argmax of the noisy one-hot), so ``forward``'s codes are a sample; here the code
        is the argmax of the logits (the most likely code, the noise-free limit), so
        encoding is deterministic.  With ``remap`` the indices are the remapped ones, as
        ``forward`` returns them.  Call it in eval mode (EMAVQ's codebook moves in training).
        """
        z = self.encode_to_prequant(x)
        b, _, h, w = z.shape
        if self.variant != "Gumbel":
            return (self.quantize(z)[2][2].reshape(b, h, w),)
        q = self.quantize
        logits = q.proj(z)
        if q.remap is None:
            return (logits.argmax(1),)
        # Upstream's remapped path: the argmax over the used codes, its full index, back to
        # the remapped numbering (remap_to_used).
        full = q.used.to(z.device)[logits[:, q.used, ...].argmax(1)]
        return (q.remap_to_used(full).reshape(b, h, w),)

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Decode a (B, h, w) tensor of code indices (upstream's ``embed_code`` never existed)."""
        if code_b.dim() != 3:
            raise ValueError(f"decode_code expects (batch, height, width) indices, got shape {tuple(code_b.shape)}")
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, x: torch.Tensor, return_codes: bool = False, return_pred_indices: bool = False):
        quant, qloss, info = self.encode(x)
        dec = self.decode(quant)
        if not (return_codes or return_pred_indices):
            return dec, qloss
        b, _, h, w = quant.shape
        indices = info[2].reshape(b, h, w)
        return dec, qloss, ((indices,) if return_codes else indices)

    # ---- Gumbel temperature ----------------------------------------------------------
    def before_step(self, global_step: int) -> Dict[str, float]:
        """The contract's per-step hook: GumbelVQ's temperature schedule (logged)."""
        temperature = self.update_temperature(global_step)
        return {} if temperature is None else {"train/gumbel_temperature": temperature}

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
# Rules: what a TamingVQGAN config must satisfy.  ``validate`` reports them as findings and
# the builder refuses to build when any of them is an error (one rule set, two callers).

def accepted_args(variant: Optional[str]) -> Tuple[List[str], bool]:
    """model_args names of ``variant`` (every variant's names when None); strict."""
    tables = [ACCEPTED_ARGS.get(variant, ())] if variant else list(ACCEPTED_ARGS.values())
    return sorted({a for table in tables for a in table}) + list(_PASSED_THROUGH), True


def taming_rules(data: Dict[str, Any], variant: Optional[str], out: List[Finding]) -> None:
    """Findings about ``model_args`` (and the discriminator's input width) of a TamingVQGAN."""
    args = data.get("model_args") or {}
    if not isinstance(args, dict):
        return
    for key in REQUIRED_ARGS:
        if args.get(key) is None:
            out.append(Finding(ERROR, f"model_args.{key}", "missing_model_arg",
                               f"missing {key}: TamingVQGAN needs model_args.{key}", f"add model_args.{key}"))
    for key in ("n_embed", "embed_dim"):
        if args.get(key) is not None and (not is_int(args[key]) or args[key] <= 0):
            fixed = coerce_like(args[key], 1)
            out.append(Finding(ERROR, f"model_args.{key}", "bad_type" if not is_int(args[key]) else "bad_value",
                               f"model_args.{key} is {args[key]!r}; expected a positive integer",
                               f"write {key}: {fixed}" if fixed and fixed > 0 else "write a positive integer",
                               [(f"model_args.{key}", fixed)] if fixed and fixed > 0 else []))
    if args.get("use_ema"):
        out.append(Finding(ERROR, "model_args.use_ema", "unsupported_model_arg",
                           "use_ema: latent-diffusion's weight EMA (model_ema.*) is not supported",
                           "set use_ema: false", [("model_args.use_ema", False)]))
    remap = args.get("remap")
    if remap is not None and not os.path.isfile(str(remap)):
        out.append(Finding(ERROR, "model_args.remap", "file_not_found",
                           f"remap: file not found: {remap}",
                           "give the .npy file of used code indices or remove remap"))
    _argument_value_rules(args, out)
    _lookup_rules(args, variant, out)
    dd = args.get("ddconfig")
    if dd is None:
        return
    if not isinstance(dd, dict):
        out.append(Finding(ERROR, "model_args.ddconfig", "bad_type", "ddconfig must be a mapping",
                           "write ddconfig as key: value pairs of Encoder/Decoder arguments (ch, ch_mult, ...)"))
        return
    for key in DDCONFIG_INT_KEYS:
        path = f"model_args.ddconfig.{key}"
        if key not in dd:
            out.append(Finding(ERROR, path, "missing_model_arg", f"ddconfig needs {key}",
                               f"add {path} as in taming's configs"))
            continue
        value = dd[key]
        if not is_int(value):
            type_finding(out, path, value, 1, "an integer")
        elif value <= 0:
            out.append(Finding(ERROR, path, "bad_value", f"{path} is {value}; sizes must be positive",
                               f"set {key} to a positive integer"))
    ch_mult = dd.get("ch_mult")
    if not isinstance(ch_mult, (list, tuple)) or not ch_mult or not all(is_int(m) for m in ch_mult):
        out.append(Finding(ERROR, "model_args.ddconfig.ch_mult", "bad_type",
                           f"ddconfig.ch_mult is {ch_mult!r}; expected a non-empty list of integers",
                           "e.g. ch_mult: [1, 1, 2, 2, 4]"))
        ch_mult = None
    elif any(m <= 0 for m in ch_mult):
        out.append(Finding(ERROR, "model_args.ddconfig.ch_mult", "bad_value", "ch_mult entries must be positive",
                           "use positive channel multipliers"))
    if "attn_resolutions" not in dd:
        out.append(Finding(ERROR, "model_args.ddconfig.attn_resolutions", "missing_model_arg",
                           "ddconfig needs attn_resolutions", "add model_args.ddconfig.attn_resolutions "
                           "(e.g. [16]; [] for none)"))
    if ch_mult and is_int(dd.get("ch")) and dd["ch"] > 0:
        widths = sorted({dd["ch"] * m for m in [1, *ch_mult] if is_int(m)})
        odd = [w for w in widths if w % 32]
        if odd:
            # taming's Normalize is GroupNorm(32 groups): every feature width must divide by 32.
            out.append(Finding(ERROR, "model_args.ddconfig.ch", "groupnorm_width",
                               f"channel widths {odd} (ch x ch_mult) are not multiples of 32, which taming's "
                               "GroupNorm(32 groups) needs", "use ch: 32, 64, 128, ..."))
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in ATTN_TYPES:
        out.append(Finding(ERROR, "model_args.ddconfig.attn_type", "bad_value",
                           f"attn_type: {attn_type!r} is not one of {', '.join(ATTN_TYPES)}",
                           f"use one of {', '.join(ATTN_TYPES)}"))
    if variant == "Gumbel" and is_int(args.get("embed_dim")) and is_int(dd.get("z_channels")) \
            and args["embed_dim"] != dd["z_channels"]:
        out.append(Finding(ERROR, "model_args.embed_dim", "gumbel_embed_dim",
                           f"Gumbel: embed_dim ({args['embed_dim']}) must equal ddconfig.z_channels "
                           f"({dd['z_channels']}): upstream GumbelQuantize is built for z_channels inputs",
                           f"set embed_dim: {dd['z_channels']}", [("model_args.embed_dim", dd["z_channels"])]))
    if dd.get("double_z", True) is not False:
        # taming's Encoder defaults to double_z=True (for KL autoencoders); a VQ model's
        # quant_conv takes z_channels inputs.
        said = "double_z: true doubles" if "double_z" in dd else "double_z is not given, and taming's default (true) doubles"
        out.append(Finding(ERROR, "model_args.ddconfig.double_z", "double_z_on_vq",
                           f"{said} the encoder's output channels (for KL autoencoders); a VQ model's "
                           "quant_conv expects z_channels and would fail",
                           "set double_z: false", [("model_args.ddconfig.double_z", False)]))
    resolution = dd.get("resolution")
    attn = dd.get("attn_resolutions", [])
    if ch_mult and is_int(resolution) and resolution > 0 and isinstance(attn, (list, tuple)):
        levels = [resolution // (2 ** i) for i in range(len(ch_mult))]
        unreachable = [a for a in attn if a not in levels]
        if unreachable:
            keep = [a for a in attn if a in levels]
            out.append(Finding(WARNING, "model_args.ddconfig.attn_resolutions", "attn_unreachable",
                               f"attn_resolutions {unreachable} are never reached (levels: {levels}); "
                               "no attention is built there",
                               f"use resolutions from {levels}, e.g. attn_resolutions: {keep or [levels[-1]]}",
                               [("model_args.ddconfig.attn_resolutions", keep or [levels[-1]])]))
        if resolution % (2 ** (len(ch_mult) - 1)):
            out.append(Finding(ERROR, "model_args.ddconfig.resolution", "bad_value",
                               f"resolution {resolution} is not divisible by the total downsampling "
                               f"{2 ** (len(ch_mult) - 1)}", "use a multiple of it"))
    _size_rules(args, dd, ch_mult, data, out)
    _crop_attention_rule(dd, ch_mult, data, out)
    params = (data.get("lossconfig") or {}).get("params") or {}
    if isinstance(params, dict) and "disc_in_channels" in params and is_int(dd.get("out_ch")):
        if params["disc_in_channels"] != dd["out_ch"]:
            out.append(Finding(ERROR, "lossconfig.params.disc_in_channels", "disc_channels_mismatch",
                               f"disc_in_channels {params['disc_in_channels']} differs from the model's out_ch "
                               f"{dd['out_ch']}: the discriminator could not read the reconstructions",
                               f"set disc_in_channels: {dd['out_ch']}",
                               [("lossconfig.params.disc_in_channels", dd["out_ch"])]))


def _argument_value_rules(args: Dict[str, Any], out: List[Finding]) -> None:
    """Values the builder converts (``float(beta)``, ``int(colorize_nlabels)``) or hands to
    upstream modules: wrong types would stop ``fit`` with a traceback."""
    for key in ("beta", "kl_weight", "temp_init"):
        if key in args:
            number_findings(out, f"model_args.{key}", args[key], 0.0, 1e6, key)
    if "decay" in args:
        number_findings(out, "model_args.decay", args["decay"], 0.0, 1.0, "the EMA decay", high_open=True)
    if "eps" in args:
        number_findings(out, "model_args.eps", args["eps"], 0.0, 1.0, "the EMA smoothing eps")
    if args.get("colorize_nlabels") is not None:
        int_findings(out, "model_args.colorize_nlabels", args["colorize_nlabels"], 1, 4096, "label count")
    for key in ("sane_index_shape", "straight_through"):
        if key in args and not isinstance(args[key], bool):
            out.append(Finding(ERROR, f"model_args.{key}", "bad_type",
                               f"model_args.{key} is {args[key]!r}; expected true or false", "write true or false"))
    if args.get("remap") is not None and not isinstance(args["remap"], str):
        out.append(Finding(ERROR, "model_args.remap", "bad_type", f"model_args.remap is {args['remap']!r}; "
                           "expected the path of a .npy file", "write the path, or remove remap"))
    file_findings(out, "model_args.ckpt_path", args.get("ckpt_path"), "a checkpoint to load")
    impl = args.get("attn_impl")
    if impl is not None and impl not in ATTN_IMPLS:   # None (an empty YAML value): the default
        near = str(impl).strip().lower() if isinstance(impl, str) else None
        out.append(Finding(ERROR, "model_args.attn_impl", "bad_value",
                           f"attn_impl: {impl!r} is not one of {', '.join(ATTN_IMPLS)}",
                           f"write attn_impl: {near}" if near in ATTN_IMPLS else
                           "use sdpa (torch's scaled_dot_product_attention, the default) or vanilla "
                           "(upstream's AttnBlock)",
                           [("model_args.attn_impl", near)] if near in ATTN_IMPLS else []))
    keys = args.get("ignore_keys")
    if keys is not None and not isinstance(keys, str) and not (
            isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        out.append(Finding(ERROR, "model_args.ignore_keys", "bad_type",
                           f"model_args.ignore_keys is {keys!r}; expected a list of state-dict key prefixes",
                           "write e.g. ignore_keys: [loss.discriminator]"))
    if args.get("temperature_scheduler_config") is not None:
        try:
            scheduler = _build_temperature_scheduler(args["temperature_scheduler_config"])
            float(scheduler(0))
        except UserError as exc:
            out.append(Finding(ERROR, "model_args.temperature_scheduler_config", "bad_value", str(exc),
                               "give {target: taming.lr_scheduler.<class>, params: {...}} with that class's "
                               "arguments, or remove it"))
        except Exception as exc:   # the scheduler's own arithmetic on these values
            out.append(Finding(ERROR, "model_args.temperature_scheduler_config", "bad_value",
                               f"model_args.temperature_scheduler_config fails at step 0 "
                               f"({type(exc).__name__}: {exc})", "check its params (numbers, steps)"))


def active_lookup_args(args: Dict[str, Any]) -> List[str]:
    """The lookup opt-ins ``args`` turns on (``codebook_embed_dim`` equal to ``embed_dim``
    projects nothing and is taming's lookup)."""
    on = []
    if args.get("codebook_l2_norm") not in (None, False):
        on.append("codebook_l2_norm")
    dim = args.get("codebook_embed_dim")
    if dim is not None and dim != args.get("embed_dim"):
        on.append("codebook_embed_dim")
    return on


def stock_decoding_problem(data: Dict[str, Any]) -> Optional[str]:
    """Why stock taming would decode a model of this config differently, or None (registry
    field ``stock_incompatible``; ``migrate --export`` refuses such models)."""
    args = data.get("model_args") or {}
    used = active_lookup_args(args) if isinstance(args, dict) else []
    if not used:
        return None
    what = []
    if "codebook_l2_norm" in used:
        what.append("codebook_l2_norm l2-normalises the encoder output and the codes before the lookup "
                    "(taming's VectorQuantizer2 uses them as they are)")
    if "codebook_embed_dim" in used:
        what.append(f"codebook_embed_dim {args['codebook_embed_dim']} looks codes up in a "
                    "projected space (quantize.proj_down / proj_up, which taming does not have)")
    return "; ".join(what)


def _lookup_rules(args: Dict[str, Any], variant: Optional[str], out: List[Finding]) -> None:
    """``codebook_l2_norm`` / ``codebook_embed_dim`` (``adapters/vq_lookup.py``): a bool and an
    integer in [1, embed_dim], for the variants whose quantizer is VectorQuantizer2."""
    l2 = args.get("codebook_l2_norm")
    if l2 is not None and not isinstance(l2, bool):
        fixed = {"true": True, "false": False, "1": True, "0": False}.get(str(l2).strip().lower())
        out.append(Finding(ERROR, "model_args.codebook_l2_norm", "bad_type",
                           f"model_args.codebook_l2_norm is {l2!r}; expected true or false",
                           f"write codebook_l2_norm: {str(fixed).lower()}" if fixed is not None
                           else "write true (l2-normalised lookup) or false (taming's lookup)",
                           [("model_args.codebook_l2_norm", fixed)] if fixed is not None else []))
    dim = args.get("codebook_embed_dim")
    embed_dim = args.get("embed_dim")
    if dim is not None:
        high = embed_dim if is_int(embed_dim) and 0 < embed_dim <= MAX_WIDTH else MAX_WIDTH
        int_findings(out, "model_args.codebook_embed_dim", dim, 1, high,
                     f"the lookup width (at most embed_dim {high}: it is a projection down)"
                     if high == embed_dim else "the lookup width")
    used = active_lookup_args(args)
    if used and variant is not None and variant not in LOOKUP_VARIANTS:
        quantizer = {"EMAVQ": "an EMA codebook (adapters/ema_quantizer.py)",
                     "Gumbel": "GumbelQuantize"}.get(variant, "another quantizer")
        out.append(Finding(ERROR, f"model_args.{used[0]}", "lookup_needs_vq2",
                           f"{' and '.join(used)} change VectorQuantizer2's lookup, but TamingVQGAN {variant} uses "
                           f"{quantizer}: only TamingVQGAN variants {' and '.join(LOOKUP_VARIANTS)} "
                           "(taming's VectorQuantizer2) can use them",
                           f"set model_variant: VQ, or remove {' and '.join(used)}",
                           [(f"model_args.{k}", DELETE) for k in used]))


def _size_rules(args: Dict[str, Any], dd: Dict[str, Any], ch_mult, data: Dict[str, Any],
                out: List[Finding]) -> None:
    """Sizes fit could not allocate, channels the RGB data cannot feed, crops the
    down-sampling cannot divide."""
    if is_int(args.get("n_embed")) and args["n_embed"] > 0:
        int_findings(out, "model_args.n_embed", args["n_embed"], 1, MAX_CODES, "the codebook size")
    if is_int(args.get("embed_dim")) and args["embed_dim"] > 0:
        int_findings(out, "model_args.embed_dim", args["embed_dim"], 1, MAX_WIDTH, "the code width")
    for key, high in (("z_channels", MAX_WIDTH), ("num_res_blocks", MAX_BLOCKS), ("resolution", MAX_IMAGE_SIZE)):
        if is_int(dd.get(key)) and dd[key] > 0:
            int_findings(out, f"model_args.ddconfig.{key}", dd[key], 1, high, key)
    if ch_mult and len(ch_mult) > 12:
        out.append(Finding(ERROR, "model_args.ddconfig.ch_mult", "too_large",
                           f"ddconfig.ch_mult has {len(ch_mult)} levels; each halves the image, 12 at most",
                           "use e.g. ch_mult: [1, 1, 2, 2, 4]"))
        ch_mult = None
    if ch_mult and is_int(dd.get("ch")) and dd["ch"] > 0 and all(m > 0 for m in ch_mult):
        widest = dd["ch"] * max(ch_mult)
        if widest > MAX_WIDTH:
            out.append(Finding(ERROR, "model_args.ddconfig.ch", "too_large",
                               f"the widest layer (ch {dd['ch']} x ch_mult {max(ch_mult)} = {widest} channels) is "
                               f"over {MAX_WIDTH}", "use a smaller ch (e.g. 128)"))
    for key in ("in_channels", "out_ch"):
        if is_int(dd.get(key)) and dd[key] > 0 and dd[key] != IMAGE_CHANNELS:
            role = "reads" if key == "in_channels" else "writes"
            out.append(Finding(ERROR, f"model_args.ddconfig.{key}", "channels_mismatch",
                               f"ddconfig.{key} is {dd[key]}: the model {role} {dd[key]}-channel images, but training "
                               f"images are RGB ({IMAGE_CHANNELS} channels)", f"set {key}: {IMAGE_CHANNELS}",
                               [(f"model_args.ddconfig.{key}", IMAGE_CHANNELS)]))
    if "dropout" in dd:
        number_findings(out, "model_args.ddconfig.dropout", dd["dropout"], 0.0, 1.0, "dropout", high_open=True)
    attn = dd.get("attn_resolutions")
    if attn is not None and not (isinstance(attn, list) and all(is_int(a) for a in attn)):
        out.append(Finding(ERROR, "model_args.ddconfig.attn_resolutions", "bad_type",
                           f"ddconfig.attn_resolutions is {attn!r}; expected a list of integers",
                           "write e.g. attn_resolutions: [16] ([] for none)"))
    size = (data.get("data") or {}).get("image_size", DataSection.image_size)
    if ch_mult and is_int(size) and size > 0 and size % (2 ** (len(ch_mult) - 1)):
        factor = 2 ** (len(ch_mult) - 1)
        fixed = max(factor, size // factor * factor)
        out.append(Finding(ERROR, "data.image_size", "crop_not_divisible",
                           f"data.image_size {size} is not divisible by the down-sampling factor {factor} "
                           f"(2 ** (len(ch_mult) - 1)): the reconstruction would not match the input's size",
                           f"use e.g. image_size: {fixed}", [("data.image_size", fixed)]))


# A crop whose mid-block attention covers this many times the positions it covers at
# ddconfig.resolution is "many more" (2x the side); smaller growth is an ordinary choice.
MANY_MORE_POSITIONS = 4


def _crop_attention_rule(dd: Dict[str, Any], ch_mult, data: Dict[str, Any], out: List[Finding]) -> None:
    """A crop size that moves attention: taming builds an attention block at each level whose
    grid at ``ddconfig.resolution`` is in ``attn_resolutions`` (and one in the mid block); at
    another crop size those blocks run on other grids (16x16 attention running at 128x128),
    or the mid block runs over many more positions than at the resolution."""
    resolution = dd.get("resolution")
    attn = dd.get("attn_resolutions", [])
    section = data.get("data")
    size = section.get("image_size", DataSection.image_size) if isinstance(section, dict) else None
    if not (ch_mult and all(is_int(m) and m > 0 for m in ch_mult) and is_int(resolution) and resolution > 0
            and is_int(size) and size > 0 and size != resolution and isinstance(attn, (list, tuple))):
        return
    if dd.get("attn_type", "vanilla") == "none":
        return      # no attention is built
    levels = range(len(ch_mult))
    built = [resolution // 2 ** i for i in levels if resolution // 2 ** i in attn]
    runs = [size // 2 ** i for i in levels if resolution // 2 ** i in attn]
    factor = 2 ** (len(ch_mult) - 1)
    mid_built, mid_runs = (resolution // factor) ** 2, (size // factor) ** 2
    said = []
    if built and runs != built:
        said.append(f"the attention layers built for the {built} grids (attn_resolutions at resolution "
                    f"{resolution}) run on {runs} grids")
    if mid_built and mid_runs >= MANY_MORE_POSITIONS * mid_built:
        said.append(f"the mid-block attention runs over {mid_runs} positions instead of {mid_built}")
    if said:
        out.append(Finding(WARNING, "data.image_size", "crop_moves_attention",
                           f"crops of {size} px differ from ddconfig.resolution {resolution}: " + "; ".join(said),
                           f"set data.image_size: {resolution} to train at the size the model is built for, or "
                           f"set ddconfig.resolution: {size} (and attn_resolutions to the grids you mean)"))


def _build_temperature_scheduler(config):
    """Instantiate ``temperature_scheduler_config`` (only taming's own ``lr_scheduler`` classes)."""
    if config is None:
        return None
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
    args = as_dict(cfg.model_args) if cfg.model_args is not None else {}
    variant = cfg.model_variant or args.get("model_variant") or "VQ"
    try:
        variant = resolve_variant(get_model_type("TamingVQGAN"), variant)
    except RegistryError as exc:
        raise UserError(str(exc)) from None
    return variant, args


def _tiny_config() -> Dict[str, Any]:
    """A 32 px TamingVQGAN EMAVQ small enough for CPU tests (8x8 latent, 32 codes)."""
    ddconfig = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    return {"model_type": "TamingVQGAN", "model_variant": "EMAVQ",
            "model_args": {"n_embed": 32, "embed_dim": 8, "ddconfig": ddconfig},
            "lossconfig": {"target": TAMING_LOSS,
                           "params": {"disc_start": 0, "perceptual_weight": 0.0, "disc_num_layers": 1,
                                      "disc_ndf": 8}},
            "train": {"batch_size": 2, "learning_rate": 1e-4}, "data": {"image_size": 32}}


TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"


@register_model_type(
    "TamingVQGAN",
    description="taming-transformers first-stage VQGAN (Esser et al. 2021)",
    loss=LossFamilySpec("taming", "taming's VQLPIPSWithDiscriminator: L1 + LPIPS + codebook loss + PatchGAN",
                        TAMING_LOSS, aliases=("taming.modules.losses.VQLPIPSWithDiscriminator",)),
    variants={
        "VQ": VariantSpec("VQ", "VectorQuantizer2 codebook trained by gradients",
                          ("taming.models.vqgan.VQModel", "ldm.models.autoencoder.VQModel")),
        "EMAVQ": VariantSpec("EMAVQ", "codebook updated by exponential moving averages",
                             ("taming.models.vqgan.EMAVQ",)),
        "Gumbel": VariantSpec("Gumbel", "Gumbel-softmax quantizer", ("taming.models.vqgan.GumbelVQ",)),
        "NoDisc": VariantSpec("NoDisc", "VQ model trained without a discriminator",
                              ("taming.models.vqgan.VQNoDiscModel",), gan=False),
    },
    default_variant="VQ",
    aliases=("VQGAN", "taming", "taming_vqgan"),
    upstream_classes={
        "VQModel": "VQ", "EMAVQ": "EMAVQ", "GumbelVQ": "Gumbel", "VQNoDiscModel": "NoDisc",
        "taming.models.vqgan.VQModel": "VQ",
        "ldm.models.autoencoder.VQModel": "VQ",
        "ldm.models.autoencoder.VQModelInterface": "VQ",
        "taming.models.vqgan.EMAVQ": "EMAVQ",
        "taming.models.vqgan.GumbelVQ": "Gumbel",
        "taming.models.vqgan.VQNoDiscModel": "NoDisc",
    },
    accepted_args=accepted_args,
    rules=taming_rules,
    stock_incompatible=stock_decoding_problem,
    opt_in_args=LOOKUP_ARGS,
    codebooks=lambda variant: ("codebook",),
    ema_codebook=lambda variant: variant == "EMAVQ",
    vector_codebook=lambda variant: variant != "Gumbel",
    tiny_config=_tiny_config,
)
def build_taming_vqgan(cfg) -> TamingVQGAN:
    """Build the TamingVQGAN that ``cfg`` (``ExperimentConfig`` or its DictConfig) describes.

    The config must pass the same rules ``validate`` runs (:func:`taming_rules` and the
    accepted argument names).  ``model_args.ckpt_path`` loads weights (Lightning ``.ckpt``,
    plain state dict or ``.safetensors``): ``loss.*`` entries are dropped (they belong to
    the loss), keys under ``ignore_keys`` prefixes are skipped and keep their initial
    values, everything else must match exactly (:func:`adapters.weights.load_model_weights`).
    Upstream's EMAVQ silently ignored ``ckpt_path``; here every variant honours it.
    """
    variant, args = _config_parts(cfg)
    findings = check_model_args(get_model_type("TamingVQGAN"), {"model_args": args}, variant)
    raise_for_errors(findings, f"model_args for TamingVQGAN variant {variant}")
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
        attn_impl=args.get("attn_impl") or DEFAULT_ATTN_IMPL,
        codebook_l2_norm=bool(args.get("codebook_l2_norm") or False),
        codebook_embed_dim=int(args["codebook_embed_dim"]) if "codebook_embed_dim" in active_lookup_args(args) else None,
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
