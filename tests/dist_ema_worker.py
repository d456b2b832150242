"""Data and quantizer of the EMA job of tests/dist_worker.py (and of its single-process
reference in tests/test_ema_quantizer.py): each rank quantizes its own batches (different
data per rank); only the quantizer's own all-reduce can keep the codebooks equal."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from adapters.ema_quantizer import EMAVectorQuantizer  # noqa: E402

N_EMBED, DIM = 16, 4


def make_quantizer() -> EMAVectorQuantizer:
    torch.manual_seed(0)  # the same initial codebook everywhere
    return EMAVectorQuantizer(N_EMBED, DIM, decay=0.8).train()


def make_data(rank: int, steps: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    # rank-dependent offset: the ranks' data distributions really differ
    return torch.randn(steps, 3, DIM, 4, 4, generator=gen) + 2.0 * rank


def run_updates(q: EMAVectorQuantizer, batches) -> None:
    for z in batches:
        q(z)
