"""``train.dead_code_threshold``: codes nobody picks are restarted from encoder outputs.

    python -m train fit configs/modern_recipe.yaml --data builtin train.dead_code_threshold=0.05 \
        train.dead_code_every=20

A code that the encoder outputs never reach gets no EMA update (EMA codebooks) and no
gradient (``VectorQuantizer2``): it stays dead.  Restarting dead codes from current encoder
outputs is Jukebox's remedy (Dhariwal et al. 2020, "random restart"; also SoundStream and
VQGAN-LC's reports of usage near 100 %).  Here:

* ``usage``: one float32 vector per codebook (not in the model's state dict, so taming's keys
  stay as they are), ``usage = 0.99 usage + 0.01 count``, where ``count`` is how often each
  code was picked in the optimizer step (all micro-batches), summed over ranks -- one small
  all-reduce per step and no host sync;
* every ``dead_code_every`` steps, the codes with ``usage < threshold`` are restarted: each
  becomes one encoder output of this step's last micro-batch (rank 0's, sampled without
  replacement where there are enough, by a generator seeded from the run seed and the step:
  deterministic, no global RNG), through the contract's ``set_codes`` (EMA codebooks: the
  new vector as ``embed_avg`` and a count of 1); their ``usage`` restarts at the threshold.
  Rank 0's new codes are then broadcast, so every rank holds the same codebook;
* the checkpoint stores ``usage`` (``dead_codes``), so a resumed run restarts the same codes
  at the same steps (tested).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from adapters.distributed import all_reduce_sum_, is_distributed

USAGE_DECAY = 0.99


class DeadCodeRestart:
    def __init__(self, model: nn.Module, threshold: float, every: int, seed: int, device: torch.device):
        self.model = model
        self.threshold, self.every, self.seed = float(threshold), int(every), int(seed)
        self.sizes = tuple(int(n) for n in model.codebook_sizes)
        self.usage = [torch.zeros(n, device=device) for n in self.sizes]
        self._counts = [torch.zeros(n, device=device) for n in self.sizes]
        self.restarted = 0          # codes restarted over the run (host int, for the log)

    def observe(self, codes: Sequence[torch.Tensor]) -> None:
        """Count one micro-batch's code maps (on the device)."""
        for acc, c, n in zip(self._counts, codes, self.sizes):
            acc += torch.bincount(c.reshape(-1), minlength=n).to(acc.dtype)

    def after_step(self, step: int, images: Optional[torch.Tensor]) -> int:
        """Fold the step's counts into ``usage``; every ``every`` steps (``step`` counts
        finished steps) restart dead codes from ``images``.  Returns the codes restarted."""
        counts = torch.cat(self._counts)
        all_reduce_sum_(counts)
        for u, c in zip(self.usage, counts.split(self.sizes)):
            u.mul_(USAGE_DECAY).add_(c, alpha=1 - USAGE_DECAY)
        for acc in self._counts:
            acc.zero_()
        if step % self.every or images is None:
            return 0
        return self.restart(step, images)

    @torch.no_grad()
    def restart(self, step: int, images: torch.Tensor) -> int:
        dead = [torch.nonzero(u < self.threshold).flatten() for u in self.usage]   # a host sync, every N steps
        if not any(d.numel() for d in dead):
            return 0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        changed: List[torch.Tensor] = []
        done = 0
        for i, ids in enumerate(dead):
            if not ids.numel():
                continue
            # Recomputed per codebook: VQ-VAE-2's bottom vectors depend on the (new) top codes.
            vectors = self.model.codebook_vectors(images)[i]
            n = vectors.shape[0]
            pick = (torch.randperm(n, generator=gen)[:ids.numel()] if n >= ids.numel()
                    else torch.randint(n, (ids.numel(),), generator=gen))
            changed += self.model.set_codes(i, ids, vectors[pick.to(vectors.device)])
            self.usage[i][ids] = self.threshold
            done += int(ids.numel())
        if is_distributed():
            for t in changed:
                dist.broadcast(t, src=0)
        self.restarted += done
        return done

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f"usage.{i}": u for i, u in enumerate(self.usage)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for i, u in enumerate(self.usage):
            u.copy_(state[f"usage.{i}"])


__all__ = ["DeadCodeRestart", "USAGE_DECAY"]
