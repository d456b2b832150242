"""``python -m train fit``: train a model from any supported config.

    python -m train fit CONFIG [--data PATH|builtin] [--out RUN_DIR] [--max-steps N]
                               [--resume RUN_DIR|CKPT] [key=value ...]
    torchrun --nproc_per_node=2 -m train fit CONFIG --data /images      # DDP, one process per GPU
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
             --rdzv-id JOB -m train fit CONFIG ...                      # on each node (README)
    srun --ntasks-per-node 8 python -m train fit CONFIG ...             # SLURM (train/launch.py)

* ``CONFIG``: a legacy JSON, taming YAML or native config (``train/config.py``);
  ``key=value`` overrides use the normalized names (``train.batch_size=4``).
* ``--data``: an image folder, a file list (one path per line), ``builtin`` or WebDataset
  shards (``'shards/train-{0000..0127}.tar'``, ``train/shards.py``); default:
  ``data.path`` of the config, then a taming ``CustomTrain`` data section.
* ``--out``: the run folder itself; default ``logs/<timestamp>_<name>/`` as taming's
  (rank 0's name on every rank).  Only global rank 0 writes it.
* ``--resume``: a run folder, a ``.ckpt`` written by this command, or a folder written by
  ``python -m train migrate``.  CONFIG may then be left out (the checkpoint's resolved
  config is used).  A run folder is continued in place unless ``--out`` says otherwise.

Exit codes: 0 trained (also when stopped by SIGTERM/SIGINT after saving), 1 training
stopped itself (e.g. too many non-finite steps), 2 unusable input.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import List, Optional, Tuple

from train.cli import CommandParser, check_out_path, positive_int
from train.errors import UserError
from train.sources import Source, locate


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m train fit", description="Train a VQ tokenizer from a config.")
    p.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]",
                   help="config file, then overrides such as train.batch_size=4")
    p.add_argument("--data", help="image folder, file list (one path per line), 'builtin' or tar shards "
                                     "('shards/train-{0000..0127}.tar')")
    p.add_argument("--out", help="run folder (default logs/<timestamp>_<name>/)")
    p.add_argument("--max-steps", type=positive_int, help="train up to this global step")
    p.add_argument("--resume", help="run folder, checkpoint file, or migrated folder to continue from")
    p.add_argument("--no-bar", action="store_true", help="plain log lines even on a terminal")
    return p


def split_items(items: List[str]) -> Tuple[Optional[str], List[str]]:
    """CONFIG is the one item without '='; the rest are key=value overrides."""
    configs = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if len(configs) > 1:
        raise UserError(f"fit: one config file expected, got {', '.join(configs)}; overrides are key=value")
    return (configs[0] if configs else None), overrides


def resolve_config(config_path: Optional[str], overrides: List[str], resume):
    """The run's typed config: CONFIG + overrides, or (resuming without CONFIG) the
    checkpoint's own resolved config + overrides."""
    from train.run_config import load_run_config, load_stored_config

    if config_path is not None:
        # Every validation error stops here, all at once, with its fix (e.g. a legacy
        # config's vqvae2 + EMAVQ mismatch) instead of training the wrong model.
        return load_run_config(config_path, overrides).cfg
    if resume is None:
        raise UserError("fit: no config file given; usage: python -m train fit CONFIG [--data PATH] "
                        "[--out RUN_DIR] [--max-steps N] [--resume RUN_DIR|CKPT] [key=value ...]")
    if resume.train_state:
        from train.checkpoint import load_state

        text = load_state(resume.weights).get("config")
        if text:
            return load_stored_config(text, f"{resume.path} (stored config)", overrides).cfg
    if resume.config_path:
        return load_run_config(resume.config_path, overrides).cfg
    raise UserError(f"--resume {resume.path}: no config.yaml next to it; pass the config file as well")


def resume_source(path: str) -> Source:
    """What ``--resume`` names, when a run can continue from it: a trainer checkpoint (a run
    folder or its .ckpt) or a migrated folder."""
    source = locate(path, "--resume")
    if source.kind == "upstream":
        from train.checkpoint import load_state

        load_state(source.weights)  # raises: unreadable, or "run `python -m train migrate` first"
    if not source.train_state and source.kind != "migrated":
        raise UserError(f"--resume {path}: {source.weights} holds model weights only, no training state; name a "
                        f"run folder with checkpoints/last.ckpt, a .ckpt file or a folder written by "
                        "`python -m train migrate`")
    return source


def stored_data_path(resume) -> Optional[str]:
    """``data.path`` of the run being resumed (set from its ``--data``), if it recorded one."""
    from train.config import load_yaml_text

    if resume.train_state:
        from train.checkpoint import load_state

        text, origin = load_state(resume.weights).get("config"), f"{resume.weights} (stored config)"
    elif resume.config_path:
        with open(resume.config_path, encoding="utf-8") as fh:
            text, origin = fh.read(), resume.config_path
    else:
        return None
    doc = load_yaml_text(text, origin)[0] if text else None
    data = doc.get("data") if isinstance(doc, dict) else None
    return data.get("path") if isinstance(data, dict) else None


def default_run_dir(name: str) -> str:
    """taming's naming: logs/<YYYY-mm-ddTHH-MM-SS>_<name>."""
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "run"
    return os.path.join("logs", f"{now}_{safe}")


def _shared_value(value):
    """Rank 0's ``value`` on every rank (e.g. the run folder's timestamped name: the nodes'
    clocks, and their working folders, differ)."""
    import torch.distributed as dist

    from adapters.distributed import is_distributed

    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _prepare(args, config_path: Optional[str], overrides: List[str]):
    """This rank's config, data, resume source and proposed run folder (rank 0's wins).

    Each rank reads its own node's files: the config, the data (every rank reads images)
    and the checkpoint to resume (every rank restores it)."""
    from adapters.distributed import rank
    from train.data import data_argument, is_shard_pattern, resolve_data
    from train.shards import resolve_shards

    # Command-line mistakes first, in milliseconds, before minutes of start-up.
    data_path = data_argument(args.data) if args.data is not None else None
    if args.out is not None and rank() == 0:    # the writer's file system decides
        check_out_path(args.out, "folder", "fit")
    resume = resume_source(args.resume) if args.resume else None
    cfg = resolve_config(config_path, overrides, resume)
    if data_path is not None:
        # Recorded in the run's config.yaml, so a resume needs no --data.
        cfg.data.path = data_path
    elif resume is not None and config_path is not None and cfg.data.path is None:
        # A config given next to --resume: the data the run recorded.  (Without one, cfg is
        # the run's own config and already carries it: no second read of the checkpoint.)
        cfg.data.path = stored_data_path(resume)
    # No header scan: a million files start as fast as a thousand (bad ones are skipped and
    # counted when training reaches them).
    data = resolve_shards(cfg) if is_shard_pattern(cfg.data.path) else resolve_data(cfg, scan=False)
    run_dir = args.out or (resume.run_dir if resume is not None else None) or default_run_dir(cfg.name)
    return cfg, data, resume, run_dir


def _check_same_data(data) -> None:
    """Every rank must read the same image list: ranks split it by position, and
    ``train.max_epochs`` becomes a step count through its length.  Copies that differ
    between nodes (a file missing, or unreadable, on one of them) would silently overlap
    the ranks' shares, or end one rank's training early while the others wait for it.
    A collective: every rank must call it."""
    import hashlib
    import socket

    import torch.distributed as dist

    from adapters.distributed import is_distributed

    if not is_distributed():
        return
    # Shards: the shard list and the indexed sample counts (their paths list is empty).
    names = list(getattr(data, "shards", None) or data.paths)
    names += [str(n) for n in (getattr(data, "counts", None) or ())]
    digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (len(names), digest, socket.gethostname()))
    count0, digest0, host0 = everyone[0]
    odd = [(r, n, h) for r, (n, d, h) in enumerate(everyone) if (n, d) != (count0, digest0)]
    if odd:
        seen = "; ".join(f"rank {r} on {h}: {n}" for r, n, h in odd[:3])
        raise UserError(f"the ranks read different images (rank 0 on {host0}: {count0} files; {seen}"
                        f"{'; ...' if len(odd) > 3 else ''}); --data must name the same files on every node: "
                        "a shared file system, or identical copies at the same path")


def _check_run_dir(run_dir: str, resume) -> None:
    from train.checkpoint import LAST

    check_out_path(run_dir, "folder", "fit")
    if resume is None and os.path.isfile(os.path.join(run_dir, "checkpoints", LAST)):
        raise UserError(f"--out {run_dir} already holds a run (checkpoints/{LAST}); continue it with "
                        f"--resume {run_dir}, or choose another --out")


def cli_main(argv: List[str]) -> int:
    return run(argv)[0]


def run(argv: List[str]):
    """``cli_main`` that also returns the :class:`~train.trainer.Trainer` (None when it was not
    built): ``(exit code, trainer)``.  Tests and the demo inspect the trained model this way."""
    args = build_parser().parse_intermixed_args(argv)
    config_path, overrides = split_items(args.items)
    if args.max_steps is not None:
        overrides = [o for o in overrides if not o.startswith("train.max_steps=")]
        overrides.append(f"train.max_steps={args.max_steps}")

    from train.launch import init_distributed
    from train.rank_sync import agreed

    # Join the other processes first: each rank checks its own node's files below, and a
    # rank that fails alone must stop the others rather than leave them waiting for it.
    started_dist = init_distributed()
    try:
        from adapters.distributed import rank

        cfg, data, resume, proposed = agreed(lambda: _prepare(args, config_path, overrides))
        _check_same_data(data)
        run_dir = _shared_value(proposed)
        # Only rank 0 writes the run folder, so only its file system has a say.
        agreed(lambda: _check_run_dir(run_dir, resume), main_only=True)

        from train.trainer import Trainer, TrainingStopped

        trainer = Trainer(cfg, data, run_dir, resume=resume, use_bar=False if args.no_bar else None)
        try:
            result = trainer.fit()
        except TrainingStopped as exc:
            if rank() == 0:
                print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code, trainer
        if rank() == 0:
            print(f"done: step {result.steps} in {result.seconds:.0f}s; run folder {result.run_dir}"
                  + (f"; last grid {result.last_grid}" if result.last_grid else ""))
        return 0, trainer
    finally:
        if started_dist:
            import torch.distributed as dist

            dist.destroy_process_group()


__all__ = ["cli_main", "run", "build_parser", "resolve_config", "default_run_dir"]
