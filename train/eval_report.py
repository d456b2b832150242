"""What ``python -m train eval`` prints and writes: the table, the JSON report, the
per-image CSV and the reconstruction grid, each file written atomically (``train/atomic.py``).

    python -m train eval RUN_DIR --json --out metrics.json --csv per_image.csv --grid grid.png

The JSON report holds every metric and the settings that define it (``settings``: crop
size and preprocessing, number of images, the SSIM convention, the Inception weights file
and its SHA-256, the tool version); NaN and infinities are written as null.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Dict, List

import torch

from train import atomic
from train.errors import UserError

CSV_COLUMNS = ("index", "path", "psnr", "ssim", "mse", "l1", "lpips")


def json_safe(value):
    """JSON has no NaN/inf: non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _number(value, fmt: str) -> str:
    return "nan" if value is None or not math.isfinite(value) else format(value, fmt)


def _value_or_why(label: str, value, note: str) -> str:
    """A metric that may be skipped: its value and where it came from, or why there is none."""
    return f"  {label:<11} {value:.4f}  ({note})" if value is not None else f"  {label:<11} {note}"


def format_report(r: Dict[str, Any]) -> str:
    variant = f" {r['model_variant']}" if r.get("model_variant") else ""
    step = f", step {r['step']}" if r.get("step") is not None else ""
    s = r["settings"]
    ema = ", EMA weights" if r.get("weights_used") == "ema" else ""
    lines = [f"eval: {r['source']} ({r['model_type']}{variant}{step}{ema})",
             f"  data        {r['data']}, split {r['split']}: {r['num_images']} {r['crops']} crops of "
             f"{r['image_size']} px (seed {r['seed']}, {r['device']})",
             f"  crops       {s['preprocessing']}"]
    lines.append(_value_or_why("rFID", r.get("rfid"), r["rfid_note"]))
    lines += [f"  PSNR        {_number(r['psnr'], '.2f')} dB",
              f"  SSIM        {_number(r['ssim'], '.4f')}  (data_range {s['ssim']['data_range']}: "
              f"{s['ssim']['convention']})",
              f"  MSE         {_number(r['mse'], '.6f')}  (pixels in [0, 1])",
              f"  L1          {_number(r['l1'], '.6f')}"]
    lines.append(_value_or_why("LPIPS", r.get("lpips"), r["lpips_note"]))
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


def _make_folder(path: str, flag: str) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:
        raise UserError(f"eval: {flag} {path}: its folder cannot be created ({exc.strerror or exc}); "
                        f"choose another {flag}") from None


def _write(path: str, data: bytes, flag: str) -> None:
    _make_folder(path, flag)
    atomic.write_bytes(path, data)   # an OSError becomes one line naming the file; the old file stays


def write_json(report: Dict[str, Any], path: str) -> None:
    _write(path, (json.dumps(json_safe(report), indent=1) + "\n").encode("utf-8"), "--out")


def write_csv(rows: List[Dict[str, Any]], path: str) -> None:
    """One row per evaluated image, in evaluation order; empty cells for metrics not computed."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c])
                         for c in CSV_COLUMNS])
    _write(path, text.getvalue().encode("utf-8"), "--csv")


def write_ref_stats(path: str, stats, meta: Dict[str, Any]) -> None:
    """The real side's Inception ``(mu, sigma)`` as ``.npz`` (``train.fid.ref_stats_bytes``)."""
    from train.fid import ref_stats_bytes

    _write(path, ref_stats_bytes(stats[0], stats[1], meta), "--save-ref-stats")


def write_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, path: str) -> None:
    """The first images (top row) over their reconstructions (bottom row), as PNG."""
    from train.logger import save_grid

    _make_folder(path, "--grid")
    save_grid(inputs, reconstructions, path, max_images=inputs.shape[0])


__all__ = ["CSV_COLUMNS", "json_safe", "format_report", "write_json", "write_csv", "write_ref_stats", "write_grid"]
