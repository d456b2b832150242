"""``python -m train extract-features``: cache the DINO teacher's patch features for DinoVQ.

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

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from train import atomic
from train.errors import UserError

FORMAT = "dinovq-feature-cache/1"
VIEW = "center-crop"
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _key(path: str) -> str:
    return os.path.abspath(str(path))


class FeatureCache:
    """Read side of the cache: ``lookup(paths)`` -> ``(B, N, dim)`` float32."""

    def __init__(self, path: str):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise UserError(f"data.feature_cache {path!r} does not exist; write it with "
                            "python -m train extract-features CONFIG --data ... --out CACHE")
        try:
            self._file = safe_open(path, framework="pt", device="cpu")
            meta = self._file.metadata() or {}
        except Exception as exc:  # not a safetensors file
            raise UserError(f"data.feature_cache {path!r} is not a feature cache ({type(exc).__name__}); "
                            "write it with python -m train extract-features") from None
        if meta.get("format") != FORMAT or "features" not in self._file.keys():
            raise UserError(f"data.feature_cache {path!r} is not a {FORMAT} file; write it with "
                            "python -m train extract-features")
        self.path = path
        self.meta = meta
        self.keys: List[str] = json.loads(meta["keys"])
        self.index: Dict[str, int] = {k: i for i, k in enumerate(self.keys)}
        self._features = self._file.get_slice("features")
        shape = self._features.get_shape()
        self.grid = tuple(int(g) for g in meta["grid"].split(","))
        self.dino_dim = int(shape[2])
        self.num_tokens = int(shape[1])

    @classmethod
    def for_config(cls, cfg) -> "FeatureCache":
        """Open ``cfg.data.feature_cache`` and check it fits the config's model and data."""
        from adapters.dino_teacher import student_geometry
        from adapters.dinovq import DEFAULTS
        from losses.dinovq_loss import FeatureShapeError
        from train.schema import as_dict

        cache = cls(str(cfg.data.feature_cache))
        image_size, grid = student_geometry(cfg)
        dino_dim = int(as_dict(cfg.model_args).get("dino_dim", DEFAULTS["dino_dim"]))
        if cache.grid != tuple(grid) or cache.dino_dim != dino_dim:
            raise FeatureShapeError(
                f"data.feature_cache {cache.path!r} holds features on a {cache.grid[0]}x{cache.grid[1]} grid "
                f"of width {cache.dino_dim}, this config needs {grid[0]}x{grid[1]} of width {dino_dim} "
                f"(img_size {list(image_size)}); re-run extract-features with this config")
        if bool(cfg.data.random_crop):
            raise UserError("data.feature_cache holds features of centre crops, but data.random_crop is "
                            "true; set data.random_crop=false, or drop data.feature_cache to compute "
                            "features online")
        return cache

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, paths: Sequence[str]) -> torch.Tensor:
        rows = []
        for path in paths:
            i = self.index.get(_key(path))
            if i is None:
                raise UserError(f"image {path!r} is not in the feature cache {self.path!r}; re-run "
                                "extract-features on the same data as fit")
            rows.append(self._features[i:i + 1])
        return torch.cat(rows).float()

    def features_for_batch(self, batch) -> torch.Tensor:
        """The DinoVQ calculator's hook: features for ``batch["path"]`` on the images' device."""
        if "path" not in batch:
            raise UserError("a DinoVQ feature cache needs the image paths of each batch (batch['path'])")
        return self.lookup(list(batch["path"])).to(batch["image"].device)


def extract(cfg, data_arg: Optional[str], out: str, batch_size: int, device: str,
            store_dtype: str = "fp16", progress=None) -> Dict[str, int]:
    """Run the teacher over every image of the data and write the cache to ``out``."""
    from adapters.dino_teacher import build_teacher
    from train.data import crop_image, load_rgb, resolve_data, to_tensor

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
            crop = crop_image(load_rgb(path), size, None, False, (1.0, 1.0))
        except Exception as exc:  # noqa: BLE001 - unreadable files are skipped and counted
            skipped += 1
            print(f"warning: skipping unreadable image {path} ({type(exc).__name__})", file=sys.stderr)
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
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # A killed run never leaves a half-written cache under the real name.
    atomic.save_safetensors(tensors, out, metadata=meta)


def cli_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train extract-features",
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

    from adapters.registry import get_model_type
    from train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if get_model_type(cfg.model_type).name != "DinoVQ":
        raise UserError(f"{args.config}: extract-features is for DinoVQ configs, this one is "
                        f"model_type {cfg.model_type!r}")
    if not args.out.endswith(".safetensors"):
        raise UserError(f"--out {args.out}: the cache is a .safetensors file; end the name with .safetensors")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = int(args.batch_size or cfg.train.batch_size)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    start = time.time()

    def progress(done, total):
        print(f"extract-features: {done}/{total} images", file=sys.stderr)

    stats = extract(cfg, args.data, args.out, batch_size, device, args.store_dtype, progress)
    print(f"wrote {args.out}: {stats['images']} images, {stats['skipped']} skipped, "
          f"{time.time() - start:.1f}s")
    return 0
