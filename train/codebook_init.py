"""``train.init_codebook_from_data`` / ``train.init_codebook_kmeans_iters``: codebooks start
from encoder outputs of training crops.

    python -m train fit configs/demo_emavq.json --data builtin train.init_codebook_from_data=true
    python -m train fit configs/modern_recipe.yaml --data builtin train.init_codebook_kmeans_iters=10

k-means (``init_codebook_kmeans_iters`` > 0) starts from the same draw and runs that many
Lloyd iterations on the same encoder outputs (``adapters.ema_quantizer.kmeans_codes``); it
works for every codebook of code vectors (EMA codebooks, taming's ``VectorQuantizer2``),
through the contract's ``codebook_vectors`` / ``set_codes``, one codebook after the other
(VQ-VAE-2's bottom vectors depend on the top codes).

``adapters/ema_quantizer.py`` says why (upstream's N(0, 1) start leaves most codes unused).
Only a fresh run starts this way: a resumed run's codebook is the checkpoint's.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

import torch.distributed as dist
from torch import nn

from adapters.distributed import is_distributed
from adapters.ema_quantizer import TooFewVectors, kmeans_codes
from train.data import DataSpec, fixed_crops
from train.shards import ShardSpec, first_crops
from train.errors import UserError

# Training crops encoded for the start (more when the codes outnumber their encoder
# outputs), and the most it will ever draw.
CODEBOOK_INIT_CROPS = 64
CODEBOOK_INIT_MAX_CROPS = 4096


def init_codebook_from_data(model: nn.Module, cfg, data: DataSpec) -> Dict[str, object]:
    """Start ``model``'s EMA codebook(s) from its encoder outputs of the run's first crops.

    Every rank encodes the same crops (sample numbers 0..n-1 of the training stream,
    independent of rank) with the same seed, and draws from no global RNG (so resuming
    stays exact); rank 0's buffers are then broadcast so the codebooks are identical even
    where GPU kernels are not bit-deterministic.  Returns what the run header reports:
    ``{"crops", "vectors" (per codebook), "codes" (per codebook)}``, plus ``"kmeans_iters"``
    with the k-means start.
    """
    iters = int(cfg.train.init_codebook_kmeans_iters or 0)
    key = "train.init_codebook_kmeans_iters" if iters else "train.init_codebook_from_data"
    # the contract's defaults refuse models without such codebooks
    init = (lambda images, seed, batch_size: kmeans_start(model, images, seed, batch_size, iters)) if iters \
        else model.init_codebook_from_data
    if (cfg.model_args or {}).get("ckpt_path"):
        raise UserError(f"{key} would replace the codebook loaded from model_args.ckpt_path; set "
                        f"{key}={'0' if iters else 'false'} to keep it")
    seed, n = int(cfg.train.seed), CODEBOOK_INIT_CROPS
    while True:
        crops = (first_crops if isinstance(data, ShardSpec) else fixed_crops)(data, n, seed=seed)
        try:
            drawn = init(crops, seed=seed, batch_size=int(cfg.train.batch_size))
            break
        except TooFewVectors as exc:
            more = math.ceil(n * exc.needed / max(exc.got, 1))
            if n >= CODEBOOK_INIT_MAX_CROPS or more > CODEBOOK_INIT_MAX_CROPS:
                raise UserError(f"{key}: {exc} from {n} crops; the codebook is too "
                                f"large for {data.image_size}px crops (more than {CODEBOOK_INIT_MAX_CROPS} "
                                f"crops needed). Use fewer codes or switch {key} off") from None
            n = more
    if is_distributed():
        # EMA codebooks are buffers; a VectorQuantizer2 codebook is a parameter, which DDP
        # broadcasts from rank 0 when it wraps the model.
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
    report = {"crops": n, "vectors": tuple(drawn), "codes": tuple(model.codebook_sizes)}
    return {**report, "kmeans_iters": iters} if iters else report


def kmeans_start(model: nn.Module, images, seed: int, batch_size: int, iters: int) -> Tuple[int, ...]:
    """Each codebook of ``model`` becomes the k-means centroids of its encoder outputs of
    ``images`` (a count of 1 each for EMA codebooks); returns the vectors per codebook.
    Codebook ``i`` draws with ``seed + i`` (as the data start's second VQ-VAE-2 level)."""
    drawn = []
    for i, n_codes in enumerate(model.codebook_sizes):
        vectors = model.codebook_vectors(images, batch_size)[i]
        centroids = kmeans_codes(vectors, n_codes, seed + i, iters)
        model.set_codes(i, torch.arange(n_codes, device=vectors.device), centroids)
        drawn.append(int(vectors.shape[0]))
    return tuple(drawn)


__all__ = ["init_codebook_from_data", "kmeans_start", "CODEBOOK_INIT_CROPS", "CODEBOOK_INIT_MAX_CROPS"]
