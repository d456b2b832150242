"""VQ-VAE-2: a two-level VQ-VAE with EMA codebooks, weight-compatible with rosinality.

Paper: Razavi, van den Oord, Vinyals, "Generating Diverse High-Fidelity Images with
VQ-VAE-2" (NeurIPS 2019).  Layout: the module names, buffer names and shapes of
``VQVAE`` in rosinality/vq-vae-2-pytorch (``vqvae.py``), the most widely used PyTorch
implementation, so its ``torch.save(model.state_dict())`` checkpoints load strictly:

    enc_b            bottom encoder, stride 4         (B, channel, H/4, W/4)
    enc_t            top encoder, stride 2 on enc_b   (B, channel, H/8, W/8)
    quantize_conv_t  1x1 conv to embed_dim;  quantize_t  EMA codebook (top)
    dec_t            top decoder, stride 2, back to the bottom resolution
    quantize_conv_b  1x1 conv on [dec_t, enc_b];  quantize_b  EMA codebook (bottom)
    upsample_t       transposed conv lifting the top codes to the bottom resolution
    dec              decoder, stride 4, from [upsample_t, quant_b] to the image

The EMA codebook follows the Sonnet ``VectorQuantizerEMA`` algorithm as rosinality ports
it (van den Oord et al. 2017, appendix A.1): codebook ``embed`` is (dim, n_embed),
``cluster_size`` and ``embed_avg`` are exponential moving averages of the code counts
and of the sums of the vectors assigned to each code, and the codebook is their ratio
after Laplace smoothing of the counts (eps 1e-5).  Differences from upstream, all outside
the state dict:

* the per-batch statistics are summed over distributed ranks before the update, so every
  rank keeps the same codebook (adapters.distributed.all_reduce_sum_);
* the ``decay`` constructor argument reaches both codebooks (upstream's ``VQVAE`` accepts
  it but builds its ``Quantize`` modules with their own default 0.99);
* nearest-code search and the EMA update run in float32 even under autocast.

Build it from a config (``model_type: vqvae2``)::

    from train.schema import make_config
    from adapters import build_model
    model = build_model(make_config(model_type="vqvae2", model_args={"channel": 64}))
    xrec, latent_loss = model(images)          # images in [-1, 1], H and W multiples of 8
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from adapters.contract import Tokenizer, encode_in_chunks, straight_through
from adapters.distributed import all_reduce_sum_
from adapters.ema_quantizer import ema_step_, pick_code_vectors
from adapters.registry import (IMAGE_CHANNELS, MAX_BLOCKS, MAX_CODES, MAX_WIDTH, LossFamilySpec, check_model_args,
                               file_findings, get_model_type, register_model_type, variant_findings)
from train.errors import ERROR, Finding, UserError, is_int, is_number, raise_for_errors, type_finding
from train.schema import config_data
from train.safe_load import UnreadableFile, load_weights_file

log = logging.getLogger(__name__)

# rosinality's VQVAE constructor defaults (256 px ImageNet/FFHQ recipe).
DEFAULTS: Dict[str, Any] = {
    "in_channel": 3,      # image channels
    "channel": 128,       # width of encoders and decoders
    "n_res_block": 2,     # residual blocks per encoder / decoder
    "n_res_channel": 32,  # hidden width inside a residual block
    "embed_dim": 64,      # code vector size of both codebooks
    "n_embed": 512,       # codes per codebook (top and bottom each)
    "decay": 0.99,        # EMA decay of the codebook statistics
}
EPS = 1e-5                # Laplace smoothing of the EMA code counts (rosinality, Sonnet)


# --------------------------------------------------------------------------------------
# Building blocks


class Quantize(nn.Module):
    """EMA vector quantizer over the last dimension of its input (channels-last).

    Buffers, as rosinality names them: ``embed`` (dim, n_embed) -- one code per column;
    ``cluster_size`` (n_embed,) -- EMA of code counts; ``embed_avg`` (dim, n_embed) --
    EMA of summed assigned vectors.  None of them is a parameter: no optimizer sees them.
    """

    def __init__(self, dim: int, n_embed: int, decay: float = 0.99, eps: float = EPS):
        super().__init__()
        self.dim = dim
        self.n_embed = n_embed
        self.decay = decay
        self.eps = eps
        codes = torch.randn(dim, n_embed)
        self.register_buffer("embed", codes)
        self.register_buffer("cluster_size", torch.ones(n_embed))
        self.register_buffer("embed_avg", codes.clone())

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` (..., dim) -> (straight-through quantized z, commitment MSE, code ids (...))."""
        # Distances in float32 even under autocast: bf16 ties pick the wrong code.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.reshape(-1, self.dim).float()
            dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed
                    + self.embed.pow(2).sum(0, keepdim=True))
            ids = dist.argmin(1)
            # The output uses the codebook as it was before this batch's update (upstream).
            quant = self.embed_code(ids).view(*z.shape[:-1], self.dim)
            if self.training:
                self._ema_update(flat, ids)
            commit = (quant.detach() - z.float()).pow(2).mean()
        quant = straight_through(z, quant)
        return quant, commit, ids.view(*z.shape[:-1])

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        onehot = F.one_hot(ids, self.n_embed).type(flat.dtype)
        counts = onehot.sum(0)                 # (n_embed,)
        sums = flat.t() @ onehot               # (dim, n_embed)
        # Sum the batch statistics over ranks so every rank applies the same update.
        all_reduce_sum_(counts)
        all_reduce_sum_(sums)
        smoothed = ema_step_(self.cluster_size, self.embed_avg, counts, sums, self.decay, self.eps)
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(0))

    @torch.no_grad()
    def init_from_vectors(self, vectors: torch.Tensor, seed: int = 0) -> None:
        """Data-dependent start (``train.init_codebook_from_data``): each code is one of
        ``vectors`` (N, dim), counted once (see ``adapters/ema_quantizer.py``)."""
        chosen = pick_code_vectors(vectors.reshape(-1, self.dim), self.n_embed, seed)
        chosen = chosen.t().to(device=self.embed.device, dtype=self.embed.dtype)   # (dim, n_embed)
        self.embed.copy_(chosen)
        self.embed_avg.copy_(chosen)
        self.cluster_size.fill_(1.0)

    def embed_code(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids (...) -> code vectors (..., dim)."""
        return F.embedding(ids, self.embed.t())


class ResBlock(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 1x1 conv, added to the input (``conv.1``, ``conv.3``)."""

    def __init__(self, in_channel: int, channel: int):
        super().__init__()
        # The first ReLU must not work in place: the block's input is the skip branch.
        self.conv = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_channel, channel, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channel, in_channel, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Encoder(nn.Module):
    """Strided 4x4 convs (stride 4 or 2 overall), a 3x3 conv, residual blocks, ReLU."""

    def __init__(self, in_channel: int, channel: int, n_res_block: int, n_res_channel: int,
                 stride: int):
        super().__init__()
        half = channel // 2
        if stride == 4:
            layers = [nn.Conv2d(in_channel, half, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(half, channel, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(channel, channel, 3, padding=1)]
        elif stride == 2:
            layers = [nn.Conv2d(in_channel, half, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(half, channel, 3, padding=1)]
        else:
            raise ValueError(f"Encoder stride must be 2 or 4, got {stride}")
        layers += [ResBlock(channel, n_res_channel) for _ in range(n_res_block)]
        layers.append(nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """3x3 conv, residual blocks, ReLU, then 4x4 transposed convs (stride 4 or 2 overall)."""

    def __init__(self, in_channel: int, out_channel: int, channel: int, n_res_block: int,
                 n_res_channel: int, stride: int):
        super().__init__()
        layers = [nn.Conv2d(in_channel, channel, 3, padding=1)]
        layers += [ResBlock(channel, n_res_channel) for _ in range(n_res_block)]
        layers.append(nn.ReLU(inplace=True))
        if stride == 4:
            half = channel // 2
            layers += [nn.ConvTranspose2d(channel, half, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                       nn.ConvTranspose2d(half, out_channel, 4, stride=2, padding=1)]
        elif stride == 2:
            layers.append(nn.ConvTranspose2d(channel, out_channel, 4, stride=2, padding=1))
        else:
            raise ValueError(f"Decoder stride must be 2 or 4, got {stride}")
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


# --------------------------------------------------------------------------------------
# The model


class VQVAE2(Tokenizer):
    """Two-level VQ-VAE-2 with rosinality's module names (see the module docstring).

    Inputs are images in [-1, 1] whose height and width are multiples of 8 (the top codes
    sit at 1/8 of the input resolution, the bottom codes at 1/4).
    """

    def __init__(self, in_channel: int = 3, channel: int = 128, n_res_block: int = 2,
                 n_res_channel: int = 32, embed_dim: int = 64, n_embed: int = 512,
                 decay: float = 0.99):
        super().__init__()
        self.in_channel = in_channel
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.enc_b = Encoder(in_channel, channel, n_res_block, n_res_channel, stride=4)
        self.enc_t = Encoder(channel, channel, n_res_block, n_res_channel, stride=2)
        self.quantize_conv_t = nn.Conv2d(channel, embed_dim, 1)
        self.quantize_t = Quantize(embed_dim, n_embed, decay=decay)
        self.dec_t = Decoder(embed_dim, embed_dim, channel, n_res_block, n_res_channel, stride=2)
        self.quantize_conv_b = nn.Conv2d(embed_dim + channel, embed_dim, 1)
        self.quantize_b = Quantize(embed_dim, n_embed, decay=decay)
        self.upsample_t = nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1)
        self.dec = Decoder(embed_dim + embed_dim, in_channel, channel, n_res_block, n_res_channel,
                           stride=4)

    # ---- the model contract (adapters/contract.py) -------------------------------------
    codebook_names = ("top", "bottom")

    def forward(self, x: torch.Tensor, return_codes: bool = False):
        """``x`` -> ``(reconstruction, latent_loss)`` as rosinality's, latent_loss of shape (1,).

        ``return_codes=True`` adds ``(id_t, id_b)``; the loss family asks for them through
        ``forward`` so that a DDP wrapper sees the call.
        """
        quant_t, quant_b, diff, id_t, id_b = self.encode(x)
        xrec = self.decode(quant_t, quant_b)
        if return_codes:
            return xrec, diff, (id_t, id_b)
        return xrec, diff

    def encode(self, x: torch.Tensor):
        """``x`` -> ``(quant_t, quant_b, latent_loss, id_t, id_b)`` (rosinality's order).

        ``id_t`` is (B, H/8, W/8), ``id_b`` is (B, H/4, W/4); ``latent_loss`` is the sum of
        both levels' commitment MSEs, shape (1,).
        """
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"vqvae2 needs image sizes divisible by 8, got {tuple(x.shape[-2:])}")
        enc_b = self.enc_b(x)
        enc_t = self.enc_t(enc_b)
        quant_t, diff_t, id_t = self.quantize_t(self.quantize_conv_t(enc_t).permute(0, 2, 3, 1))
        quant_t = quant_t.permute(0, 3, 1, 2)
        # The bottom level sees the decoded top codes next to its own features.
        joint = torch.cat([self.dec_t(quant_t), enc_b], 1)
        quant_b, diff_b, id_b = self.quantize_b(self.quantize_conv_b(joint).permute(0, 2, 3, 1))
        quant_b = quant_b.permute(0, 3, 1, 2)
        return quant_t, quant_b, (diff_t + diff_b).unsqueeze(0), id_t, id_b

    def decode(self, quant_t: torch.Tensor, quant_b: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.cat([self.upsample_t(quant_t), quant_b], 1))

    def encode_code(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(id_t, id_b)`` without the final decoder (the bottom level still needs the
        top level's ``dec_t``); exactly ``forward``'s codes.  Call it in eval mode (the EMA
        codebooks move in training)."""
        _, _, _, id_t, id_b = self.encode(x)
        return id_t, id_b

    def decode_code(self, code_t: torch.Tensor, code_b: torch.Tensor) -> torch.Tensor:
        """Code maps (B, h, w) of both levels -> images."""
        quant_t = self.quantize_t.embed_code(code_t).permute(0, 3, 1, 2)
        quant_b = self.quantize_b.embed_code(code_b).permute(0, 3, 1, 2)
        return self.decode(quant_t, quant_b)

    @torch.no_grad()
    def init_codebook_from_data(self, images: torch.Tensor, seed: int = 0,
                                batch_size: int = 16) -> Tuple[int, int]:
        """Start both EMA codebooks from encoder outputs of ``images`` (B, C, H, W).

        The top codebook first, from ``quantize_conv_t`` outputs; the bottom one then from
        ``quantize_conv_b`` outputs computed with the new top codes, the inputs it will see
        in training.  Each code takes one distinct random vector and a count of 1.  Eval
        mode throughout (no EMA update, no RNG use).  Returns the number of vectors drawn
        from per level (top, bottom); ``TooFewVectors`` when a level gets fewer than codes.
        """
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            chunks = [images[i:i + batch_size].to(device) for i in range(0, images.shape[0], batch_size)]
            enc_b = [self.enc_b(x) for x in chunks]
            top = [self.quantize_conv_t(self.enc_t(e)).permute(0, 2, 3, 1) for e in enc_b]
            flat_t = torch.cat([t.reshape(-1, self.embed_dim) for t in top]).float()
            self.quantize_t.init_from_vectors(flat_t, seed)
            bottom = []
            for e, t in zip(enc_b, top):
                quant_t = self.quantize_t(t)[0].permute(0, 3, 1, 2)
                joint = torch.cat([self.dec_t(quant_t), e], 1)
                bottom.append(self.quantize_conv_b(joint).permute(0, 2, 3, 1).reshape(-1, self.embed_dim))
            flat_b = torch.cat(bottom).float()
            # A different draw for the second level (the seed alone would pick the same positions).
            self.quantize_b.init_from_vectors(flat_b, seed + 1)
        finally:
            self.train(was_training)
        return int(flat_t.shape[0]), int(flat_b.shape[0])

    def codebook_vectors(self, images: torch.Tensor, batch_size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(top, bottom)`` code-space vectors of ``images``: ``quantize_conv_t`` outputs, and
        ``quantize_conv_b`` outputs computed with the current top codes (what training feeds it)."""
        def both(x):
            enc_b = self.enc_b(x)
            top = self.quantize_conv_t(self.enc_t(enc_b)).permute(0, 2, 3, 1)
            quant_t = self.quantize_t(top)[0].permute(0, 3, 1, 2)
            bottom = self.quantize_conv_b(torch.cat([self.dec_t(quant_t), enc_b], 1)).permute(0, 2, 3, 1)
            return top.reshape(-1, self.embed_dim).float(), bottom.reshape(-1, self.embed_dim).float()
        chunks = encode_in_chunks(self, both, images, batch_size)
        return torch.cat([t for t, _ in chunks]), torch.cat([b for _, b in chunks])

    @torch.no_grad()
    def set_codes(self, index: int, ids: torch.Tensor, vectors: torch.Tensor) -> List[torch.Tensor]:
        """Codes ``ids`` of level ``index`` (0 top, 1 bottom) become ``vectors``, counted once."""
        q = (self.quantize_t, self.quantize_b)[index]
        columns = vectors.to(q.embed).t()
        q.embed[:, ids] = columns
        q.embed_avg[:, ids] = columns
        q.cluster_size[ids] = 1.0
        return [q.embed, q.embed_avg, q.cluster_size]

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final transposed conv (for the adaptive GAN weight)."""
        return self.dec.blocks[-1].weight

    @property
    def codebook_sizes(self) -> Tuple[int, int]:
        """(top, bottom) number of codes."""
        return (self.quantize_t.n_embed, self.quantize_b.n_embed)


# --------------------------------------------------------------------------------------
# Builder and checkpoint helpers


INT_ARGS = ("in_channel", "channel", "n_res_block", "n_res_channel", "embed_dim", "n_embed")


def accepted_args(variant: Optional[str]) -> Tuple[List[str], bool]:
    """rosinality's constructor names and ``ckpt_path``; other names are ignored (warned)."""
    return list(DEFAULTS) + ["ckpt_path"], False


def vqvae2_rules(data: Dict[str, Any], variant: Optional[str], out: List[Finding]) -> None:
    """Findings about a vqvae2 config's ``model_args`` and crop size."""
    args = data.get("model_args") or {}
    if not isinstance(args, dict):
        return
    for key in INT_ARGS:
        if key not in args:
            continue
        value, minimum = args[key], (0 if key == "n_res_block" else 1)
        if not is_int(value):
            type_finding(out, f"model_args.{key}", value, 1, f"an integer ({key} must be an integer)")
        elif value < minimum:
            out.append(Finding(ERROR, f"model_args.{key}", "bad_value",
                               f"model_args.{key} is {value}; {key} must be >= {minimum}",
                               f"set {key} to a {'non-negative' if minimum == 0 else 'positive'} integer"))
    bounds = {"in_channel": IMAGE_CHANNELS, "channel": MAX_WIDTH, "n_res_channel": MAX_WIDTH,
              "embed_dim": MAX_WIDTH, "n_embed": MAX_CODES, "n_res_block": MAX_BLOCKS}
    for key, high in bounds.items():
        if is_int(args.get(key)) and args[key] > high:
            what = "training images are RGB: in_channel" if key == "in_channel" else key
            out.append(Finding(ERROR, f"model_args.{key}", "too_large" if key != "in_channel" else "channels_mismatch",
                               f"model_args.{key} is {args[key]}; {what} must be <= {high}",
                               f"set {key}: {high}" if key == "in_channel" else f"use a {key} of at most {high}"))
    if is_int(args.get("in_channel")) and 0 < args["in_channel"] < IMAGE_CHANNELS:
        out.append(Finding(ERROR, "model_args.in_channel", "channels_mismatch",
                           f"model_args.in_channel is {args['in_channel']}, but training images are RGB "
                           f"({IMAGE_CHANNELS} channels)", f"set in_channel: {IMAGE_CHANNELS}",
                           [("model_args.in_channel", IMAGE_CHANNELS)]))
    file_findings(out, "model_args.ckpt_path", args.get("ckpt_path"), "a rosinality vqvae_*.pt state dict")
    channel = args.get("channel")
    if is_int(channel) and channel == 1:
        out.append(Finding(ERROR, "model_args.channel", "bad_value",
                           "model_args.channel must be >= 2 (the encoders use channel // 2), got 1",
                           "set channel: 2 or more"))
    decay = args.get("decay")
    if "decay" in args and not (is_number(decay) and 0.0 <= decay < 1.0):
        out.append(Finding(ERROR, "model_args.decay", "bad_value",
                           f"model_args.decay is {decay!r}; decay must be a number in [0, 1)",
                           "write e.g. decay: 0.99"))
    size = (data.get("data") or {}).get("image_size")
    if is_int(size) and size % 8:
        fixed = max(8, size // 8 * 8)
        out.append(Finding(ERROR, "data.image_size", "bad_value",
                           f"vqvae2 needs data.image_size divisible by 8 (top codes sit at 1/8 of the image), "
                           f"got {size}", f"use e.g. {fixed}", [("data.image_size", fixed)]))


def _tiny_config() -> Dict[str, Any]:
    """A 32 px vqvae2 small enough for CPU tests (two 16-code EMA codebooks)."""
    return {"model_type": "vqvae2",
            "model_args": {"channel": 16, "n_res_block": 1, "n_res_channel": 8, "embed_dim": 8, "n_embed": 16},
            "lossconfig": {"params": {"disc_start": 0, "disc_num_layers": 1, "disc_ndf": 8}},
            "train": {"batch_size": 2, "learning_rate": 1e-4}, "data": {"image_size": 32}}


@register_model_type(
    "vqvae2",
    description="VQ-VAE-2 (Razavi et al. 2019), rosinality/vq-vae-2-pytorch layout, EMA codebooks",
    loss=LossFamilySpec("vqvae2", "VQ-VAE-2: MSE + latent_loss_weight * latent loss, optional LPIPS and PatchGAN",
                        "losses.vqvae2_loss.VQVAE2Loss"),
    aliases=("VQVAE2", "vq-vae-2", "vq_vae_2", "VQVAE", "vqvae2.VQVAE"),
    accepted_args=accepted_args,
    rules=vqvae2_rules,
    codebooks=lambda variant: ("top", "bottom"),
    ema_codebook=lambda variant: True,
    vector_codebook=lambda variant: True,
    tiny_config=_tiny_config,
    mismatch_hint="VQ-VAE-2's codebooks are always EMA",
)
def build_vqvae2(cfg) -> VQVAE2:
    """Registry builder: ``cfg.model_args`` use rosinality's constructor names (in_channel,
    channel, n_res_block, n_res_channel, embed_dim, n_embed, decay); missing ones take
    rosinality's defaults.  The config must pass :func:`vqvae2_rules` (what ``validate``
    runs).  ``model_args.ckpt_path`` names a rosinality ``vqvae_*.pt`` state dict to load
    (strictly) into the new model."""
    data = config_data(cfg)
    findings = variant_findings(get_model_type("vqvae2"), data)
    findings += check_model_args(get_model_type("vqvae2"), data, None)
    raise_for_errors(findings, "vqvae2")
    for finding in findings:
        if finding.code == "ignored_model_arg":
            log.warning(finding.message)
    args = data.get("model_args") or {}
    kwargs = {k: args.get(k, default) for k, default in DEFAULTS.items()}
    kwargs["decay"] = float(kwargs["decay"])
    model = VQVAE2(**kwargs)
    if args.get("ckpt_path"):
        # A rosinality (or this tool's exported) state dict, loaded strictly.
        load_rosinality_checkpoint(model, args["ckpt_path"])
    return model


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Normalise an old state dict: unwrap ``{"model": ...}`` / ``{"state_dict": ...}`` and
    strip the ``module.`` prefix that (Distributed)DataParallel adds when saved wrapped."""
    for wrapper in ("state_dict", "model"):
        inner = state_dict.get(wrapper) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping) and not torch.is_tensor(inner):
            state_dict = inner
            break
    out = {}
    for key, value in state_dict.items():
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def load_rosinality_checkpoint(model: VQVAE2, source: Union[str, os.PathLike, Mapping]) -> VQVAE2:
    """Load a rosinality ``vqvae_*.pt`` file (or state dict) strictly into ``model``.

    The file is read with ``weights_only=True``: nothing in it is executed.  Missing or
    unexpected keys and shape mismatches -> UserError naming the key and both shapes.
    """
    if isinstance(source, Mapping):
        raw = source
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise UserError(f"vqvae2 checkpoint {path!r} does not exist; pass a rosinality vqvae_*.pt file")
        try:
            raw = load_weights_file(path)
        except UnreadableFile as exc:  # pickle errors, truncated files, foreign formats
            raise UserError(f"vqvae2 checkpoint {path!r} is not a readable torch state dict "
                            f"({exc.reason}); pass a rosinality vqvae_*.pt file") from None
        if not isinstance(raw, Mapping):
            raise UserError(f"vqvae2 checkpoint {path!r} holds a {type(raw).__name__}, not a state dict")
    state = checkpoint_filter_fn(raw)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"vqvae2 checkpoint does not match the model: missing {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{'...' if len(unexpected) > 5 else ''}; check model_args against the "
                        "checkpoint's training config")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"vqvae2 checkpoint key {key!r} has shape {tuple(state[key].shape)}, the "
                            f"model expects {tuple(value.shape)}; set model_args to the checkpoint's sizes")
    model.load_state_dict(state, strict=True)
    return model


__all__ = ["VQVAE2", "Quantize", "ResBlock", "Encoder", "Decoder", "DEFAULTS", "build_vqvae2",
           "checkpoint_filter_fn", "load_rosinality_checkpoint"]
