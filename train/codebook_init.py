"""``train.init_codebook_from_data``: EMA codebooks start from encoder outputs of training crops.

    python -m train fit configs/demo_emavq.json --data builtin train.init_codebook_from_data=true

``adapters/ema_quantizer.py`` says why (upstream's N(0, 1) start leaves most codes unused).
Only a fresh run starts this way: a resumed run's codebook is the checkpoint's.
"""
from __future__ import annotations

import math
from typing import Dict

import torch.distributed as dist
from torch import nn

from adapters.distributed import is_distributed
from adapters.ema_quantizer import TooFewVectors
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
    ``{"crops", "vectors" (per codebook), "codes" (per codebook)}``.
    """
    init = model.init_codebook_from_data     # the contract's default refuses models without EMA codebooks
    if (cfg.model_args or {}).get("ckpt_path"):
        raise UserError("train.init_codebook_from_data would replace the codebook loaded from "
                        "model_args.ckpt_path; set train.init_codebook_from_data=false to keep it")
    seed, n = int(cfg.train.seed), CODEBOOK_INIT_CROPS
    while True:
        crops = (first_crops if isinstance(data, ShardSpec) else fixed_crops)(data, n, seed=seed)
        try:
            drawn = init(crops, seed=seed, batch_size=int(cfg.train.batch_size))
            break
        except TooFewVectors as exc:
            more = math.ceil(n * exc.needed / max(exc.got, 1))
            if n >= CODEBOOK_INIT_MAX_CROPS or more > CODEBOOK_INIT_MAX_CROPS:
                raise UserError(f"train.init_codebook_from_data: {exc} from {n} crops; the codebook is too "
                                f"large for {data.image_size}px crops (more than {CODEBOOK_INIT_MAX_CROPS} "
                                "crops needed). Use fewer codes or set train.init_codebook_from_data=false") from None
            n = more
    if is_distributed():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
    return {"crops": n, "vectors": tuple(drawn), "codes": tuple(model.codebook_sizes)}


__all__ = ["init_codebook_from_data", "CODEBOOK_INIT_CROPS", "CODEBOOK_INIT_MAX_CROPS"]
