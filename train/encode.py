"""``python -m train encode``: images -> the code indices of a trained tokenizer, in shards.

    python -m train encode RUN_DIR --data /images/train --out codes/
    python -m train encode RUN_DIR/checkpoints/step-500.ckpt --data files.txt --out codes/ --shard-size 5000
    torchrun --nproc_per_node=8 -m train encode RUN_DIR --data /images/train --out codes/
    python -m train decode RUN_DIR codes/ --out png/                      # and back (train/decode.py)

``SOURCE`` is what ``python -m train eval`` takes (a run folder, a trainer checkpoint, a
``.safetensors`` file beside its ``config.yaml``, a folder written by ``migrate``); the
model is built from its stored config (``key=value`` overrides apply) and its weights are
loaded strictly.  ``--data`` is an image folder (recursive, sorted), a file list (one path
per line) or ``builtin``.  Each image is read as 8-bit RGB, its shorter side resized to
``data.image_size`` (bicubic) and centre-cropped to a square (taming's / latent-diffusion's
validation preprocessing, as ``eval``), scaled to [-1, 1] and encoded in eval mode by the
model's ``encode_code`` (the model contract): every codebook (vqvae2: ``top`` and
``bottom``), deterministic codes (GumbelVQ: the argmax of the logits, not a Gumbel sample).

The output folder (``--out``)::

    plan.json                     what is encoded: model identity, data, settings (written first)
    shard-00000.<codebook>.npy    (rows, h, w) code indices of shard 0, one file per codebook
    shard-00000.json              shard 0 is finished: its image paths in row order, the images
                                  it left out and why, each .npy file's sha256 (written last)
    images.csv                    path,shard,row of every encoded image
    index.json                    plan + shards + skipped images, "complete": true (written last)

Shard ``i`` holds images ``i * shard_size`` to ``(i + 1) * shard_size - 1`` of the sorted
list (fewer rows when some fail to decode; they are named in the shard file).  Codes are
stored as the smallest dtype that holds the codebook: ``uint8`` up to 256 codes, ``uint16``
up to 65536, else ``int32``.  Every file is written atomically (``train/atomic.py``).

Resuming: run the same command again.  Shards whose ``shard-N.json`` exists, belongs to
the same plan and whose ``.npy`` files match their sha256 are kept; the others are
encoded (again).  A folder holding another model's or data set's codes is refused (exit 2)
unless ``--overwrite``; a folder holding anything ``encode`` does not write is refused.
The folder is locked (``.lock``) while a command writes it.

Under ``torchrun`` rank ``r`` encodes shards ``i`` with ``i % world == r`` (each shard is
encoded with the same batches and random seed whichever rank takes it, so the files equal
a one-process run); rank 0 writes ``plan.json``, then ``images.csv`` and ``index.json``
once every rank has finished.

Exit codes: 0 encoded, 2 unusable input (one line naming the problem and the fix).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from train import atomic
from train.cli import CommandParser, check_out_path, parse_device, positionals, positive_int
from train.errors import UserError
from train.weight_ema import add_weights_argument

FORMAT = "vqtok-codes"
VERSION = 1
PLAN, INDEX, IMAGES = "plan.json", "index.json", "images.csv"
DEFAULT_SHARD_SIZE = 10000    # images per shard: the unit of resuming and of torchrun's split
SEED = 0                      # per-shard seed (remap's "random" unknown index draws from it)
PREPROCESSING = ("8-bit RGB; shorter side resized to {size} px (bicubic), centre crop {size}x{size} "
                 "(taming / latent-diffusion validation); pixels / 127.5 - 1")
# Every name encode writes (plus temporaries of interrupted writes): anything else in --out
# means the folder belongs to something else.
OWN_FILE = re.compile(r"^(plan\.json|index\.json|images\.csv|\.lock|shard-\d{5,}\.json|"
                      r"shard-\d{5,}\.[A-Za-z0-9_-]+\.npy)(\.tmp\.\d+)?$")


# ----------------------------------------------------------------------------------------
# Small pieces decode shares

def code_dtype(size: int) -> np.dtype:
    """The smallest dtype that holds code indices ``0 .. size - 1``."""
    if size <= 1 << 8:
        return np.dtype(np.uint8)
    if size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes, in name order): the
    identity of the weights that encode, whatever file they came from."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _for_command(message: str, command: str) -> str:
    # eval's source loader speaks to `eval`; the same problems read as this command's.
    if message.startswith("eval: "):
        message = f"{command}: " + message[len("eval: "):]
    return message.replace("and evaluate its output folder", f"and {command} its output folder")


def load_tokenizer(source: str, overrides: Sequence[str], command: str, weights: Optional[str] = None):
    """``(model in eval mode, cfg, Source, step)`` for ``source``, as ``eval`` loads it
    (``weights``: ema | raw | None = the weight EMA when the source has one)."""
    from adapters import build_model
    from adapters.weights import load_model_weights
    from train.evaluate import load_source
    from train.sources import locate

    src = locate(source, f"{command}:")
    try:
        cfg, state_dict, step, used = load_source(src, overrides, weights, command)
    except UserError as exc:
        raise UserError(_for_command(str(exc), command)) from None
    try:
        model = build_model(cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{command}: the stored config does not build a {cfg.model_type} model ({exc}); check "
                        "the model_args overrides") from None
    load_model_weights(model, state_dict, strict=True, source=src.weights)
    if step is not None:
        model.before_step(step)   # GumbelVQ's temperature at that step (codes are its argmax)
    model.weights_used = used
    return model.eval(), cfg, src, step


def default_device(device: Optional[str], command: str) -> torch.device:
    """``--device``, else the local rank's GPU under torchrun, else cuda when available."""
    if device is not None:
        dev = parse_device(device, command)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@torch.no_grad()
def code_grids(model, image_size: int, device: torch.device, command: str) -> List[Tuple[int, int]]:
    """The (h, w) code grid of every codebook for ``image_size`` px images (one blank image
    through ``encode_code``); UserError when the model cannot take that size."""
    try:
        codes = model.encode_code(torch.zeros(1, 3, image_size, image_size, device=device))
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{command}: the model cannot encode {image_size} px images ({exc}); set "
                        "data.image_size=N to the size it was trained for") from None
    return [(int(c.shape[-2]), int(c.shape[-1])) for c in codes]


def read_json(path: str, what: str) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{what} {path} cannot be read ({exc}); it is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{what} {path} was not written by `python -m train encode`")
    return data


# ----------------------------------------------------------------------------------------
# Distributed helpers (no-ops in one process)

def _world() -> Tuple[int, int]:
    from adapters.distributed import rank, world_size

    return rank(), world_size()


def agree(error: Optional[str]) -> None:
    """Every rank raises the first rank's error, if any rank has one (a collective): a rank
    that stops alone would leave the others waiting in the next collective."""
    from adapters.distributed import is_distributed

    if is_distributed():
        import torch.distributed as dist

        everyone: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, error)
        error = next((e for e in everyone if e), None)
    if error:
        raise UserError(error)


def _sum_over_ranks(values: List[int]) -> List[int]:
    """Element-wise sums over ranks (objects, so nccl needs no device tensor here)."""
    from adapters.distributed import is_distributed

    if not is_distributed():
        return list(values)
    import torch.distributed as dist

    everyone: List[Optional[List[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(values))
    return [sum(v[i] for v in everyone) for i in range(len(values))]


def _on_rank0(fn, *args):
    """``fn(*args)`` on rank 0; its UserError stops every rank (see :func:`agree`)."""
    rank, _ = _world()
    result, error = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except UserError as exc:
            error = str(exc)
    agree(error)
    return result


# ----------------------------------------------------------------------------------------
# Data

def image_list(data: str, image_size: int, max_pixels: int) -> Tuple[List[str], str]:
    """``(paths, description)`` of ``--data``; UserError when it holds no readable image.

    Headers are checked only until the first readable one (a million-file folder is not
    read twice before encoding starts); files that fail later are left out and named in
    their shard's file."""
    from train.data import data_argument, image_problem, no_image_message, paths_from_argument

    paths, source = paths_from_argument(data_argument(data))
    bad, problems = [], {}
    for path in paths:
        problem = image_problem(path, image_size, max_pixels)
        if problem is None:
            return paths, source
        bad.append(path)
        problems[path] = problem
    raise UserError("encode: " + no_image_message(source, bad, problems))


class _Crops(torch.utils.data.Dataset):
    """Item ``i``: ``(i, uint8 HWC crop or None, why it failed or None)`` (uint8 between
    processes: a quarter of float32's bytes)."""

    def __init__(self, paths: Sequence[str], size: int, max_pixels: int):
        self.paths, self.size, self.max_pixels = paths, size, max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from train.data import crop_image, load_rgb

        try:
            array = crop_image(load_rgb(self.paths[i], self.max_pixels), self.size, np.random.default_rng(0),
                               False, (1.0, 1.0), self.max_pixels)
        except Exception as exc:  # noqa: BLE001 - any decoding failure leaves the file out
            return i, None, f"{type(exc).__name__}: {exc}"
        return i, torch.from_numpy(np.array(array)), None   # a writable copy


def _collate(items):
    good = [(i, a) for i, a, _ in items if a is not None]
    return {"index": [i for i, _ in good],
            "image": torch.stack([a for _, a in good]) if good else None,
            "failed": [(i, why) for i, a, why in items if a is None]}


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], as ``train.data.to_tensor``
    (through :func:`train.data.to_model_range`, the values training sees on any device)."""
    from train.data import to_model_range

    return to_model_range(images.to(device).permute(0, 3, 1, 2).contiguous())


# ----------------------------------------------------------------------------------------
# The plan and the output folder

def identity(plan: Dict[str, Any]) -> Dict[str, Any]:
    """What must match for a rerun to continue a folder (not where the files lie)."""
    model, data = plan.get("model", {}), plan.get("data", {})
    return {"version": plan.get("version"), "weights_sha256": model.get("weights_sha256"),
            "model_type": model.get("model_type"), "model_variant": model.get("model_variant"),
            "image_size": data.get("image_size"), "paths_sha256": data.get("paths_sha256"),
            "images": data.get("images"), "shard_size": plan.get("shard_size"), "codebooks": plan.get("codebooks")}


def identity_digest(plan: Dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(identity(plan), sort_keys=True).encode("utf-8"))


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    a, b = identity(old), identity(new)
    said = []
    if (a["weights_sha256"], a["model_type"], a["model_variant"]) != \
            (b["weights_sha256"], b["model_type"], b["model_variant"]):
        said.append(f"another model ({old.get('model', {}).get('source')}, weights sha256 "
                    f"{str(a['weights_sha256'])[:12]}; now {str(b['weights_sha256'])[:12]})")
    if (a["paths_sha256"], a["images"]) != (b["paths_sha256"], b["images"]):
        said.append(f"other images ({a['images']} from {old.get('data', {}).get('source')}; now {b['images']})")
    for key, flag in (("image_size", "data.image_size"), ("shard_size", "--shard-size"),
                      ("codebooks", "codebooks"), ("version", "format version")):
        if a[key] != b[key] and not (key == "codebooks" and said):
            said.append(f"{flag} {a[key]} (now {b[key]})")
    return "; ".join(said) or "another plan"


def foreign_files(out: str) -> List[str]:
    """Entries of ``out`` that encode does not write."""
    if not os.path.isdir(out):
        return []
    return sorted(e for e in os.listdir(out) if not OWN_FILE.match(e) or not os.path.isfile(os.path.join(out, e)))


def check_out_folder(out: str) -> None:
    foreign = foreign_files(out)
    if foreign:
        raise UserError(f"encode: --out {out} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that "
                        f"encode did not write (e.g. {foreign[0]}); name a new or empty folder, or one an earlier "
                        "encode wrote")


def prepare_plan(out: str, plan: Dict[str, Any], overwrite: bool) -> str:
    """Rank 0, holding the folder's lock: refuse another plan's folder (unless
    ``overwrite``: then clear it), write ``plan.json``; returns a note or ''."""
    note = ""
    path = os.path.join(out, PLAN)
    if os.path.isfile(path):
        try:
            old = read_json(path, "encode: --out holds")
        except UserError as exc:
            old = None
            if not overwrite:
                raise UserError(f"{exc}; rerun with --overwrite to encode into it afresh, or choose another --out"
                                ) from None
        if old is not None and identity(old) != identity(plan) and not overwrite:
            raise UserError(f"encode: --out {out} holds codes of {_differences(old, plan)}; rerun with --overwrite "
                            "to replace them, or choose another --out")
    if overwrite:
        removed = [e for e in os.listdir(out) if OWN_FILE.match(e) and e != ".lock"]
        for name in removed:
            os.remove(os.path.join(out, name))
        note = f"--overwrite: removed {len(removed)} file(s) of an earlier encode" if removed else ""
    atomic.write_text(path, json.dumps(plan, indent=1) + "\n")
    return note


def finished_shard(out: str, shard: int, digest: str, paths: Sequence[str]) -> Tuple[Optional[dict], str]:
    """``(shard file, '')`` when shard ``shard`` is finished and intact; ``(None, why)``
    otherwise (``why`` is '' when it was never finished)."""
    path = os.path.join(out, shard_name(shard) + ".json")
    if not os.path.isfile(path):
        return None, ""
    try:
        meta = read_json(path, "shard file")
    except UserError as exc:
        return None, str(exc)
    if meta.get("identity") != digest:
        return None, f"{path} belongs to another plan"
    listed = list(meta.get("paths", [])) + [s.get("path") for s in meta.get("skipped", [])]
    if sorted(listed) != sorted(paths):
        return None, f"{path} lists other images"
    for name, info in meta.get("files", {}).items():
        file = os.path.join(out, str(info.get("file")))
        if not os.path.isfile(file) or atomic.sha256_file(file) != info.get("sha256"):
            return None, f"{file} is missing or damaged"
    return meta, ""


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(out: str, shard: int, digest: str, names: Sequence[str], codes: Dict[str, List[np.ndarray]],
                grids: Sequence[Tuple[int, int]], dtypes: Sequence[np.dtype], paths: List[str],
                skipped: List[Dict[str, str]]) -> dict:
    """The shard's ``.npy`` files, then its ``.json`` (which marks it finished)."""
    files = {}
    for name, grid, dtype in zip(names, grids, dtypes):
        array = np.concatenate(codes[name]) if codes[name] else np.zeros((0, *grid), dtype)
        data = npy_bytes(np.ascontiguousarray(array, dtype=dtype))
        file = f"{shard_name(shard)}.{name}.npy"
        atomic.write_bytes(os.path.join(out, file), data)
        files[name] = {"file": file, "sha256": sha256_bytes(data), "shape": list(array.shape), "dtype": dtype.name}
    meta = {"format": FORMAT, "version": VERSION, "shard": shard, "identity": digest, "rows": len(paths),
            "paths": paths, "skipped": skipped, "files": files}
    atomic.write_text(os.path.join(out, shard_name(shard) + ".json"), json.dumps(meta, indent=1) + "\n")
    return meta


def write_index(out: str, plan: Dict[str, Any], n_shards: int, digest: str, all_paths: Sequence[str]) -> dict:
    """Rank 0, after every rank finished: ``images.csv``, then ``index.json``."""
    shards, skipped, n = [], [], 0
    for shard in range(n_shards):
        expected = all_paths[shard * plan["shard_size"]:(shard + 1) * plan["shard_size"]]
        meta, why = finished_shard(out, shard, digest, expected)
        if meta is None:
            raise UserError(f"encode: shard {shard} is not finished ({why or 'no shard file'}); run the same "
                            "command again to finish it")
        shards.append({"shard": shard, "rows": meta["rows"], "files": meta["files"]})
        skipped += meta["skipped"]
        n += meta["rows"]
    with atomic.replacing(os.path.join(out, IMAGES)) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "shard", "row"])
            for shard in range(n_shards):
                meta = read_json(os.path.join(out, shard_name(shard) + ".json"), "shard file")
                writer.writerows((p, shard, row) for row, p in enumerate(meta["paths"]))
    index = dict(plan, complete=True, images_encoded=n, skipped=skipped, shards=shards,
                 mapping=f"{IMAGES} (path,shard,row)")
    atomic.write_text(os.path.join(out, INDEX), json.dumps(index, indent=1) + "\n")
    return index


# ----------------------------------------------------------------------------------------
# Encoding

def _batches(pending: Sequence[int], shard_size: int, n_images: int, batch_size: int) -> List[List[int]]:
    """Image numbers per batch: the pending shards in order, batches never crossing a shard."""
    chunks = []
    for shard in pending:
        start, stop = shard * shard_size, min((shard + 1) * shard_size, n_images)
        chunks += [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return chunks


@torch.no_grad()
def encode_shards(model, paths: Sequence[str], pending: Sequence[int], out: str, plan: Dict[str, Any], digest: str,
                  grids, device: torch.device, batch_size: int, num_workers: int, say) -> int:
    """Encode and write the ``pending`` shards; returns the number of images encoded."""
    names = list(model.codebook_names)
    sizes = list(model.codebook_sizes)
    dtypes = [code_dtype(s) for s in sizes]
    shard_size, image_size = plan["shard_size"], plan["data"]["image_size"]
    chunks = _batches(pending, shard_size, len(paths), batch_size)
    loader = torch.utils.data.DataLoader(_Crops(paths, image_size, plan["data"]["max_image_pixels"]),
                                         batch_sampler=chunks, num_workers=num_workers, collate_fn=_collate)
    devices = [device.index] if device.type == "cuda" else []
    encoded, current = 0, None
    codes: Dict[str, List[np.ndarray]] = {}
    done_paths: List[str] = []
    skipped: List[Dict[str, str]] = []
    last_chunk = {}
    for k, chunk in enumerate(chunks):
        last_chunk[chunk[0] // shard_size] = k
    with torch.random.fork_rng(devices=devices):
        for k, (chunk, batch) in enumerate(zip(chunks, loader)):
            shard = chunk[0] // shard_size
            if shard != current:
                current, codes, done_paths, skipped = shard, {n: [] for n in names}, [], []
                torch.manual_seed(SEED + shard)    # the same draws whichever rank takes the shard
            for i, why in batch["failed"]:
                print(f"warning: leaving out unreadable image {paths[i]} ({why})", file=sys.stderr)
                skipped.append({"path": paths[i], "why": why})
            if batch["image"] is not None:
                out_codes = model.encode_code(to_model_input(batch["image"], device))
                for name, size, dtype, c in zip(names, sizes, dtypes, out_codes):
                    c = c.to("cpu")
                    if int(c.min()) < 0 or int(c.max()) > np.iinfo(dtype).max:
                        raise UserError(f"encode: the model gave code {int(c.max())} for its {size}-code {name} "
                                        f"codebook (a remap 'extra' index?); encode cannot store it as {dtype.name}")
                    codes[name].append(c.numpy().astype(dtype))
                done_paths += [paths[i] for i in batch["index"]]
            if k == last_chunk[shard]:
                write_shard(out, shard, digest, names, codes, grids, dtypes, done_paths, skipped)
                encoded += len(done_paths)
                say(f"  shard {shard}: {len(done_paths)} images" + (f", {len(skipped)} left out" if skipped else ""))
    return encoded


def encode(source: str, data: str, out: str, batch_size: Optional[int] = None, shard_size: int = DEFAULT_SHARD_SIZE,
           overrides: Sequence[str] = (), device: Optional[str] = None, overwrite: bool = False,
           num_workers: Optional[int] = None, quiet: bool = False, weights: Optional[str] = None) -> Dict[str, Any]:
    """Encode ``data`` with ``source`` into ``out`` (see the module docstring); returns a
    report (the index plus what this run did).  Under torchrun every rank calls it."""
    from train.launch import init_distributed
    from train.run_folder import open_run_folder

    started = time.time()
    init_distributed()
    rank, world = _world()

    def say(text: str) -> None:
        if rank == 0 and not quiet:
            print(text, flush=True)

    out = os.path.abspath(out)
    model, cfg, src, step = load_tokenizer(source, overrides, "encode", weights)
    size, max_pixels = int(cfg.data.image_size), int(cfg.data.max_image_pixels)
    paths, data_source = image_list(data, size, max_pixels)
    dev = default_device(device, "encode")
    digest_w = weights_digest(model)
    model.to(dev)
    grids = code_grids(model, size, dev, "encode")
    codebooks = [{"name": n, "size": int(s), "grid": list(g), "dtype": code_dtype(int(s)).name}
                 for n, s, g in zip(model.codebook_names, model.codebook_sizes, grids)]
    n_shards = (len(paths) + shard_size - 1) // shard_size
    plan = {"format": FORMAT, "version": VERSION,
            "model": {"source": os.path.abspath(src.path), "kind": src.kind, "weights": os.path.abspath(src.weights),
                      "step": step, "model_type": cfg.model_type, "model_variant": cfg.model_variant,
                      "weights_sha256": digest_w, "weights_used": model.weights_used},
            "data": {"source": data_source, "image_size": size, "preprocessing": PREPROCESSING.format(size=size),
                     "images": len(paths), "max_image_pixels": max_pixels,
                     "paths_sha256": sha256_bytes("\n".join(paths).encode("utf-8", "surrogateescape"))},
            "shard_size": int(shard_size), "shard_count": n_shards, "codebooks": codebooks,
            "codes": "shard-N.<codebook>.npy: (rows, h, w) code indices, rows in images.csv order"}
    digest = identity_digest(plan)

    _on_rank0(check_out_folder, out)
    lock = open_run_folder(out, is_main=rank == 0)
    try:
        note = _on_rank0(prepare_plan, out, plan, overwrite)
        mine = [s for s in range(n_shards) if s % world == rank]
        pending, kept = [], 0
        for shard in mine:
            meta, why = finished_shard(out, shard, digest, paths[shard * shard_size:(shard + 1) * shard_size])
            if meta is None:
                pending.append(shard)
                if why:
                    print(f"encode: shard {shard} is encoded again: {why}", file=sys.stderr)
            else:
                kept += 1
        variant = f" {cfg.model_variant}" if cfg.model_variant else ""
        say(f"encode: {source} ({cfg.model_type}{variant}{f', step {step}' if step is not None else ''}) -> {out}")
        say(f"  data      {data_source}: {PREPROCESSING.format(size=size)}")
        if note:
            say(f"  note      {note}")
        from train.data import loader_workers

        error, encoded = None, 0
        try:
            encoded = encode_shards(model, paths, pending, out, plan, digest, grids, dev,
                                    int(batch_size or cfg.train.batch_size),
                                    loader_workers(cfg.train.num_workers if num_workers is None else num_workers), say)
        except UserError as exc:
            error = str(exc)
        except torch.cuda.OutOfMemoryError:
            error = "encode: out of GPU memory; pass a smaller --batch-size"
        agree(error)
        counts = _sum_over_ranks([encoded, len(pending), kept])
        index = _on_rank0(write_index, out, plan, n_shards, digest, paths)
    finally:
        lock.release()
    report = dict(index or {}, out=out, ranks=world, encoded_images=int(counts[0]), encoded_shards=int(counts[1]),
                  kept_shards=int(counts[2]), seconds=round(time.time() - started, 3))
    if rank == 0 and not quiet:
        print(format_report(report))
    return report


def format_report(r: Dict[str, Any]) -> str:
    lines = []
    for cb in r["codebooks"]:
        lines.append(f"  codebook  {cb['name']}: {cb['size']} codes, {cb['grid'][0]}x{cb['grid'][1]} grid, {cb['dtype']}")
    lines.append(f"  shards    {r['shard_count']} of up to {r['shard_size']} images: {r['encoded_shards']} encoded now, "
                 f"{r['kept_shards']} kept from an earlier run ({r['ranks']} rank(s))")
    lines.append(f"  images    {r['images_encoded']} encoded")
    if r["skipped"]:
        lines.append(f"  skipped   {len(r['skipped'])} unreadable image(s) (e.g. {r['skipped'][0]['path']})")
    lines.append(f"  index     {os.path.join(r['out'], INDEX)}, {os.path.join(r['out'], IMAGES)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m train encode",
                      description="Encode images into code indices (sharded .npy files plus an index).")
    p.add_argument("items", nargs="*", metavar="SOURCE [key=value ...]",
                   help="run folder, checkpoint file or migrated folder, then config overrides")
    p.add_argument("--data", required=True, help="image folder, file list (one path per line) or 'builtin'")
    p.add_argument("--out", required=True, help="folder for the codes (created; resumable)")
    p.add_argument("--batch-size", type=positive_int, help="images per forward (default train.batch_size)")
    p.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per shard file (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--workers", type=int, help="data loading processes (default train.num_workers)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace the codes an earlier encode left in --out")
    add_weights_argument(p)
    return p


def cli_main(argv: List[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    (source,), overrides = positionals(args.items, "encode", 1, "one SOURCE",
                                       "python -m train encode RUN_DIR|CKPT --data PATH|builtin --out CODES_DIR "
                                       "[key=value ...]")
    if args.device is not None:
        parse_device(args.device, "encode")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"encode: --workers {args.workers} must be >= 0")
    check_out_path(args.out, "folder", "encode")
    encode(source, args.data, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
           overrides=overrides, device=args.device, overwrite=args.overwrite, num_workers=args.workers,
           weights=args.weights)
    return 0


__all__ = ["cli_main", "encode", "load_tokenizer", "code_dtype", "code_grids", "weights_digest", "read_json",
           "to_model_input", "FORMAT", "VERSION", "INDEX", "IMAGES", "PLAN"]
