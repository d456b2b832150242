"""Code usage: how much of each codebook the codes of a run cover.

    python -m train fit CONFIG --data /images    # logs codebook/usage, codebook/perplexity
    python -m train eval RUN_DIR --data /images  # its "codebooks" section

``usage`` is the fraction of codes drawn at least once; ``perplexity`` is exp of the entropy
of the code histogram, the "effective number of codes" (the codebook size when every code
is drawn equally often, 1 when one code takes everything).  Both are computed from
histograms (counts per code), so they can be summed over batches and ranks first.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.distributed as dist

from adapters.distributed import is_distributed

STATS = ("usage", "perplexity")


def codebook_stats(counts: torch.Tensor) -> Dict[str, float]:
    """Usage (fraction of codes used) and perplexity (exp entropy) of code counts."""
    total = counts.sum()
    if total <= 0:
        return {"usage": 0.0, "perplexity": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


def add_codes_(counts: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Add ``codes`` (any shape) to the histogram ``counts``; returns, as a 0-dim tensor, how
    many were outside ``[0, len(counts))`` and left out (e.g. a remapped quantizer's
    "unknown" index).  Out-of-range codes go to one extra bin instead of being masked out,
    so the training loop's call never waits for the device."""
    n = counts.numel()
    codes = codes.reshape(-1).to(counts.device)
    inside = (codes >= 0) & (codes < n)
    # index_add_, not bincount: CUDA's bincount reads the largest code on the host to size
    # its output, a synchronisation per call.
    binned = torch.zeros(n + 1, dtype=counts.dtype, device=counts.device)
    binned.index_add_(0, torch.where(inside, codes, torch.full_like(codes, n)),
                      torch.ones(codes.shape, dtype=counts.dtype, device=counts.device))
    counts += binned[:n]
    return binned[n]


def log_key(stat: str, index: int, n_codebooks: int) -> str:
    """``codebook/usage`` for a single codebook, ``codebook/usage_0``, ``_1``... for several."""
    return f"codebook/{stat}" if n_codebooks == 1 else f"codebook/{stat}_{index}"


class CodeCounts:
    """Histograms of every codebook, summed between two log lines of the training loop."""

    def __init__(self, sizes: Sequence[int], device: torch.device):
        self.counts = [torch.zeros(n, device=device) for n in sizes]

    def add(self, codes: Sequence[torch.Tensor]) -> None:
        for counts, c in zip(self.counts, codes):
            add_codes_(counts, c)

    def pop_logs(self) -> Dict[str, float]:
        """The window's usage and perplexity per codebook over all ranks (a collective under
        torchrun); the histograms start again from zero."""
        logs: Dict[str, float] = {}
        for i, counts in enumerate(self.counts):
            if is_distributed():
                dist.all_reduce(counts)
            for name, value in codebook_stats(counts).items():
                logs[log_key(name, i, len(self.counts))] = value
            counts.zero_()
        return logs


__all__ = ["codebook_stats", "add_codes_", "log_key", "CodeCounts"]
