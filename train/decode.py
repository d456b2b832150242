"""``python -m train decode``: code indices written by ``python -m train encode`` -> PNG images.

    python -m train decode RUN_DIR codes/ --out png/
    python -m train decode RUN_DIR codes/ --out png/ --images cat.jpg,/data/val/dog.png

``SOURCE`` is what ``encode`` and ``eval`` take; ``CODES_DIR`` a finished ``encode``
output (``index.json``, ``images.csv``, ``shard-N.<codebook>.npy``).  Each image's code
maps go through the model's own decode-from-indices path (``decode_code``, the model
contract: taming's ``get_codebook_entry`` for VQ / Gumbel, the EMA quantizer's codebook,
vqvae2's two levels, DinoVQ's codebook) and are written as 8-bit RGB PNGs with the rounding
of torchvision's ``save_image`` (the run's image grids): ``uint8((x.clamp(-1, 1) + 1) / 2
* 255 + 0.5)``.  Image ``n`` of ``images.csv`` (counting from 0) becomes
``PNG_DIR/<n>-<its file name without extension>.png``; ``--images`` picks some by path
as listed in ``images.csv`` or by file name.  Every PNG is written atomically.

Refused before anything is written (exit 2): codes of another model (codebook names, sizes
or grid shapes differ from the model's), a code at or beyond its codebook's size, a
damaged shard (its sha256 differs from the index), an unfinished ``encode``.  Another
model with the same codebooks (a fine-tuned decoder) decodes, with a note.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from train import atomic
from train.cli import CommandParser, check_out_path, parse_device, positionals, positive_int
from train.encode import (IMAGES, INDEX, VERSION, code_grids, default_device, load_tokenizer, read_json,
                          weights_digest)
from train.errors import UserError
from train.weight_ema import add_weights_argument

DEFAULT_BATCH = 16


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), torchvision ``save_image``'s
    rounding (what ``train/logger.py``'s grids use)."""
    x = (images.detach().float().clamp(-1, 1) + 1) / 2
    return x.mul(255).add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def read_index(codes_dir: str) -> Tuple[Dict[str, Any], List[Tuple[str, int, int]]]:
    """``(index.json, [(path, shard, row)] from images.csv)`` of a finished encode."""
    if not os.path.isdir(codes_dir):
        raise UserError(f"decode: {codes_dir} is not a folder; name the --out folder of `python -m train encode`")
    path = os.path.join(codes_dir, INDEX)
    if not os.path.isfile(path):
        unfinished = os.path.isfile(os.path.join(codes_dir, "plan.json"))
        raise UserError(f"decode: {codes_dir} has no {INDEX}: " + (
            "its encode did not finish; run the same encode command again to finish it" if unfinished else
            "it is not an output of `python -m train encode`; name the folder encode --out wrote"))
    index = read_json(path, "decode:")
    if index.get("version") != VERSION or not index.get("complete"):
        raise UserError(f"decode: {path} is format version {index.get('version')} (this tool reads {VERSION}) or "
                        "unfinished; encode the images again with this version")
    rows = []
    try:
        with open(os.path.join(codes_dir, IMAGES), "r", encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header != ["path", "shard", "row"]:
                raise ValueError(f"header {header}")
            for line in reader:
                rows.append((line[0], int(line[1]), int(line[2])))
    except (OSError, ValueError, IndexError) as exc:
        raise UserError(f"decode: {os.path.join(codes_dir, IMAGES)} cannot be read ({exc}); encode again") from None
    return index, rows


def check_model(model, index: Dict[str, Any], grids: Sequence[Tuple[int, int]], source: str,
                digest: str) -> Optional[str]:
    """UserError when the model's codebooks differ from the codes'; a note when only the
    weights differ."""
    mine = [{"name": n, "size": int(s), "grid": list(g)}
            for n, s, g in zip(model.codebook_names, model.codebook_sizes, grids)]
    theirs = [{k: cb.get(k) for k in ("name", "size", "grid")} for cb in index.get("codebooks", [])]

    def say(cbs):
        return ", ".join(f"{c['name']} {c['size']} codes on {c['grid'][0]}x{c['grid'][1]}" for c in cbs)

    if mine != theirs:
        who = index.get("model", {})
        raise UserError(f"decode: the codes are {say(theirs)} (from {who.get('model_type')} {who.get('source')}); "
                        f"{source} makes {say(mine)} at {index['data']['image_size']} px: decode with the model "
                        "that encoded them")
    if index.get("model", {}).get("weights_sha256") != digest:
        return (f"{source} is not the model that encoded these codes ({index['model'].get('source')}); its "
                "codebooks have the same shapes, so they are decoded with its weights")
    return None


def pick_rows(rows: List[Tuple[str, int, int]], wanted: Optional[str]) -> List[int]:
    """Image numbers (rows of images.csv) named by ``--images`` (paths or file names)."""
    if wanted is None:
        return list(range(len(rows)))
    by_path = {p: n for n, (p, _, _) in enumerate(rows)}
    by_name: Dict[str, List[int]] = {}
    for n, (p, _, _) in enumerate(rows):
        by_name.setdefault(os.path.basename(p), []).append(n)
    picked = []
    for item in (w.strip() for w in wanted.split(",")):
        if not item:
            continue
        if item in by_path:
            picked.append(by_path[item])
        elif len(by_name.get(item, [])) == 1:
            picked.append(by_name[item][0])
        elif item in by_name:
            raise UserError(f"decode: --images {item} names {len(by_name[item])} images; give its path as listed in "
                            f"{IMAGES}")
        else:
            near = difflib.get_close_matches(item, list(by_name), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise UserError(f"decode: --images {item} is not among the encoded images{hint}; see {IMAGES}")
    if not picked:
        raise UserError("decode: --images names no image; give paths or file names separated by commas")
    return sorted(set(picked))


def load_shard(codes_dir: str, index: Dict[str, Any], shard: int, sizes: Sequence[int]) -> List[np.ndarray]:
    """The code arrays of one shard, checked against the index (sha256, shape, dtype) and the
    model's codebook sizes."""
    entry = next((s for s in index["shards"] if s.get("shard") == shard), None)
    if entry is None:
        raise UserError(f"decode: {IMAGES} names shard {shard}, which {INDEX} does not list; encode again")
    arrays = []
    for cb, size in zip(index["codebooks"], sizes):
        info = entry["files"].get(cb["name"], {})
        path = os.path.join(codes_dir, str(info.get("file")))
        if not os.path.isfile(path) or atomic.sha256_file(path) != info.get("sha256"):
            raise UserError(f"decode: {path} is missing or damaged (its sha256 differs from {INDEX}); run the encode "
                            "command again: it re-encodes damaged shards")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"decode: {path} cannot be read as .npy ({exc}); encode again") from None
        if array.dtype.kind not in "iu" or array.ndim != 3 or tuple(array.shape[1:]) != tuple(cb["grid"]):
            raise UserError(f"decode: {path} holds {array.dtype} {tuple(array.shape)}, not (rows, "
                            f"{cb['grid'][0]}, {cb['grid'][1]}) code indices; encode again")
        if array.size and (int(array.min()) < 0 or int(array.max()) >= size):
            bad = int(array.max()) if int(array.max()) >= size else int(array.min())
            raise UserError(f"decode: {path} holds code {bad}, outside the model's {cb['name']} codebook (codes 0 to "
                            f"{size - 1}); these codes do not come from this model: decode with the model that "
                            "encoded them")
        arrays.append(array)
    return arrays


def png_name(n: int, path: str, total: int) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    return f"{n:0{max(6, len(str(total)))}d}-{stem}.png"


@torch.no_grad()
def decode(source: str, codes_dir: str, out: str, images: Optional[str] = None, batch_size: Optional[int] = None,
           overrides: Sequence[str] = (), device: Optional[str] = None, quiet: bool = False,
           weights: Optional[str] = None) -> Dict[str, Any]:
    """Decode ``codes_dir`` into PNGs in ``out`` (see the module docstring); returns a report."""
    from PIL import Image

    index, rows = read_index(codes_dir)
    chosen = pick_rows(rows, images)
    model, cfg, src, step = load_tokenizer(source, overrides, "decode", weights)
    digest = weights_digest(model)
    dev = default_device(device, "decode")
    model.to(dev)
    grids = code_grids(model, int(index["data"]["image_size"]), dev, "decode")
    note = check_model(model, index, grids, source, digest)
    sizes = list(model.codebook_sizes)
    bs = int(batch_size or DEFAULT_BATCH)
    by_shard: Dict[int, List[int]] = {}
    for n in chosen:
        by_shard.setdefault(rows[n][1], []).append(n)
    # Every shard is checked before the first PNG is written.
    shards = {shard: load_shard(codes_dir, index, shard, sizes) for shard in sorted(by_shard)}
    for shard, numbers in by_shard.items():
        n_rows = shards[shard][0].shape[0]
        bad = [rows[n][2] for n in numbers if not 0 <= rows[n][2] < n_rows]
        if bad:
            raise UserError(f"decode: {IMAGES} names row {bad[0]} of shard {shard}, which has {n_rows} rows; encode "
                            "again")
    os.makedirs(out, exist_ok=True)
    written = []
    for shard, numbers in sorted(by_shard.items()):
        for i in range(0, len(numbers), bs):
            batch = numbers[i:i + bs]
            picks = np.array([rows[n][2] for n in batch])
            codes = [torch.from_numpy(a[picks].astype(np.int64)).to(dev) for a in shards[shard]]
            pixels = to_uint8(model.decode_code(*codes))
            for n, array in zip(batch, pixels):
                path = os.path.join(out, png_name(n, rows[n][0], len(rows)))
                with atomic.replacing(path) as tmp:
                    Image.fromarray(array, "RGB").save(tmp, format="PNG")
                written.append(path)
    report = {"source": source, "codes": codes_dir, "out": out, "images": len(written), "note": note,
              "files": written}
    if not quiet:
        if note:
            print(f"decode: note: {note}")
        print(f"decode: {len(written)} image(s) from {codes_dir} -> {out} ({cfg.model_type}, {dev})")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m train decode", description="Decode code indices written by encode into PNGs.")
    p.add_argument("items", nargs="*", metavar="SOURCE CODES_DIR [key=value ...]",
                   help="run folder, checkpoint file or migrated folder; the encode output folder; config overrides")
    p.add_argument("--out", required=True, help="folder for the PNG images")
    p.add_argument("--images", help="only these images: paths as in images.csv or file names, comma-separated")
    p.add_argument("--batch-size", type=positive_int, help=f"code maps per decoder forward (default {DEFAULT_BATCH})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_weights_argument(p)
    return p


def cli_main(argv: List[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    positional, overrides = positionals(args.items, "decode", 2, "SOURCE and CODES_DIR",
                                        "python -m train decode RUN_DIR|CKPT CODES_DIR --out PNG_DIR [--images a,b]")
    if args.device is not None:
        parse_device(args.device, "decode")
    check_out_path(args.out, "folder", "decode")
    decode(positional[0], positional[1], args.out, images=args.images, batch_size=args.batch_size,
           overrides=overrides, device=args.device, weights=args.weights)
    return 0


__all__ = ["cli_main", "decode", "to_uint8", "read_index", "png_name"]
