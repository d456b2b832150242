"""``python -m train eval``: reconstruction metrics of a trained model on held-out images.

    python -m train eval RUN_DIR                        # the run's held-out data (builtin: chelsea, coffee)
    python -m train eval RUN_DIR/checkpoints/step-500.ckpt --data /images/val --num-images 500
    python -m train eval MIGRATED_DIR --data builtin --json
    python -m train eval RUN_DIR --out metrics.json data.image_size=128

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
the report says so.  Folders and lists give one centre crop per file (``--num-images``
takes a fixed random subset); the built-in photographs give ``--num-images`` (default 16,
as ``python -m train demo``) random crops that are a fixed function of ``--seed``.

Metrics, averaged over images (pixels mapped from [-1, 1] to [0, 1], reconstructions
clamped to [-1, 1] as when they are saved as images):

* ``psnr``: mean per-image PSNR in dB, ``10 log10(1 / MSE_i)``;
* ``mse``, ``l1``: mean squared and absolute pixel error on the [0, 1] scale;
* ``lpips``: taming's LPIPS (VGG16 trunk + the lpips package's linear weights), only with a
  real VGG16 file (``--vgg FILE``, ``train.vgg_ckpt_path`` or the torch hub cache); never
  a random trunk (``train.allow_random_vgg`` is ignored here); otherwise null, with why;
* ``codebooks``: per codebook (``top``/``bottom`` for vqvae2) the codes used, the used
  fraction and the perplexity ``exp(H)`` of the code histogram over all latent positions.

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

from train import atomic
from train.cli import CommandParser, check_out_path, parse_device, positive_int
from train.checkpoint import LAST_WEIGHTS
from train.errors import UserError
from train.usage import add_codes_, codebook_stats
from train.sources import Source, locate, read_state
from train.weight_ema import WEIGHT_CHOICES

# Crops of the built-in photographs when --num-images is not given (the demo's count).
BUILTIN_CROPS = 16
# Seed of the evaluation crops (and of Gumbel sampling): the demo's held-out seed.
EVAL_SEED = 0
SPLITS = ("val", "train")


# ----------------------------------------------------------------------------------------
# Metrics

def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (compared on the [0, 1] scale)."""
    return pixel_errors(x, y)["psnr"]


def pixel_errors(x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-image ``psnr``, ``mse`` and ``l1`` of images in [-1, 1], on the [0, 1] scale."""
    diff = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2
    mse = diff.pow(2).flatten(1).mean(1)
    return {"psnr": 10 * torch.log10(1.0 / mse.clamp_min(1e-10)), "mse": mse,
            "l1": diff.abs().flatten(1).mean(1)}


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
    """Centre crop of file ``i``, or None when the file fails to decode (left out and counted:
    an evaluation should not silently measure another file in its place, as training does)."""

    def __init__(self, spec):
        self.spec = spec

    def __len__(self):
        return len(self.spec.paths)

    def __getitem__(self, i):
        import numpy as np

        from train.data import crop_image, load_rgb, to_tensor

        path = self.spec.paths[i]
        try:
            array = crop_image(load_rgb(path, self.spec.max_pixels), self.spec.image_size, np.random.default_rng(0),
                               False, (1.0, 1.0), self.spec.max_pixels)
        except Exception as exc:  # noqa: BLE001 - any decoding failure leaves the file out
            print(f"warning: leaving out unreadable image {path} ({type(exc).__name__}: {exc})", file=sys.stderr)
            return None
        return {"image": to_tensor(array), "skipped": 0}


def _collate(items):
    good = [item for item in items if item is not None]
    images = torch.stack([item["image"] for item in good]) if good else torch.zeros(0)
    return {"image": images, "skipped": sum(int(item["skipped"]) for item in good) + len(items) - len(good)}


def make_batches(spec, indices: List[int], batch_size: int, seed: int, num_workers: int = 0):
    """A DataLoader yielding ``{"image", "skipped"}`` batches of the chosen samples, in order.

    Random-crop data (the built-in photographs) is read through ``ImageCrops``, so sample k
    is the crop ``fixed_crops`` (and the demo's held-out measurement) gives for k; folders and
    lists through :class:`_Files`, one centre crop per chosen file.
    """
    from train.data import ImageCrops, loader_workers

    dataset = ImageCrops(spec, seed) if spec.random_crop else _Files(spec)
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=loader_workers(num_workers),
                                       collate_fn=_collate)


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

@torch.no_grad()
def run_model(model, batches: Iterable[Dict[str, torch.Tensor]], device: torch.device,
              lpips=None, seed: int = EVAL_SEED) -> Dict[str, Any]:
    """Metrics of ``model`` over ``batches`` (see the module docstring).

    Runs in eval mode without gradients; the global random state is seeded for the run
    (Gumbel sampling draws from it) and restored afterwards.
    """
    from train.data import to_model_range

    was_training = model.training
    model.eval()
    names = list(model.codebook_names)
    sizes = tuple(model.codebook_sizes)
    counts = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    sums = {"psnr": 0.0, "mse": 0.0, "l1": 0.0, "lpips": 0.0}
    n_images, skipped, out_of_range = 0, 0, 0
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in batches:
                skipped += int(torch.as_tensor(batch.get("skipped", 0)).sum())
                if batch["image"].numel() == 0:
                    continue
                x = to_model_range(batch["image"].to(device))     # ImageCrops sends uint8
                xrec, codes = reconstruct_with_codes(model, x)
                if tuple(xrec.shape) != tuple(x.shape):
                    raise ValueError("{}x{} px in, {}x{} px out".format(*x.shape[-2:], *xrec.shape[-2:]))
                xrec = xrec.float()
                for key, value in pixel_errors(x, xrec).items():
                    sums[key] += float(value.double().sum())
                if lpips is not None:
                    sums["lpips"] += float(lpips(x.float(), xrec.clamp(-1, 1)).double().sum())
                for c, idx in zip(counts, codes):
                    out_of_range += int(add_codes_(c, idx.long().cpu()))   # e.g. remap's "extra" unknown index
                n_images += x.shape[0]
    finally:
        model.train(was_training)
    if n_images == 0:
        why = f" ({skipped} could not be decoded)" if skipped else ""
        raise UserError(f"eval: no image to evaluate{why}; check --data and the files")
    result = {key: sums[key] / n_images for key in ("psnr", "mse", "l1")}
    result["lpips"] = sums["lpips"] / n_images if lpips is not None else None
    result["num_images"] = n_images
    result["skipped_images"] = skipped
    result["codebooks"] = [codebook_report(c, name) for c, name in zip(counts, names)]
    if out_of_range:
        result["codes_out_of_range"] = out_of_range
    return result


def evaluate(source: str, data: Optional[str] = None, split: str = "val", num_images: Optional[int] = None,
             batch_size: Optional[int] = None, overrides: Sequence[str] = (), vgg: Optional[str] = None,
             lpips: bool = True, seed: int = EVAL_SEED, device: Optional[str] = None,
             weights: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``source`` (see the module docstring); returns the report as a plain dict."""
    from adapters import build_model
    from adapters.weights import load_model_weights

    started = time.time()
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

    try:
        metrics = run_model(model, make_batches(spec, indices, bs, seed, cfg.train.num_workers), dev,
                            lpips=lpips_module, seed=seed)
    except ValueError as exc:
        # e.g. an image size the model cannot take (vqvae2: multiples of 8; DinoVQ: img_size)
        raise UserError(f"eval: the model cannot reconstruct {spec.image_size} px images ({exc}); "
                        "set data.image_size=N to a size it was trained for") from None
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"eval: out of GPU memory at batch size {bs}; pass a smaller --batch-size") from None

    notes = [n for n in (data_note, count_note) if n]
    if spec.unreadable:
        notes.append(f"{len(spec.unreadable)} unreadable file(s) left out (e.g. {spec.unreadable[0]})")
    report = {
        "source": source, "kind": src.kind, "weights": src.weights, "weights_used": weights_used, "step": step,
        "model_type": cfg.model_type, "model_variant": cfg.model_variant,
        "data": spec.source, "split": "train" if data_note or split == "train" else "val",
        "image_size": int(spec.image_size), "crops": "random (seeded)" if spec.random_crop else "centre",
        "seed": int(seed), "device": str(dev),
        **metrics,
        "lpips_note": lpips_note,
        "pixel_scale": "[0, 1]",
        "notes": notes,
        "seconds": round(time.time() - started, 3),
    }
    return report


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------
# Output

def _json_safe(value):
    """JSON has no NaN/inf: non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def format_report(r: Dict[str, Any]) -> str:
    variant = f" {r['model_variant']}" if r.get("model_variant") else ""
    step = f", step {r['step']}" if r.get("step") is not None else ""
    ema = ", EMA weights" if r.get("weights_used") == "ema" else ""
    lines = [f"eval: {r['source']} ({r['model_type']}{variant}{step}{ema})",
             f"  data        {r['data']}, split {r['split']}: {r['num_images']} {r['crops']} crops of "
             f"{r['image_size']} px (seed {r['seed']}, {r['device']})",
             f"  PSNR        {r['psnr']:.2f} dB",
             f"  MSE         {r['mse']:.6f}  (pixels in [0, 1])",
             f"  L1          {r['l1']:.6f}"]
    if r.get("lpips") is not None:
        lines.append(f"  LPIPS       {r['lpips']:.4f}  ({r['lpips_note']})")
    else:
        lines.append(f"  LPIPS       {r['lpips_note']}")
    for cb in r["codebooks"]:
        label = "" if cb["name"] == "codebook" else f"{cb['name']}: "
        lines.append(f"  codebook    {label}{cb['used']} of {cb['codes']} codes used ({100 * cb['usage']:.1f}%), "
                     f"perplexity {cb['perplexity']:.1f}")
    if not r["codebooks"]:
        lines.append("  codebook    (this model reports no code indices)")
    if r.get("skipped_images"):
        lines.append(f"  skipped     {r['skipped_images']} undecodable image(s)")
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def write_json(report: Dict[str, Any], path: str) -> None:
    text = json.dumps(_json_safe(report), indent=1) + "\n"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic.write_text(path, text)
    except OSError as exc:
        # The atomic writer removed its temporary file: the old report (if any) is intact.
        raise UserError(f"eval: --out {path}: cannot be written ({exc.strerror or exc}); free some space or "
                        "choose another --out") from None


# ----------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m train eval",
                description="Reconstruction metrics (PSNR, MSE, L1, LPIPS, codebook usage) of a checkpoint.")
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
    p.add_argument("--vgg", help="torchvision vgg16 state-dict file for LPIPS (default train.vgg_ckpt_path "
                                 "or the torch hub cache)")
    p.add_argument("--no-lpips", action="store_true", help="do not compute LPIPS")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES,
                   help="ema: the weight EMA (train.ema_decay), raw: the trained weights (default: ema when present)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", help="also write the JSON report to this file")
    return p


def cli_main(argv: List[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    sources = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if len(sources) != 1:
        got = f"got {', '.join(sources)}" if sources else "got none"
        raise UserError(f"eval: one SOURCE expected ({got}); usage: python -m train eval RUN_DIR|CKPT|MIGRATED_DIR "
                        "[--data PATH|builtin] [--split val|train] [--num-images N] [--json] [key=value ...]")
    if args.device is not None:
        parse_device(args.device, "eval")
    if args.out is not None:
        # Checked before the evaluation, which can take long, rather than when writing at the end.
        check_out_path(args.out, "file", "eval")

    report = evaluate(sources[0], data=args.data, split=args.split, num_images=args.num_images,
                      batch_size=args.batch_size, overrides=overrides, vgg=args.vgg, lpips=not args.no_lpips,
                      seed=args.seed, device=args.device, weights=args.weights)
    if args.out:
        write_json(report, args.out)
    if args.json:
        print(json.dumps(_json_safe(report), indent=1))
    else:
        print(format_report(report))
        if args.out:
            print(f"  report      {args.out}")
    if not all(math.isfinite(report[k]) for k in ("psnr", "mse", "l1")):
        print("eval: warning: the model produced non-finite reconstructions", file=sys.stderr)
        return 1
    return 0


__all__ = ["cli_main", "evaluate", "run_model", "psnr", "pixel_errors", "codebook_report",
           "reconstruct_with_codes", "load_source", "eval_data", "lpips_for_eval", "format_report"]
