"""DinoVQ: a ViT tokenizer whose codes are distilled from a frozen DINO teacher (seed 000).

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

The seed's API::

    model = DinoVQModel(img_size=(224, 224), encoder_embed_dim=768, codebook_size=8192)
    losses = model.compute_loss(imgs, dino_features_gt)      # (B, 196, 768) features
    losses["total_loss"].backward()

With the defaults the model is ViT-B scale (12 encoder blocks of width 768, 12 pixel-decoder
blocks, a 3-block semantic head).  ``build_dinovq(cfg)`` is the registry builder used by
the trainer: it builds the same network *without* its loss (the trainer's
``DinoVQLossCalculator`` owns LPIPS and the discriminator; see ``losses/dinovq_loss.py``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from adapters.distributed import all_reduce_sum_
from adapters.ema_quantizer import ema_step_, pick_code_vectors
from train.errors import UserError

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
        z_q = z + (z_q - z).detach()   # straight-through estimator
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


class DinoVQModel(nn.Module):
    """The seed's DinoVQ model (constructor names and ``compute_loss`` as in seed 000).

    ``forward(x)`` returns ``(reconstruction, vq_loss)`` like every model of the registry;
    ``forward(x, return_dict=True)`` returns ``reconstructions``, ``dino_pred`` (B, N,
    dino_dim), ``vq_loss`` and ``indices`` (B, H/p, W/p).

    ``build_loss=False`` builds the network only (the trainer's path): then ``loss_fn`` is
    None and ``compute_loss`` is unavailable.
    """

    def __init__(self, img_size=DEFAULTS["img_size"], encoder_embed_dim: int = 768,
                 codebook_size: int = 8192, dino_loss_weight: float = 1.0,
                 recon_loss_weight: float = 1.0, vq_loss_weight: float = 1.0,
                 use_perceptual: bool = False, perceptual_weight: float = 1.0,
                 vgg_ckpt_path: Optional[str] = None, use_gan: bool = False,
                 disc_start: int = 10000, disc_weight: float = 0.5, disc_dim: int = 64,
                 disc_num_layers: int = 3, disc_adaptive_weight: bool = True,
                 patch_size: int = 16, dino_dim: int = 768, in_channels: int = 3,
                 encoder_depth: int = 12, encoder_num_heads: int = 12,
                 decoder_embed_dim: Optional[int] = None, decoder_depth: int = 12,
                 decoder_num_heads: Optional[int] = None, dino_head_depth: int = 3,
                 mlp_ratio: float = 4.0, codebook_dim: int = 32, codebook_decay: float = 0.99,
                 codebook_eps: float = 1e-5, allow_random_vgg: bool = False,
                 disc_factor: float = 1.0, disc_loss: str = "hinge", build_loss: bool = True):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = int(patch_size)
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise UserError(f"DinoVQ img_size {list(self.img_size)} is not divisible by patch_size "
                            f"{self.patch_size}; use a multiple of {self.patch_size}")
        self.grid_size = (h // self.patch_size, w // self.patch_size)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.in_channels = int(in_channels)
        self.dino_dim = int(dino_dim)
        self.codebook_size = int(codebook_size)
        self.codebook_dim = int(codebook_dim)
        decoder_embed_dim = int(decoder_embed_dim or encoder_embed_dim)
        decoder_num_heads = int(decoder_num_heads or encoder_num_heads)
        for name, dim, heads in (("encoder", encoder_embed_dim, encoder_num_heads),
                                 ("decoder", decoder_embed_dim, decoder_num_heads)):
            if dim % heads:
                raise UserError(f"DinoVQ {name}_embed_dim {dim} is not divisible by "
                                f"{name}_num_heads {heads}; pick a head count that divides it")

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

        self.use_gan = bool(use_gan)
        self.loss_fn = None
        if build_loss:
            from losses.dinovq_loss import DinoVQLoss

            self.loss_fn = DinoVQLoss(
                dino_loss_weight=dino_loss_weight, recon_loss_weight=recon_loss_weight,
                vq_loss_weight=vq_loss_weight, use_perceptual=use_perceptual,
                perceptual_weight=perceptual_weight, vgg_ckpt_path=vgg_ckpt_path,
                allow_random_vgg=allow_random_vgg, use_gan=use_gan, disc_start=disc_start,
                disc_weight=disc_weight, disc_factor=disc_factor, disc_dim=disc_dim,
                disc_num_layers=disc_num_layers, disc_adaptive_weight=disc_adaptive_weight,
                disc_loss=disc_loss, disc_in_channels=in_channels)
        # The seed loop's discriminator step: reuse the reconstructions of the generator
        # step that ran on the very same (unmodified) image tensor.
        self._last_generator = None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # timm's ViT initialisation: truncated normal linears, zero biases.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- the registry's model contract -------------------------------------------------
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

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.get_codebook_entry(indices))

    def forward(self, x: torch.Tensor, return_dict: bool = False, update_codebook: bool = True):
        z = self.encode(x)
        z_q, vq_loss, indices = self.quantize(z, update=self.training and update_codebook)
        recon = self.decode(z_q)
        if not return_dict:
            return recon, vq_loss
        return {"reconstructions": recon, "dino_pred": self.predict_dino(z_q), "vq_loss": vq_loss,
                "indices": indices.view(x.shape[0], *self.grid_size)}

    # ---- the seed's API ------------------------------------------------------------------
    def compute_loss(self, imgs: torch.Tensor, dino_features_gt: torch.Tensor,
                     update_type: str = "generator", global_step: int = 0) -> Dict[str, torch.Tensor]:
        """Seed 000's loss dict for a generator or a discriminator update."""
        if self.loss_fn is None:
            raise RuntimeError("this DinoVQModel was built without its loss (build_loss=False, the "
                               "trainer's path); use losses.dinovq_loss.DinoVQLossCalculator")
        if update_type == "generator":
            out = self(imgs, return_dict=True)
            if self.use_gan:  # only a discriminator update ever reads it back
                self._last_generator = (imgs, imgs._version, out["reconstructions"].detach())
            return self.loss_fn.generator_loss(imgs, out["reconstructions"], out["dino_pred"],
                                               out["vq_loss"], dino_features_gt, global_step,
                                               last_layer=self.get_last_layer())
        if update_type == "discriminator":
            if not self.use_gan:
                raise ValueError("compute_loss(update_type='discriminator') needs use_gan=True: this "
                                 "DinoVQ model has no discriminator; construct it with use_gan=True "
                                 "or only run generator updates")
            return self.loss_fn.discriminator_loss(imgs, self._reconstruct_detached(imgs), global_step)
        raise ValueError(f"unknown update_type {update_type!r}; valid choices: 'discriminator', "
                         "'generator'")

    def _reconstruct_detached(self, imgs: torch.Tensor) -> torch.Tensor:
        cached = self._last_generator
        self._last_generator = None
        if cached is not None and cached[0] is imgs and cached[1] == imgs._version:
            return cached[2]
        # No matching generator step: reconstruct without gradients and without moving the
        # EMA codebook (a second update per step would count the batch twice).
        with torch.no_grad():
            return self(imgs, return_dict=True, update_codebook=False)["reconstructions"]


# --------------------------------------------------------------------------------------
# Registry builder

MODEL_ARG_NAMES = ("img_size", "encoder_embed_dim", "codebook_size", "patch_size", "dino_dim",
                   "in_channels", "encoder_depth", "encoder_num_heads", "decoder_embed_dim",
                   "decoder_depth", "decoder_num_heads", "dino_head_depth", "mlp_ratio",
                   "codebook_dim", "codebook_decay", "codebook_eps")


def model_kwargs_from_config(cfg) -> Dict[str, object]:
    """The network's constructor arguments from ``cfg.model_args`` (loss settings excluded)."""
    import inspect

    from losses.dinovq_loss import LOSS_ARG_NAMES
    from train.schema import as_dict

    args = as_dict(cfg.model_args)
    known = set(inspect.signature(DinoVQModel).parameters) | set(LOSS_ARG_NAMES)
    unknown = sorted(set(args) - known)
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise UserError(f"DinoVQ model_args: unknown argument(s) {', '.join(hints)}; "
                        f"valid names: {', '.join(sorted(known - {'build_loss'}))}")
    return {k: args[k] for k in MODEL_ARG_NAMES if k in args}


def build_dinovq(cfg) -> DinoVQModel:
    """Registry builder (``adapters.dinovq:build_dinovq``): the network without its loss.

    The loss settings of ``cfg.model_args`` are read by ``DinoVQLossCalculator.build``; the
    GAN is on only when ``model_args.use_gan`` and ``train.use_gan`` are both true.
    """
    from losses.dinovq_loss import loss_kwargs_from_config

    model = DinoVQModel(**model_kwargs_from_config(cfg), build_loss=False)
    model.use_gan = bool(loss_kwargs_from_config(cfg)["use_gan"])
    return model
