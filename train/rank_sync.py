"""Keeping torchrun ranks in agreement, and checking at the end of a run that they are.

    torchrun --nproc_per_node=2 -m train fit CONFIG --data /images   # writes ranks_in_sync.json

DDP wraps only the model, so what it does not cover is done here: decisions that change
control flow (a bad step, a stop request, the time limit) are agreed on by all ranks before
anyone acts, so no rank waits forever in a collective the others skipped (:class:`StepVote`:
all of one step's decisions in one all-reduce and one host read); the discriminator's
gradients and BatchNorm statistics are averaged by hand.  The collectives are no-ops in a
single process.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from adapters.distributed import is_distributed
from train.errors import UserError
from train.logger import RunLogger

T = TypeVar("T")


class StepVote:
    """Every per-step decision of every rank in one all-reduce and one host read.

    During a step the loop raises named flags: from tensors on the device (a non-finite loss
    or gradient norm, accumulated there without reading it) or from host values (a stop
    signal, the time limit).  :meth:`read` then runs one ``all_reduce(MAX)`` under torchrun
    and copies the flags to the host once: the step's one host-device synchronisation.  A
    flag reads True when any rank raised it, so every rank takes the same branch.  (The
    usual way to keep an asynchronous device busy, as in Megatron-LM's and nanoGPT's loops:
    read back one small tensor per step, not one scalar per check.)
    """

    def __init__(self, names: Sequence[str], device: torch.device):
        self.names = list(dict.fromkeys(names))
        self.index = {name: i for i, name in enumerate(self.names)}
        self.flags = torch.zeros(len(self.names), device=device)

    def clear(self) -> None:
        self.flags.zero_()

    def raise_if_nonfinite(self, name: str, value: torch.Tensor) -> None:
        """Raise ``name`` when any element of ``value`` is NaN or inf (no host read)."""
        i = self.index[name]
        self.flags[i].add_((~torch.isfinite(value.detach())).any().to(self.flags.dtype))

    def raise_if(self, name: str, flag: bool) -> None:
        """Raise ``name`` when the host value ``flag`` is true (no copy when it is not)."""
        if flag:
            self.flags[self.index[name]].fill_(1.0)

    def read(self) -> Dict[str, bool]:
        """``{name: raised on any rank}`` (a collective under torchrun: every rank calls it)."""
        if is_distributed():
            dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)
        values = self.flags.tolist()
        return {name: values[i] > 0 for name, i in self.index.items()}


def agreed(work: Callable[[], T], main_only: bool = False) -> T:
    """Run ``work`` (on every rank, or on rank 0 alone) and stop every rank if it failed on any.

    Start-up checks read each node's own files (the config, ``--data``, the checkpoint to
    resume); a rank that failed alone used to leave the others waiting for it in the first
    collective (or dying there with a network traceback).  Here every rank learns who
    failed and why, and raises: the failing rank its own exception, the others a
    :class:`UserError` naming that rank and its host (``main_only``: rank 0 decided for
    everyone, so its message is repeated as it is).  A collective: every rank must call it.
    """
    error, result = None, None
    if not main_only or not is_distributed() or dist.get_rank() == 0:
        try:
            result = work()
        except Exception as exc:     # noqa: BLE001 - re-raised below, after telling the others
            error = exc
    if is_distributed():
        mine = None if error is None else (str(error), getattr(error, "exit_code", 2), socket.gethostname())
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        failed = [(r, f) for r, f in enumerate(everyone) if f is not None]
        if failed and error is None:
            r, (message, code, host) = failed[0]
            exc = UserError(message if main_only else f"rank {r} (on {host}) stopped: {message}")
            exc.exit_code = code
            raise exc
    if error is not None:
        raise error
    return result


def average_across_ranks_(tensors: List[torch.Tensor]) -> None:
    """In-place mean over ranks (discriminator gradients / buffers; DDP wraps only the model)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def state_digest(tensors: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """sha256 of every tensor's bytes (to compare ranks)."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}


def combined_digest(digests: Dict[str, str]) -> str:
    """One sha256 over every tensor's name and digest (from :func:`state_digest`)."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode("utf-8")).hexdigest()


def check_ranks_in_sync(model: nn.Module, discriminator: Optional[nn.Module], step: int,
                        run_dir: Optional[str], log: RunLogger) -> None:
    """Under torchrun: compare every weight and buffer (EMA codebooks included) across ranks.

    Rank 0 writes the verdict to ``ranks_in_sync.json`` (with each rank's host, local rank
    and :func:`combined_digest`) and warns when they differ.
    """
    if not is_distributed():
        return
    tensors = dict(model.state_dict())
    if discriminator is not None:
        tensors.update({f"discriminator.{k}": v for k, v in discriminator.state_dict().items()})
    mine = state_digest(tensors)
    world = dist.get_world_size()
    everyone = [None] * world
    # Who each rank is (global rank, its node and place there) and one digest of its whole
    # state, so each node's own final state can be compared with the saved checkpoint.
    me = {"rank": dist.get_rank(), "local_rank": int(os.environ.get("LOCAL_RANK", "0") or 0),
          "host": socket.gethostname(), "pid": os.getpid(), "state_sha256": combined_digest(mine)}
    dist.all_gather_object(everyone, (mine, me))
    differing = sorted(k for k in mine if len({d.get(k) for d, _ in everyone}) > 1)
    if dist.get_rank() == 0:
        verdict = {"world_size": world, "step": step, "in_sync": not differing,
                   "tensors": len(mine), "differing": differing, "ranks": [who for _, who in everyone]}
        if run_dir:
            with open(os.path.join(run_dir, "ranks_in_sync.json"), "w", encoding="utf-8") as fh:
                json.dump(verdict, fh, indent=1)
        if differing:
            log.message(f"warning: {len(differing)} tensors differ between ranks (e.g. {differing[0]})")
        else:
            log.message(f"all {world} ranks hold identical weights and codebooks ({len(mine)} tensors)")


__all__ = ["StepVote", "agreed", "average_across_ranks_", "state_digest", "combined_digest",
           "check_ranks_in_sync"]
