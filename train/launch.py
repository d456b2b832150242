"""How a ``fit`` process learns its place among the others, and joins them.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             --rdzv-id JOB -m train fit CONFIG --data /shared/images --out /shared/runs/a
    srun --ntasks-per-node 8 python -m train fit CONFIG ...     # SLURM: one task per GPU

torchrun gives each worker ``RANK`` (its place among all processes), ``WORLD_SIZE``,
``LOCAL_RANK`` (its place on its own node: which GPU it drives) and ``MASTER_ADDR`` /
``MASTER_PORT``.  ``srun`` gives each task ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` and
``SLURM_LOCALID`` instead; :func:`slurm_variables` maps those to torch's names (the mapping
PyTorch Lightning's ``SLURMEnvironment`` also makes), so a plain ``srun`` launch needs no
wrapper script.  Global rank 0 is the only writer of the run folder; ``LOCAL_RANK`` only
picks the GPU, so node 1's first process (``LOCAL_RANK`` 0, ``RANK`` 8) never acts as main.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping

from train.errors import UserError

# torchrun's own default port, used when SLURM gives no job id to derive one from.
DEFAULT_PORT = 29500


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[007-010,12],cpu3`` -> ``gpu007``.

    SLURM compresses host lists into ``prefix[ranges]`` groups, separated by commas outside
    the brackets (``scontrol show hostnames`` expands them).  The first host is the first
    group with each bracket replaced by the start of its first range, zero padding kept.
    """
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    group = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0].strip(), group)


def slurm_variables(env: Mapping[str, str]) -> Dict[str, str]:
    """torch's launch variables for a task started by ``srun``; empty when not needed.

    Nothing is mapped under torchrun (``WORLD_SIZE`` already set, e.g. ``srun`` starting one
    torchrun per node), nor outside an ``srun`` step of several tasks: an ``sbatch``
    script's own environment has ``SLURM_PROCID`` and ``SLURM_NTASKS`` too, but no
    ``SLURM_STEP_NUM_TASKS``, and a single process there must not wait for partners.
    ``MASTER_ADDR`` defaults to the step's first node (task 0 runs there), ``MASTER_PORT``
    to 15000 + the job id's last four digits (Lightning's choice: jobs sharing a node get
    different ports).
    """
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return {}
    try:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
        proc, local = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
    except ValueError:
        raise UserError("SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS are not whole numbers; launch "
                        "with srun, or set RANK, WORLD_SIZE and LOCAL_RANK yourself") from None
    if tasks <= 1:
        return {}
    out = {"RANK": str(proc), "WORLD_SIZE": str(tasks), "LOCAL_RANK": str(local)}
    if not env.get("MASTER_ADDR"):
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise UserError("srun started several tasks but neither MASTER_ADDR nor SLURM_STEP_NODELIST is set; "
                            "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) "
                            "in the batch script")
        out["MASTER_ADDR"] = first_host(nodes)
    if not env.get("MASTER_PORT"):
        job = re.sub(r"\D", "", env.get("SLURM_JOB_ID", ""))
        out["MASTER_PORT"] = str(15000 + int(job[-4:]) if job else DEFAULT_PORT)
    return out


def cuda_index(env: Mapping[str, str], device_count: int) -> int:
    """The GPU this process drives: ``LOCAL_RANK`` (never ``RANK``, which counts over all
    nodes).  A launcher that gives each process its own GPU (SLURM's ``--gpus-per-task``
    or ``--gpu-bind``, one device visible) means device 0."""
    local = int(env.get("LOCAL_RANK", "0") or 0)
    if local < device_count:
        return local
    if device_count == 1:
        return 0
    raise UserError(f"LOCAL_RANK {local} but this node shows {device_count} GPU(s) (CUDA_VISIBLE_DEVICES "
                    f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {device_count} processes per "
                    "node (--nproc-per-node / --ntasks-per-node)")


def init_distributed() -> bool:
    """Join the other processes when launched by torchrun or srun (WORLD_SIZE > 1); the
    process group reads the variables from the environment (``env://``).

    True when this call created the process group (the caller destroys it)."""
    import torch
    import torch.distributed as dist

    env = os.environ
    env.update(slurm_variables(env))
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE {env.get('WORLD_SIZE')!r} is not a whole number; launch with torchrun "
                        "or srun") from None
    if world <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_index(env, torch.cuda.device_count()))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


__all__ = ["init_distributed", "slurm_variables", "cuda_index", "first_host"]
