"""EMA vector quantizer, state-dict compatible with taming-transformers' ``EMAVectorQuantizer``.

The codebook is learned by exponential moving averages of the encoder outputs assigned to
each code (van den Oord et al. 2017, "Neural Discrete Representation Learning", appendix
A.1), not by gradients.  The algorithm and the parameter layout follow upstream taming's
``taming/modules/vqvae/quantize.py`` (``EmbeddingEMA`` + ``EMAVectorQuantizer``, master
branch; not in any PyPI release):

* nearest code by squared L2 distance, straight-through estimator for the output;
* loss = ``beta * mean((sg[z_q] - z)^2)`` (commitment only: the codebook gets no gradient);
* in training mode, after quantizing the batch::

      cluster_size = decay * cluster_size + (1 - decay) * counts
      embed_avg    = decay * embed_avg    + (1 - decay) * sum of z per code
      n            = sum(cluster_size)
      smoothed     = (cluster_size + eps) / (n + n_embed * eps) * n      # Laplace smoothing
      weight       = embed_avg / smoothed

State-dict keys under the quantizer: ``embedding.weight`` (n_embed, embed_dim),
``embedding.cluster_size`` (n_embed,), ``embedding.embed_avg`` (n_embed, embed_dim), plus
``used`` when ``remap`` is given -- the same as upstream, so upstream EMAVQ checkpoints load
strictly.

Differences from upstream, on purpose:

* upstream's ``__init__`` reads undefined names (``codebook_dim``, ``num_tokens``) and
  raises NameError; this one builds;
* the per-batch statistics (counts and summed encodings) are summed over all distributed
  ranks (``adapters.distributed.all_reduce_sum_``) *before* the EMA update, so every rank
  applies the same update and keeps the same codebook (upstream updates each rank from its
  own batch and the codebooks drift apart);
* the three codebook tensors are buffers, not ``requires_grad=False`` parameters: they
  can never end up in an optimizer or in DDP's gradient buckets (same state-dict keys);
* statistics are accumulated in float32 even under autocast, with ``index_add_`` (no host
  read, unlike CUDA's ``bincount``) instead of a dense one-hot matrix; ``min_encodings`` is
  returned as None, as ``VectorQuantizer2`` does.

Every rank must call ``forward`` in training mode the same number of times (the update
contains a collective), which DDP training does anyway.

Opt-in data-dependent start (``train.init_codebook_from_data``, beyond upstream):
:func:`pick_code_vectors` + ``EMACodebook.init_from_vectors`` give every code one distinct
random encoder output and a count of 1 (``weight = embed_avg = vector``, ``cluster_size =
1``), as if each code had already been assigned that one vector.  Upstream's start
(N(0, 1) codes, zero counts) leaves every code the first batch does not pick with a count
that decays towards zero, and the Laplace smoothing then divides its ``embed_avg`` by
almost nothing: the code is thrown far away and never picked again (collapse to a few
codes within a few steps on real images).  Starting codebooks from data is the usual
remedy: SoundStream (Zeghidour et al. 2021) runs k-means on the first batch; Jukebox
(Dhariwal et al. 2020) re-draws dead codes from random encoder outputs, which is the
cheaper choice taken here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.contract import straight_through
from adapters.distributed import all_reduce_sum_


class TooFewVectors(ValueError):
    """Fewer encoder outputs than codes were given to a data-dependent codebook start."""

    def __init__(self, needed: int, got: int):
        super().__init__(f"a data-dependent codebook start needs at least {needed} encoder outputs "
                         f"(one per code), got {got}")
        self.needed, self.got = int(needed), int(got)


@torch.no_grad()
def ema_step_(cluster_size: torch.Tensor, embed_avg: torch.Tensor, counts: torch.Tensor,
              embed_sum: torch.Tensor, decay: float, eps: float) -> torch.Tensor:
    """One EMA step of a codebook's statistics, in place; returns the smoothed code counts.

    ``counts`` / ``embed_sum`` are this batch's (already all-reduced) per-code counts and
    summed encodings.  Laplace smoothing keeps unused codes (cluster_size 0) from dividing
    by zero while leaving the total mass n unchanged.  The caller divides ``embed_avg`` by
    the result along its own code axis (taming stores codes in rows, rosinality in columns).
    """
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1 - decay)
    embed_avg.mul_(decay).add_(embed_sum.to(embed_avg.dtype), alpha=1 - decay)
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.numel() * eps) * n


def kmeans_codes(vectors: torch.Tensor, n_codes: int, seed: int, iters: int,
                 chunk: int = 8192) -> torch.Tensor:
    """``n_codes`` centroids of ``vectors`` (N, dim): :func:`pick_code_vectors`' draw, then
    ``iters`` Lloyd iterations (Lloyd 1982, "Least squares quantization in PCM": assign each
    vector to its nearest centroid, move each centroid to the mean of its vectors).

    k-means codebook starts are VQGAN-LC's (Zhu et al. 2024, centroids of image features) and
    BEiT v2's VQ-KD (Peng et al. 2022, k-means initialised codebook); SoundStream does it on
    the first batch.  A centroid no vector picked keeps its place (a data vector).  The
    arithmetic is float32, deterministic for a given input, and uses no global RNG.
    """
    flat = vectors.reshape(vectors.shape[0], -1).float()
    centroids = pick_code_vectors(flat, n_codes, seed).clone()
    for _ in range(int(iters)):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(n_codes, dtype=flat.dtype, device=flat.device)
        c_sq = centroids.pow(2).sum(1)
        for i in range(0, flat.shape[0], chunk):
            x = flat[i:i + chunk]
            nearest = (c_sq - 2 * x @ centroids.t()).argmin(1)     # |x|^2 is the same for every code
            sums.index_add_(0, nearest, x)
            counts += torch.bincount(nearest, minlength=n_codes).to(flat.dtype)
        picked = counts > 0
        centroids[picked] = sums[picked] / counts[picked].unsqueeze(1)
    return centroids


def pick_code_vectors(vectors: torch.Tensor, n_codes: int, seed: int) -> torch.Tensor:
    """``n_codes`` rows of ``vectors`` (N, dim) at distinct random positions.

    The draw uses a private ``torch.Generator`` so it never moves the global RNG (whose
    state a resumable run checkpoints).
    """
    if vectors.shape[0] < n_codes:
        raise TooFewVectors(n_codes, vectors.shape[0])
    pick = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n_codes]
    return vectors[pick.to(vectors.device)]


class EMACodebook(nn.Module):
    """The codebook and its EMA statistics (upstream's ``EmbeddingEMA`` layout)."""

    def __init__(self, n_embed: int, embed_dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.n_embed = int(n_embed)
        self.embed_dim = int(embed_dim)
        self.decay = float(decay)
        self.eps = float(eps)
        # Upstream initialises with a standard normal and starts embed_avg from the same
        # values, so the first updates pull the random codes towards the data gradually.
        weight = torch.randn(self.n_embed, self.embed_dim)
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.zeros(self.n_embed))
        self.register_buffer("embed_avg", weight.clone())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.weight)

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, embed_sum: torch.Tensor) -> None:
        """One EMA step from this batch's (already all-reduced) statistics."""
        smoothed = ema_step_(self.cluster_size, self.embed_avg, counts, embed_sum, self.decay, self.eps)
        self.weight.copy_(self.embed_avg / smoothed.unsqueeze(1))

    @torch.no_grad()
    def init_from_vectors(self, vectors: torch.Tensor, seed: int = 0) -> None:
        """Data-dependent start (module docstring): each code is one of ``vectors`` (N, dim)
        and counts as having seen it once."""
        chosen = pick_code_vectors(vectors.reshape(-1, self.embed_dim), self.n_embed, seed)
        chosen = chosen.to(device=self.weight.device, dtype=self.weight.dtype)
        self.weight.copy_(chosen)
        self.embed_avg.copy_(chosen)
        self.cluster_size.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{self.n_embed}, {self.embed_dim}, decay={self.decay}, eps={self.eps}"


class EMAVectorQuantizer(nn.Module):
    """Vector quantizer with an EMA-updated codebook; taming's ``VectorQuantizer2`` interface.

    ``forward(z)`` with ``z`` of shape (B, C, H, W) returns
    ``(z_q, loss, (perplexity, None, indices))``; ``indices`` are flat (B*H*W,) like
    upstream, (B*H*W, 1) with ``remap``, or (B, H, W) with ``sane_index_shape``.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, remap: Optional[str] = None, unknown_index="random",
                 sane_index_shape: bool = False):
        super().__init__()
        self.n_embed = int(n_embed)
        self.embed_dim = int(embed_dim)
        self.beta = float(beta)
        self.sane_index_shape = bool(sane_index_shape)
        self.embedding = EMACodebook(self.n_embed, self.embed_dim, decay, eps)
        # Switch off EMA updates (e.g. to fine-tune only the decoder) without leaving train mode.
        self.update = True

        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = int(self.used.shape[0])
            self.unknown_index = unknown_index  # "random", "extra" or an int
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
        else:
            self.re_embed = self.n_embed

    # n_e / e_dim: the attribute names VectorQuantizer2 users reach for.
    @property
    def n_e(self) -> int:
        return self.n_embed

    @property
    def e_dim(self) -> int:
        return self.embed_dim

    # ---- index remapping (taming's VectorQuantizer2 semantics) ---------------------------
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Full-codebook indices -> positions in ``used`` (unknown: random or a fixed index)."""
        shape = inds.shape
        flat = inds.reshape(shape[0], -1)
        used = self.used.to(flat)
        match = flat[:, :, None] == used[None, None, :]
        new = match.long().argmax(-1)
        unknown = ~match.any(-1)
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=(int(unknown.sum()),), device=new.device)
        else:
            new[unknown] = int(self.unknown_index)
        return new.reshape(shape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` -> full-codebook indices (the "extra" token maps to 0)."""
        shape = inds.shape
        flat = inds.reshape(shape[0], -1).clone()
        used = self.used.to(flat)
        if self.re_embed > used.shape[0]:
            flat[flat >= used.shape[0]] = 0
        return used[flat].reshape(shape)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, temp=None, rescale_logits=False, return_logits=False):
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("EMAVectorQuantizer: temp/rescale_logits/return_logits exist only for "
                             "interface compatibility with GumbelQuantize")
        b, c, h, w = z.shape
        if c != self.embed_dim:
            raise ValueError(f"EMAVectorQuantizer: input has {c} channels, codebook dim is {self.embed_dim}")
        z_bhwc = z.permute(0, 2, 3, 1).contiguous()
        # Distances and statistics in the codebook's precision (float32 under autocast too).
        flat = z_bhwc.reshape(-1, c).to(self.embedding.weight.dtype)
        weight = self.embedding.weight
        d = (flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1)
             - 2 * flat @ weight.t())
        indices = d.argmin(1)
        # Quantize with the codebook as it was before this batch's update (upstream order).
        z_q = self.embedding(indices).view(b, h, w, c).to(z.dtype)

        # index_add_ rather than bincount: CUDA's bincount reads the largest index on the host
        # (a synchronisation per forward); the counts are the same whole numbers.
        counts = torch.zeros(self.n_embed, dtype=flat.dtype, device=flat.device).index_add_(
            0, indices, torch.ones(indices.shape, dtype=flat.dtype, device=flat.device))
        if self.training and self.update:
            with torch.no_grad():
                embed_sum = torch.zeros_like(weight).index_add_(0, indices, flat.detach())
                stats = torch.cat([counts, embed_sum.reshape(-1)])
                # One collective for both statistics: every rank applies the global batch's
                # update, so the codebooks stay identical across ranks.
                all_reduce_sum_(stats)
                self.embedding.ema_update(stats[:self.n_embed], stats[self.n_embed:].view_as(weight))

        loss = self.beta * F.mse_loss(z_q.detach(), z_bhwc)
        # Straight-through estimator: forward uses the code (exactly), backward copies the
        # gradient to z.
        z_q = straight_through(z_bhwc, z_q)
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        # Perplexity of this rank's batch, as upstream reports it.
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())

        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(b, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(b, h, w)
        return z_q, loss, (perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Codes -> vectors; ``shape`` = (batch, height, width, channel) gives (B, C, H, W)."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices.reshape(-1) if shape is not None else indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q

    def extra_repr(self) -> str:
        return f"beta={self.beta}, remap={self.remap!r}, sane_index_shape={self.sane_index_shape}"
