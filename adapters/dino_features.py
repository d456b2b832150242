"""The read side of a DinoVQ teacher-feature cache (written by ``python -m train extract-features``).

Cache format (one ``.safetensors`` file, read lazily, row by row):

* tensor ``features``: ``(M, N, dino_dim)`` (float16 by default), row ``i`` the features of
  image ``keys[i]``;
* metadata (strings): ``format`` = ``dinovq-feature-cache/1``, ``keys`` (JSON list of
  absolute image paths), ``view`` = ``center-crop``, ``image_size``, ``grid`` (``"gh,gw"``),
  ``dino_dim``, ``teacher_arch``, ``teacher_ckpt``.

    cache = FeatureCache("/data/dino_vitb16_224.safetensors")
    feats = cache.lookup(paths)          # (B, N, dino_dim) float32
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import torch
from safetensors import safe_open

from train.errors import UserError


class FeatureShapeError(UserError, ValueError):
    """Teacher features whose shape does not match the student's token grid.

    A ``UserError`` (a feature cache made for another image size or teacher is bad input)
    and a ``ValueError`` (wrong arguments to ``compute_loss``).
    """


FORMAT = "dinovq-feature-cache/1"
VIEW = "center-crop"
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _key(path: str) -> str:
    return os.path.abspath(str(path))


class FeatureCache:
    """Read side of the cache: ``lookup(paths)`` -> ``(B, N, dim)`` float32."""

    def __init__(self, path: str):
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
        """The DinoVQ batch hook's lookup: features for ``batch["path"]`` on the images' device."""
        if "path" not in batch:
            raise UserError("a DinoVQ feature cache needs the image paths of each batch (batch['path'])")
        return self.lookup(list(batch["path"])).to(batch["image"].device)


