"""``python -m train eval``: reconstruction metrics of a trained model on held-out images,
computed the way papers report them (rFID, PSNR, SSIM, LPIPS, codebook usage).

    python -m train eval RUN_DIR                        # the run's held-out data (builtin: chelsea, coffee)
    python -m train eval RUN_DIR/checkpoints/step-500.ckpt --data /images/val --num-images 500
    python -m train eval RUN_DIR --data /images/val --inception weights-inception-2015-12-05-6726825d.pth \\
        --json --out metrics.json --csv per_image.csv --grid grid.png
    torchrun --nproc_per_node=8 -m train eval RUN_DIR --data /images/val data.image_size=256

``SOURCE`` is one of

* a run folder written by ``python -m train fit`` (``checkpoints/last.ckpt``, else
  ``checkpoints/last.safetensors`` with the run's ``config.yaml``);
* a checkpoint file written by fit (``last.ckpt``, ``step-N.ckpt``; its resolved config is
  inside) or a ``.safetensors`` weights file next to a ``config.yaml`` (or in a run's
  ``checkpoints/``);
* a folder written by ``python -m train migrate`` (``config.yaml`` + ``model.safetensors``).

The model is built from the stored resolved config (``key=value`` overrides apply, with
the normalized names), the weights are loaded strictly (``adapters.weights``), and the
model runs in eval mode without gradients: EMA codebooks do not move, and the random
state (Gumbel sampling) is seeded and restored, so two evaluations print the same numbers.

Data (first that is set wins): ``--data`` (a folder, a file list or ``builtin``), then the
config's ``data.val_path``, the built-in held-out photographs when the run trained on
``builtin``, a taming ``validation`` file list; ``--split train`` evaluates on the training
images instead.  When the config names no held-out data the training images are used and
the report says so.  Folders and lists give one crop per file, taming's / LDM's validation
preprocessing: the shorter side resized to ``data.image_size`` (PIL bicubic), then the
centre square (``--num-images`` takes a fixed random subset); the built-in photographs
give ``--num-images`` (default 16, as ``python -m train demo``) random crops that are a
fixed function of ``--seed``.  Every metric compares a crop with the reconstruction of
that same crop.

Metrics (definitions and conventions: ``train/image_metrics.py``, ``train/fid.py``):

* ``psnr``, ``mse``, ``l1``, ``ssim``: averages of per-image values on the [0, 1] scale;
  SSIM by torchmetrics with ``data_range=1`` (default) or LlamaGen's convention
  (``--ssim-data-range 2``);
* ``rfid``: Frechet distance between Inception-v3 pool features of the crops and of their
  reconstructions (8-bit, as saved as PNG), torch-fidelity's extractor with weights from
  ``--inception FILE`` or the torch hub cache, computed in the same pass; ``--ref-stats``
  replaces the real side by saved statistics, ``--save-ref-stats`` saves it; null (with
  why) when no weights file is at hand and none was asked for;
* ``lpips``: taming's LPIPS (VGG16 trunk + the lpips package's linear weights), only with a
  real VGG16 file (``--vgg FILE``, ``train.vgg_ckpt_path`` or the torch hub cache); never
  a random trunk (``train.allow_random_vgg`` is ignored here); otherwise null, with why;
* ``codebooks``: per codebook (``top``/``bottom`` for vqvae2) the codes used, the used
  fraction and the perplexity ``exp(H)`` of the code histogram over all latent positions
  of the whole evaluated set.

Under ``torchrun`` each rank evaluates a contiguous block of the images; histograms,
feature sums and per-image rows are combined across ranks, and rank 0 prints and writes.

DinoVQ is evaluated on reconstructions only; its DINO teacher is not needed.

Exit codes: 0 evaluated, 1 the model produced non-finite reconstructions, 2 unusable input.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from train.cli import CommandParser, check_out_path, parse_device, positionals, positive_int
from train.checkpoint import LAST_WEIGHTS
from train.errors import UserError
from train.eval_report import format_report, json_safe, write_csv, write_grid, write_json, write_ref_stats
from train.image_metrics import SSIM_DATA_RANGES, pixel_errors, ssim, ssim_convention
from train.usage import add_codes_, codebook_stats
from train.sources import Source, locate, read_state
from train.weight_ema import add_weights_argument
from train.version import __version__

# Crops of the built-in photographs when --num-images is not given (the demo's count).
BUILTIN_CROPS = 16
# Seed of the evaluation crops (and of Gumbel sampling): the demo's held-out seed.
EVAL_SEED = 0
SPLITS = ("val", "train")
# Images in the reconstruction grid (--grid): inputs above reconstructions.
GRID_IMAGES = 8


# ----------------------------------------------------------------------------------------
# Metrics

def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (compared on the [0, 1] scale)."""
    return pixel_errors(x, y)["psnr"]


def codebook_report(counts: torch.Tensor, name: str) -> Dict[str, Any]:
    """Codes used, used fraction and perplexity (exp of the entropy) of one code histogram."""
    counts = counts.double()
    stats = codebook_stats(counts)
    return {"name": name, "codes": int(counts.numel()), "used": int((counts > 0).sum()),
            "usage": stats["usage"], "perplexity": stats["perplexity"], "positions": int(counts.sum())}


def reconstruct_with_codes(model, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(reconstruction, [code map per codebook])`` through the model contract."""
    xrec, _, codes = model(x, return_codes=True)
    return xrec, list(codes)


# ----------------------------------------------------------------------------------------
# What SOURCE names

def load_source(source: Source, overrides: Sequence[str] = (), weights: Optional[str] = None,
                command: str = "eval") -> Tuple[Any, Dict[str, torch.Tensor], Optional[int], str]:
    """``(cfg, model state dict, step, "ema" | "raw")`` for ``source`` (see the module
    docstring).  ``weights``: ``ema`` (the generator's weight EMA, ``train.ema_decay``),
    ``raw``, or None: ``ema`` when the source has it (``train/weight_ema.py``)."""
    from train.run_config import load_run_config, load_stored_config
    from train.weight_ema import choose_weights

    if source.weights.endswith(".safetensors") and source.config_path is None:
        if source.kind == "migrated":
            raise UserError(f"eval: {source.path} has model.safetensors but no config.yaml; re-run "
                            "`python -m train migrate` for this folder")
        if source.kind == "run":
            raise UserError(f"eval: {source.path} has checkpoints/{LAST_WEIGHTS} but no config.yaml to build the "
                            "model from; copy the run's config.yaml there")
        raise UserError(f"eval: no config.yaml next to {source.path} (or in its run folder); name the run "
                        "folder or put the run's config.yaml beside the weights")
    try:
        state = read_state(source)
    except UserError as exc:
        # load_state speaks to `fit --resume`; the same fix reads differently for eval.
        raise UserError(str(exc).replace("resume from its output folder", "evaluate its output folder")) from None
    step = state.get("global_step")
    step = int(step) if step is not None else None
    # A checkpoint file named on its own carries the config it was trained with; a run or
    # migrated folder is built from its config.yaml.
    text = state.get("config") if source.kind == "checkpoint" or source.config_path is None else None
    if text:
        cfg = load_stored_config(text, f"{source.weights} (stored config)", overrides, scope="model").cfg
    elif source.config_path is not None:
        cfg = load_run_config(source.config_path, overrides, scope="model").cfg
    else:
        raise UserError(f"eval: {source.weights} holds no config and no config.yaml is next to it; "
                        "name the run folder instead")
    model_sd, used = choose_weights(state["model"], state.get("model_ema"), weights, command)
    return cfg, model_sd, step, used


# ----------------------------------------------------------------------------------------
# Data

def eval_data(cfg, data_arg: Optional[str], split: str):
    """``(DataSpec, note or None)`` of the images to evaluate on (see the module docstring)."""
    from train.data import data_argument, no_image_message, resolve_data

    if split not in SPLITS:
        raise UserError(f"eval: --split {split!r} is unknown; valid choices: {', '.join(SPLITS)}")
    note = None
    if data_arg is not None:
        where = data_argument(data_arg)
        if split == "train":
            cfg.data.path = where
        elif where == "builtin":
            cfg.data.path, cfg.data.val_path = "builtin", None
        else:
            cfg.data.val_path = where
    if split == "val":
        spec = resolve_data(cfg, split="validation")
        if spec.source != "none":
            if not spec.paths:
                raise UserError("eval: " + no_image_message(spec.source, spec.unreadable, spec.problems))
            return spec, note
        if cfg.data.path is None and not (cfg.upstream and cfg.upstream.get("data")):
            raise UserError("eval: the config names no data (data.path, data.val_path); pass --data PATH "
                            "(an image folder or a file list) or --data builtin")
        note = ("the config names no held-out images (data.val_path): evaluating on the training images; "
                "pass --data PATH for a held-out set")
    spec = resolve_data(cfg, split="train")
    if not spec.source.startswith("builtin"):
        # One centre crop per file: the evaluation does not depend on the training crops.
        spec = replace(spec, random_crop=False, scale_range=(1.0, 1.0))
    return spec, note


def eval_indices(spec, num_images: Optional[int], seed: int) -> Tuple[List[int], Optional[str]]:
    """What to evaluate: file indices for folders and lists (every file, or a fixed random
    subset), sample numbers of ``ImageCrops`` for the built-in photographs (as many random
    crops as asked)."""
    import numpy as np

    n_files = len(spec.paths)
    if spec.random_crop:
        return list(range(num_images or BUILTIN_CROPS)), None
    if num_images is None or num_images >= n_files:
        note = (f"--num-images {num_images} is more than the {n_files} files: each file is evaluated once"
                if num_images is not None and num_images > n_files else None)
        return list(range(n_files)), note
    # A fixed random subset of the files, in file order (readable progress, stable output).
    pick = np.random.default_rng([seed, 2]).permutation(n_files)[:num_images]
    return sorted(int(i) for i in pick), None


class _Files(torch.utils.data.Dataset):
    """Centre crop of file ``i`` as uint8, or None when the file fails to decode (left out
    and counted: an evaluation should not silently measure another file in its place, as
    training does)."""

    def __init__(self, spec):
        self.spec = spec

    def __len__(self):
        return len(self.spec.paths)

    def __getitem__(self, i):
        import numpy as np

        from train.data import crop_image, load_rgb

        path = self.spec.paths[i]
        try:
            array = crop_image(load_rgb(path, self.spec.max_pixels), self.spec.image_size, np.random.default_rng(0),
                               False, (1.0, 1.0), self.spec.max_pixels)
        except Exception as exc:  # noqa: BLE001 - any decoding failure leaves the file out
            print(f"warning: leaving out unreadable image {path} ({type(exc).__name__}: {exc})", file=sys.stderr)
            return None
        return {"image": torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), "path": path, "index": int(i),
                "skipped": 0}


class _Numbered(torch.utils.data.Dataset):
    """``ImageCrops`` items with their sample number (the CSV's ``index``)."""

    def __init__(self, crops):
        self.crops = crops

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, k):
        return {**self.crops[k], "index": int(k)}


def _collate(items):
    good = [item for item in items if item is not None]
    images = torch.stack([item["image"] for item in good]) if good else torch.zeros(0)
    return {"image": images, "path": [str(item["path"]) for item in good],
            "index": [int(item["index"]) for item in good],
            "skipped": sum(int(item["skipped"]) for item in good) + len(items) - len(good)}


def make_batches(spec, indices: List[int], batch_size: int, seed: int, num_workers: int = 0):
    """A DataLoader yielding ``{"image", "path", "index", "skipped"}`` batches of the chosen
    samples, in order.

    Random-crop data (the built-in photographs) is read through ``ImageCrops``, so sample k
    is the crop ``fixed_crops`` (and the demo's held-out measurement) gives for k; folders and
    lists through :class:`_Files`, one centre crop per chosen file.
    """
    from train.data import ImageCrops, loader_workers

    dataset = _Numbered(ImageCrops(spec, seed)) if spec.random_crop else _Files(spec)
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=loader_workers(num_workers),
                                       collate_fn=_collate)


def preprocessing(spec) -> str:
    """How the evaluated crops are made (for the report)."""
    size = int(spec.image_size)
    if spec.random_crop:
        return (f"random {size}x{size} crops (seeded; shorter side rescaled to {size} px x U{tuple(spec.scale_range)}, "
                "PIL bicubic); reconstructions of the same crops")
    return (f"shorter side resized to {size} px (PIL bicubic), centre {size}x{size} crop (taming / LDM "
            "validation); reconstructions of the same crops")


def shard(indices: List[int]) -> List[int]:
    """This rank's contiguous block of ``indices`` under torchrun (all of them otherwise):
    rank 0 holds the first images (the grid), and the gathered rows keep the input order."""
    from adapters.distributed import rank, world_size

    n, world, r = len(indices), world_size(), rank()
    return indices[n * r // world:n * (r + 1) // world]


# ----------------------------------------------------------------------------------------
# LPIPS

def lpips_for_eval(cfg, vgg_arg: Optional[str], enabled: bool = True):
    """``(taming LPIPS module or None, note)``; None when no real VGG16 trunk is at hand.

    ``--vgg FILE`` is explicit user input: a missing or wrong file is an error.  A
    ``train.vgg_ckpt_path`` that is missing here (a run trained on another machine) or no
    hub-cache file means LPIPS is skipped, with the reason.
    """
    from losses.perceptual import build_taming_lpips, hub_vgg16_path

    how = "pass --vgg FILE (a torchvision vgg16 state dict)"
    if not enabled:
        return None, "skipped (--no-lpips)"
    if vgg_arg is not None:
        if not os.path.isfile(vgg_arg):
            raise UserError(f"eval: --vgg {vgg_arg}: no such file; {how}")
        return build_taming_lpips(vgg_arg, allow_random_vgg=False), f"VGG16 trunk {vgg_arg}"
    configured = cfg.train.vgg_ckpt_path
    if configured:
        path = os.path.expanduser(str(configured))
        if not os.path.isfile(path):
            return None, f"skipped: train.vgg_ckpt_path {configured} does not exist here; {how}"
    else:
        path = hub_vgg16_path()
        if not os.path.isfile(path):
            return None, (f"skipped: no VGG16 trunk (train.vgg_ckpt_path is not set and {path} does not exist; "
                          f"a random trunk is never used for evaluation); {how}")
    try:
        return build_taming_lpips(path, allow_random_vgg=False), f"VGG16 trunk {path}"
    except UserError as exc:
        return None, f"skipped: {exc}"


# ----------------------------------------------------------------------------------------
# The evaluation

def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr (rank 0, a terminal, not --quiet), else None."""
    from adapters.distributed import rank

    if not enabled or rank() != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="eval", dynamic_ncols=True, leave=False, file=sys.stderr)


def _gather_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every rank's per-image rows, in rank order (a collective under torchrun)."""
    import torch.distributed as dist

    from adapters.distributed import is_distributed, world_size

    if not is_distributed():
        return rows
    everyone: List[Any] = [None] * world_size()
    dist.all_gather_object(everyone, rows)
    return [row for part in everyone for row in part]


def _sum_across_ranks(counts: List[torch.Tensor], scalars: List[int], device: torch.device):
    """Histograms and counters summed over ranks (one all-reduce on ``device``: NCCL needs it)."""
    from adapters.distributed import all_reduce_sum_, is_distributed

    if not is_distributed():
        return counts, scalars
    flat = torch.cat([c.double() for c in counts] + [torch.tensor(scalars, dtype=torch.float64)]).to(device)
    all_reduce_sum_(flat)
    flat = flat.cpu()
    out, offset = [], 0
    for c in counts:
        out.append(flat[offset:offset + c.numel()].clone())
        offset += c.numel()
    return out, [int(v) for v in flat[offset:].round().tolist()]


@torch.no_grad()
def run_model(model, batches: Iterable[Dict[str, torch.Tensor]], device: torch.device,
              lpips=None, seed: int = EVAL_SEED, rfid=None, ssim_data_range: int = 1,
              grid_images: int = 0, progress=None) -> Dict[str, Any]:
    """Metrics of ``model`` over ``batches`` (see the module docstring), combined over
    torchrun ranks; ``rfid``: a :class:`train.fid.RFID` fed with every batch.

    Runs in eval mode without gradients; the global random state is seeded for the run
    (Gumbel sampling draws from it) and restored afterwards.  Besides the metrics the result
    holds ``rows`` (per-image values, every rank's) and ``grid`` (this rank's first
    ``grid_images`` inputs and reconstructions, or None).
    """
    from train.data import to_model_range

    was_training = model.training
    model.eval()
    names = list(model.codebook_names)
    counts = [torch.zeros(n, dtype=torch.float64) for n in tuple(model.codebook_sizes)]
    rows: List[Dict[str, Any]] = []
    skipped, out_of_range, non_finite = 0, 0, 0
    grid: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = ([], []) if grid_images > 0 else None
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in batches:
                skipped += int(torch.as_tensor(batch.get("skipped", 0)).sum())
                if batch["image"].numel() == 0:
                    continue
                raw = batch["image"].to(device)
                x = to_model_range(raw)     # uint8 crops (data workers) or float crops
                xrec, codes = reconstruct_with_codes(model, x)
                if tuple(xrec.shape) != tuple(x.shape):
                    raise ValueError("{}x{} px in, {}x{} px out".format(*x.shape[-2:], *xrec.shape[-2:]))
                xrec = xrec.float()
                non_finite += int((~torch.isfinite(xrec)).flatten(1).any(1).sum())
                per_image = {k: v.double().cpu() for k, v in pixel_errors(x, xrec).items()}
                per_image["ssim"] = ssim(x, xrec, ssim_data_range)
                if lpips is not None:
                    per_image["lpips"] = lpips(x, xrec.clamp(-1, 1)).double().reshape(-1).cpu()
                if rfid is not None:
                    rfid.add(raw, xrec)
                for c, idx in zip(counts, codes):
                    out_of_range += int(add_codes_(c, idx.long().cpu()))   # e.g. remap's "extra" unknown index
                paths = batch.get("path") or [""] * x.shape[0]
                numbers = batch.get("index") or list(range(len(rows), len(rows) + x.shape[0]))
                for i in range(x.shape[0]):
                    rows.append({"index": int(numbers[i]), "path": str(paths[i]),
                                 **{k: float(v[i]) for k, v in per_image.items()}})
                if grid is not None and sum(t.shape[0] for t in grid[0]) < grid_images:
                    grid[0].append(x.cpu())
                    grid[1].append(xrec.cpu())
                if progress is not None:
                    progress.update(x.shape[0])
    finally:
        model.train(was_training)
        if progress is not None:
            progress.close()
    counts, (skipped, out_of_range, non_finite) = _sum_across_ranks(counts, [skipped, out_of_range, non_finite],
                                                                    device)
    rows = _gather_rows(rows)
    n_images = len(rows)
    if n_images == 0:
        why = f" ({skipped} could not be decoded)" if skipped else ""
        raise UserError(f"eval: no image to evaluate{why}; check --data and the files")
    result: Dict[str, Any] = {key: sum(r[key] for r in rows) / n_images for key in ("psnr", "ssim", "mse", "l1")}
    result["lpips"] = sum(r["lpips"] for r in rows) / n_images if lpips is not None else None
    result["num_images"] = n_images
    result["skipped_images"] = skipped
    result["codebooks"] = [codebook_report(c, name) for c, name in zip(counts, names)]
    if out_of_range:
        result["codes_out_of_range"] = out_of_range
    result["non_finite_images"] = non_finite
    result["rows"] = rows
    result["grid"] = None if grid is None or not grid[0] else \
        (torch.cat(grid[0])[:grid_images], torch.cat(grid[1])[:grid_images])
    return result


def _rfid_result(rfid, non_finite: int, n_images: int):
    """``(rfid or None, note, real-side statistics or None)`` after the pass (a collective)."""
    try:
        value, real_stats = rfid.finish()
    except ValueError as exc:
        return None, f"not computed: {exc}", None
    if non_finite:
        return None, f"not computed: {non_finite} reconstruction(s) are not finite", real_stats
    side = "saved reference statistics" if rfid.real is None else f"{n_images} real crops"
    return value, f"{side} vs {n_images} reconstructions", real_stats


def prepare_rfid(inception: Optional[str], fid: bool, ref_stats: Optional[str], save_ref_stats: Optional[str],
                 device: torch.device):
    """``(RFID or None, settings, note)`` for the run: the Inception extractor and, with
    ``ref_stats``, the saved real side.  Weights are required when asked for (``--inception``,
    ``--ref-stats``, ``--save-ref-stats``); otherwise the torch hub cache is used when it
    holds the file, and rFID is skipped with why when it does not."""
    from train import fid as fidlib

    if not fid:
        if ref_stats or save_ref_stats or inception:
            raise UserError("eval: --no-fid with --inception/--ref-stats/--save-ref-stats; drop one of them")
        return None, None, "skipped (--no-fid)"
    if ref_stats and save_ref_stats:
        raise UserError("eval: --ref-stats and --save-ref-stats together; the statistics to save would be the ones "
                        "read; pass one of them")
    path = fidlib.find_inception(inception, required=bool(ref_stats or save_ref_stats))
    if path is None:
        return None, None, (f"skipped: no Inception weights ({fidlib.hub_inception_path()} does not exist); "
                            + fidlib.how_to_get_inception())
    ref = fidlib.load_ref_stats(ref_stats) if ref_stats else None   # a bad file fails before the model runs
    extractor, info = fidlib.load_inception(path, device)
    settings = dict(info)
    if ref is not None:
        settings["ref_stats"] = {"file": os.path.abspath(ref_stats), **ref[2]}
    return fidlib.RFID(extractor, ref=None if ref is None else ref[:2]), settings, None


def _ref_stats_notes(settings: Dict[str, Any], image_size: int, preprocess: str) -> List[str]:
    """Where saved reference statistics were made differently from this evaluation."""
    ref = settings.get("ref_stats") or {}
    notes = []
    for key, here in (("image_size", str(image_size)), ("inception_sha256", settings["sha256"]),
                      ("preprocessing", preprocess)):
        if key in ref and ref[key] != here:
            notes.append(f"--ref-stats {ref['file']} was computed with {key} {ref[key]}, this evaluation uses {here}: "
                         "the rFID compares different things")
    return notes


def evaluate(source: str, data: Optional[str] = None, split: str = "val", num_images: Optional[int] = None,
             batch_size: Optional[int] = None, overrides: Sequence[str] = (), vgg: Optional[str] = None,
             lpips: bool = True, seed: int = EVAL_SEED, device: Optional[str] = None,
             inception: Optional[str] = None, fid: bool = True, ref_stats: Optional[str] = None,
             save_ref_stats: Optional[str] = None, ssim_data_range: int = 1, csv: Optional[str] = None,
             grid: Optional[str] = None, progress: bool = False,
             weights: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``source`` (see the module docstring); returns the report as a plain dict.
    ``save_ref_stats``, ``csv`` and ``grid`` are written (atomically, by rank 0) on the way."""
    from adapters import build_model
    from adapters.distributed import rank
    from adapters.weights import load_model_weights

    started = time.time()
    if ssim_data_range not in SSIM_DATA_RANGES:
        raise UserError(f"eval: --ssim-data-range {ssim_data_range}; valid: "
                        f"{', '.join(map(str, SSIM_DATA_RANGES))} (1: [0, 1] images, taming / LDM; 2: LlamaGen's)")
    src = locate(source, "eval:")
    cfg, state_dict, step, weights_used = load_source(src, overrides, weights)
    spec, data_note = eval_data(cfg, data, split)
    indices, count_note = eval_indices(spec, num_images, seed)
    bs = int(batch_size or cfg.train.batch_size)

    try:
        model = build_model(cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"eval: the stored config does not build a {cfg.model_type} model ({exc}); check the "
                        "model_args overrides") from None
    load_model_weights(model, state_dict, strict=True, source=src.weights)
    if step is not None:
        model.before_step(step)   # e.g. GumbelVQ: the temperature the run had reached
    dev = torch.device(device) if device else _default_device()
    model.to(dev)
    lpips_module, lpips_note = lpips_for_eval(cfg, vgg, lpips)
    if lpips_module is not None:
        lpips_module = lpips_module.to(dev)
    rfid, inception_settings, rfid_note = prepare_rfid(inception, fid, ref_stats, save_ref_stats, dev)
    preprocess = preprocessing(spec)

    mine = shard(indices)
    try:
        metrics = run_model(model, make_batches(spec, mine, bs, seed, cfg.train.num_workers), dev,
                            lpips=lpips_module, seed=seed, rfid=rfid, ssim_data_range=ssim_data_range,
                            grid_images=GRID_IMAGES if grid else 0, progress=_progress(len(mine), progress))
    except ValueError as exc:
        # e.g. an image size the model cannot take (vqvae2: multiples of 8; DinoVQ: img_size)
        raise UserError(f"eval: the model cannot reconstruct {spec.image_size} px images ({exc}); "
                        "set data.image_size=N to a size it was trained for") from None
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"eval: out of GPU memory at batch size {bs}; pass a smaller --batch-size") from None
    rows, grid_images = metrics.pop("rows"), metrics.pop("grid")
    metrics["rfid"], real_stats = None, None
    if rfid is not None:
        metrics["rfid"], rfid_note, real_stats = _rfid_result(rfid, metrics["non_finite_images"],
                                                              metrics["num_images"])
        rfid_note += (f"; Inception {os.path.basename(inception_settings['file'])}"
                      + ("" if inception_settings["standard"] else " (not the standard file)"))

    notes = [n for n in (data_note, count_note) if n]
    if spec.unreadable:
        notes.append(f"{len(spec.unreadable)} unreadable file(s) left out (e.g. {spec.unreadable[0]})")
    if inception_settings is not None:
        notes += _ref_stats_notes(inception_settings, int(spec.image_size), preprocess)
    if save_ref_stats and real_stats is None:
        notes.append(f"--save-ref-stats {save_ref_stats} not written: {rfid_note}")
    report = {
        "source": source, "kind": src.kind, "weights": src.weights, "weights_used": weights_used, "step": step,
        "model_type": cfg.model_type, "model_variant": cfg.model_variant,
        "data": spec.source, "split": "train" if data_note or split == "train" else "val",
        "image_size": int(spec.image_size), "crops": "random (seeded)" if spec.random_crop else "centre",
        "seed": int(seed), "device": str(dev),
        **metrics,
        "rfid_note": rfid_note,
        "lpips_note": lpips_note,
        "pixel_scale": "[0, 1]",
        "settings": {
            "image_size": int(spec.image_size), "preprocessing": preprocess, "num_images": metrics["num_images"],
            "pixels": "inputs and reconstructions (clamped to [-1, 1]) mapped to [0, 1]; PSNR/SSIM/MSE/L1 on floats, "
                      "rFID on 8-bit images (round((x + 1) * 127.5))",
            "ssim": ssim_convention(ssim_data_range),
            "inception": inception_settings,
            "codebook_usage": "histogram of the codes of every latent position of every evaluated image",
            "tool_version": __version__,
        },
        "notes": notes,
    }
    if rank() == 0:
        if save_ref_stats and real_stats is not None:
            write_ref_stats(save_ref_stats, real_stats, {
                "image_size": int(spec.image_size), "inception_sha256": inception_settings["sha256"],
                "preprocessing": preprocess, "num_images": metrics["num_images"], "data": spec.source,
                "tool_version": __version__})
            report["settings"]["saved_ref_stats"] = os.path.abspath(save_ref_stats)
        if csv:
            write_csv(rows, csv)
        if grid and grid_images is not None:
            write_grid(grid_images[0], grid_images[1], grid)
    report["seconds"] = round(time.time() - started, 3)
    return report


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m train eval",
                description="Reconstruction metrics (rFID, PSNR, SSIM, MSE, L1, LPIPS, codebook usage) of a checkpoint.")
    p.add_argument("items", nargs="*", metavar="SOURCE [key=value ...]",
                   help="run folder, checkpoint file or migrated folder, then config overrides")
    p.add_argument("--data", help="image folder, file list (one path per line) or 'builtin' "
                                  "(default: the config's held-out data)")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="val: held-out images (default); train: the training images")
    p.add_argument("--num-images", type=positive_int,
                   help=f"images to evaluate (default: every file; builtin: {BUILTIN_CROPS} crops)")
    p.add_argument("--batch-size", type=positive_int, help="images per forward (default train.batch_size)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help=f"seed of the crops (default {EVAL_SEED})")
    p.add_argument("--inception", metavar="FILE",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth for rFID (default: the "
                        "torch hub cache's copy; never downloaded)")
    p.add_argument("--no-fid", action="store_true", help="do not compute rFID")
    p.add_argument("--ref-stats", metavar="FILE.npz", help="real-side Inception statistics (mu, sigma) to use "
                                                           "instead of computing them")
    p.add_argument("--save-ref-stats", metavar="FILE.npz", help="save the real side's statistics (mu, sigma)")
    p.add_argument("--ssim-data-range", type=int, choices=SSIM_DATA_RANGES, default=1,
                   help="1: SSIM on [0, 1] with data_range 1 (taming / LDM, default); 2: LlamaGen's convention")
    p.add_argument("--vgg", help="torchvision vgg16 state-dict file for LPIPS (default train.vgg_ckpt_path "
                                 "or the torch hub cache)")
    p.add_argument("--no-lpips", action="store_true", help="do not compute LPIPS")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_weights_argument(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--csv", metavar="FILE", help="write per-image metrics (index, path, psnr, ssim, mse, l1, lpips)")
    p.add_argument("--grid", metavar="FILE.png", help=f"write the first {GRID_IMAGES} inputs over their "
                                                      "reconstructions as PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def cli_main(argv: List[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    (source,), overrides = positionals(args.items, "eval", 1, "one SOURCE",
                                       "python -m train eval RUN_DIR|CKPT|MIGRATED_DIR [--data PATH|builtin] "
                                       "[--split val|train] [--num-images N] [--json] [key=value ...]")
    if args.device is not None:
        parse_device(args.device, "eval")
    # Output paths are checked before the evaluation, which can take long, rather than at the end.
    for flag, value in (("--out", args.out), ("--csv", args.csv), ("--grid", args.grid),
                        ("--save-ref-stats", args.save_ref_stats)):
        if value is not None:
            check_out_path(value, "file", "eval", flag)

    from train.launch import init_distributed

    started_dist = init_distributed()
    try:
        return _run_cli(args, source, overrides)
    finally:
        if started_dist:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_cli(args, source: str, overrides: List[str]) -> int:
    from adapters.distributed import rank

    report = evaluate(source, data=args.data, split=args.split, num_images=args.num_images,
                      batch_size=args.batch_size, overrides=overrides, vgg=args.vgg, lpips=not args.no_lpips,
                      seed=args.seed, device=args.device, inception=args.inception, fid=not args.no_fid,
                      ref_stats=args.ref_stats, save_ref_stats=args.save_ref_stats,
                      ssim_data_range=args.ssim_data_range, csv=args.csv, grid=args.grid, progress=not args.quiet,
                      weights=args.weights)
    finite = all(report[k] is not None and math.isfinite(report[k]) for k in ("psnr", "mse", "l1"))
    if rank() != 0:
        return 0 if finite else 1
    if args.out:
        write_json(report, args.out)
    if args.json:
        print(json.dumps(json_safe(report), indent=1))
    else:
        print(format_report(report))
        for flag, value in (("report", args.out), ("per-image", args.csv), ("grid", args.grid),
                            ("ref stats", args.save_ref_stats)):
            if value:
                print(f"  {flag:<11} {value}")
    if not finite:
        print("eval: warning: the model produced non-finite reconstructions", file=sys.stderr)
        return 1
    return 0


__all__ = ["cli_main", "evaluate", "run_model", "psnr", "pixel_errors", "codebook_report",
           "reconstruct_with_codes", "load_source", "eval_data", "lpips_for_eval", "format_report",
           "prepare_rfid", "preprocessing", "shard"]
