"""``python -m train extract-features``: cache the DINO teacher's patch features for DinoVQ.

The read side of the cache (and its format) is ``adapters/dino_features.py``.

    python -m train extract-features configs/dinovq.yaml --data /data/train_list.txt \\
        --out /data/dino_vitb16_224.safetensors [--batch-size 64] [--device cuda] [key=value ...]

then train from the cache instead of running the teacher at every step::

    python -m train fit configs/dinovq.yaml --data /data/train_list.txt \\
        data.feature_cache=/data/dino_vitb16_224.safetensors data.random_crop=false

Cache format (one ``.safetensors`` file, read lazily, row by row):

* tensor ``features``: ``(M, N, dino_dim)`` (float16 by default), row ``i`` the features of
  image ``keys[i]``;
* metadata (strings): ``format`` = ``dinovq-feature-cache/1``, ``keys`` (JSON list of
  absolute image paths), ``view`` = ``center-crop`` (taming's preprocessing: shorter side
  rescaled to ``image_size``, centre crop), ``image_size``, ``grid`` (``"gh,gw"``),
  ``dino_dim``, ``teacher_arch``, ``teacher_ckpt``.

Features are of the centre crop, so a run that reads the cache must use centre crops
(``data.random_crop: false``); ``fit`` says so otherwise.  ``--data builtin`` is refused:
its crops are random zooms, not one fixed view per file.  The metadata header holds every
path, which suits data sets up to about a million files.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from adapters.dino_features import FORMAT, STORE_DTYPES, VIEW, FeatureCache, _key  # noqa: F401 (re-exported)
from adapters.dinovq import build_teacher
from adapters.registry import get_model_type
from train.run_config import load_run_config
from train import atomic
from train.cli import CommandParser, check_out_path, parse_device
from train.data import crop_image, data_argument, load_rgb, resolve_data, to_tensor
from train.errors import UserError


def extract(cfg, data_arg: Optional[str], out: str, batch_size: int, device: str,
            store_dtype: str = "fp16", progress=None) -> Dict[str, int]:
    """Run the teacher over every image of the data and write the cache to ``out``."""
    where = data_arg if data_arg is not None else cfg.data.path
    if where == "builtin":
        raise UserError("extract-features cannot cache --data builtin: its crops are random zooms, "
                        "not one view per file; give an image folder or a file list")
    spec = resolve_data(cfg, data_arg)
    teacher = build_teacher(cfg).to(device)
    size = int(cfg.data.image_size)
    image_size = tuple(teacher.image_size or (size, size))
    if image_size != (size, size):
        raise UserError(f"data.image_size {size} differs from model_args.img_size {list(image_size)}; "
                        "set them to the same size")
    keys: List[str] = []
    chunks: List[torch.Tensor] = []
    skipped = 0
    pending: List[torch.Tensor] = []
    pending_keys: List[str] = []

    def flush():
        if pending:
            feats = teacher(torch.stack(pending).to(device))
            chunks.append(feats.to(STORE_DTYPES[store_dtype]).cpu())
            keys.extend(pending_keys)
            pending.clear()
            pending_keys.clear()
            if progress:
                progress(len(keys), len(spec.paths))

    for path in spec.paths:
        try:
            # Decoded as training decodes it (JPEG draft mode), so the features match its crops.
            crop = crop_image(load_rgb(path, spec.max_pixels, draft_short=size), size, None, False, (1.0, 1.0),
                              spec.max_pixels)
        except Exception as exc:  # noqa: BLE001 - unreadable files are skipped and counted
            skipped += 1
            print(f"warning: skipping unreadable image {path} ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        pending.append(to_tensor(crop))
        pending_keys.append(_key(path))
        if len(pending) == batch_size:
            flush()
    flush()
    if not keys:
        raise UserError(f"no readable image in {spec.source}; nothing to cache")
    features = torch.cat(chunks)
    meta = {"format": FORMAT, "keys": json.dumps(keys), "view": VIEW, "image_size": str(size),
            "grid": ",".join(str(g) for g in teacher.grid_size), "dino_dim": str(features.shape[2]),
            "teacher_arch": str(cfg.teacher.arch), "teacher_ckpt": str(cfg.teacher.ckpt_path)}
    _save_atomic({"features": features.contiguous()}, meta, out)
    return {"images": len(keys), "skipped": skipped + len(spec.unreadable)}


def _save_atomic(tensors, meta, out: str) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        # A killed run never leaves a half-written cache under the real name.
        atomic.save_safetensors(tensors, out, metadata=meta)
    except OSError as exc:
        raise UserError(f"extract-features: --out {out}: cannot be written ({exc.strerror or exc}); free some "
                        "space or choose another --out (no partial cache was left)") from None


def cli_main(argv: Sequence[str]) -> int:
    # CommandParser: a bad command line is one line and exit 2, not argparse's usage text.
    parser = CommandParser(prog="python -m train extract-features",
                           description="cache DINO teacher features for DinoVQ")
    parser.add_argument("config", help="a DinoVQ config (YAML or JSON)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--data", help="image folder or file list (default: data.path)")
    parser.add_argument("--out", required=True, help="cache file to write (.safetensors)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per teacher forward")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("--store-dtype", choices=sorted(STORE_DTYPES), default="fp16",
                        help="precision of the stored features (default fp16)")
    args = parser.parse_intermixed_args(list(argv))
    # Command-line mistakes first: they are found in milliseconds, the config takes longer.
    data_arg = None if args.data is None else data_argument(args.data)
    device = str(parse_device(args.device, "extract-features")) if args.device is not None else None

    cfg = load_run_config(args.config, args.overrides, scope="model").cfg
    if get_model_type(cfg.model_type).batch_hook is None:
        raise UserError(f"{args.config}: extract-features caches teacher features for model types "
                        f"distilled from a teacher (DinoVQ); model_type {cfg.model_type!r} has none")
    if not args.out.endswith(".safetensors"):
        raise UserError(f"--out {args.out}: the cache is a .safetensors file; end the name with .safetensors")
    check_out_path(args.out, "file", "extract-features")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = int(args.batch_size or cfg.train.batch_size)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    start = time.time()

    def progress(done, total):
        print(f"extract-features: {done}/{total} images", file=sys.stderr)

    stats = extract(cfg, data_arg, args.out, batch_size, device, args.store_dtype, progress)
    print(f"wrote {args.out}: {stats['images']} images, {stats['skipped']} skipped, "
          f"{time.time() - start:.1f}s")
    return 0
