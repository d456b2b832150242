"""WebDataset tar shards: write them from images, train from them.

    python -m train write-shards /data/train_images shards/train-%04d.tar --shard-size 1000 --size 288
    python -m train fit CONFIG --data 'shards/train-{0000..0127}.tar'
    torchrun --nproc_per_node=8 -m train fit CONFIG --data 'shards/train-{0000..0127}.tar'

The format is WebDataset's (https://github.com/webdataset/webdataset): a plain tar whose
members of one sample share a key (``00000042_cat.jpg``).  Reading (tar members grouped
into samples: ``tariterators.tar_file_iterator`` + ``group_by_keys``) and writing
(``TarWriter``) are the ``webdataset`` library's own.  The writer leaves an index beside
the shards, ``<name>.json`` in the layout of WebDataset's ``wids`` (``shardlist`` of
``{"url", "nsamples", "filesize"}``): it gives the sample count (``train.max_epochs``),
lets a resumed run skip whole shards without reading them, and lets ``fit`` refuse a shard
whose size changed (truncated) before training.  Shards without an index train as well;
their sample count is unknown and a resume reads (without decoding) up to its position.

Who reads what.  ``R`` ranks x ``W`` readers per rank (``W = max(1, train.num_workers)``)
make ``R * W`` reader slots, slot ``j = rank * W + reader``.  Visits ``v = 0, 1, 2, ...``
run through the shards epoch after epoch, each epoch in its own permutation seeded by
``(seed, epoch)``; slot ``j`` reads visits ``j, j + R*W, j + 2*R*W, ...``.  So no two slots
read the same shard within a round of ``R*W`` visits; a shard count that ``R*W`` does not
divide carries the last round over into the next epoch's order; fewer shards than slots
repeat samples within an epoch (a warning says so).  Inside a visit, samples pass a
shuffle buffer of ``SHUFFLE_BUFFER`` samples seeded by ``(seed, v)`` (WebDataset's
``shuffle``, made reproducible by resetting it at every visit).

Batches and resume.  The DataLoader takes batches from its workers in turn, so micro-batch
``m`` of a rank (``m = step * accumulate + micro``) is reader ``m mod W``'s batch number
``m // W``: the samples ``[(m // W) * B, (m // W + 1) * B)`` of its slot's stream.  A run
resumed at step ``s`` hands worker ``w`` the reader ``(w + s * accumulate) mod W`` and
starts every reader at its position, so it reads exactly the batches the uninterrupted run
read -- with the same world size and worker count (otherwise the slots differ: training
goes on over other batches).  Crops are seeded by the sample number
``k = (m * R + rank) * B + i``, as in ``train/data.py``.

Bad data.  Before training: a pattern matching no file, missing shards, files that are not
tars, a shard whose size differs from its index, and shards with no decodable image at all
are one :class:`UserError` each (exit 2).  During training a sample that does not decode
(or has no image) is replaced by the next usable sample of the stream and counted in
``batch["skipped"]``; a shard damaged part-way (truncated without an index) ends there
with a warning.  Both are functions of the data, so resume stays exact.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from train import atomic
from train.cli import CommandParser, check_out_path, positive_int
from train.data import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, DataSpec, ImageRefused, builtin_paths, crop_image,
                        is_shard_pattern, load_rgb, loader_workers, paths_from_argument)
from train.errors import UserError

# Samples held by each reader's shuffle buffer (encoded bytes: about 100 KB per ImageNet JPEG).
SHUFFLE_BUFFER = 256
# Samples in a row that may fail to decode before a reader gives up on the data.
MAX_BAD_RUN = 10_000
# Image members a sample may carry, first found wins (WebDataset names members by extension).
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
INDEX_KIND = "wids-shard-index-v1"
MAX_INDEX_BYTES = 64 * 2 ** 20


@dataclass
class ShardSpec(DataSpec):
    """WebDataset shards as training data (``paths`` stays empty: samples live in the tars)."""

    # Absolute shard paths in the pattern's order.
    shards: List[str] = field(default_factory=list)
    # Samples per shard from the writer's index; None when some shard has no index entry.
    counts: Optional[List[int]] = None

    @property
    def n_images(self) -> int:
        return sum(self.counts) if self.counts else 0


# ----------------------------------------------------------------------------------------
# Finding and checking the shards

def expand_pattern(pattern: str) -> List[str]:
    """The shard paths a brace pattern names (``train-{0000..0127}.tar``), absolute."""
    import braceexpand

    return [os.path.abspath(p) for p in braceexpand.braceexpand(pattern)]


def tar_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a shard, from its first 512 bytes (None when it looks like one)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not head:
        return "is empty"
    if path.lower().endswith((".gz", ".tgz")):
        return None if head[:2] == b"\x1f\x8b" else "is not gzip-compressed although its name says so"
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.TarError:
        return "is not a tar file (its first block is no tar header)"
    return None


def check_shards(pattern: str, shards: Sequence[str]) -> None:
    """UserError unless every shard exists, is a regular file and starts like a tar."""
    missing = [p for p in shards if not os.path.exists(p)]
    if len(missing) == len(shards):
        shown = shards[0] if len(shards) == 1 else f"{shards[0]} ... {shards[-1]}"
        raise UserError(f"--data {pattern} matches no file (looked for {shown}); check the folder and the "
                        "brace range (e.g. train-{0000..0127}.tar), or write shards with "
                        "`python -m train write-shards SOURCE OUT_PATTERN`")
    if missing:
        raise UserError(f"--data {pattern}: {len(missing)} of {len(shards)} shards do not exist (e.g. {missing[0]}); "
                        "fix the brace range or write the missing shards")
    for path in shards:
        if not os.path.isfile(path):
            raise UserError(f"shard {path} is not a regular file; leave it out of the pattern")
        problem = tar_problem(path)
        if problem:
            raise UserError(f"shard {path} {problem}; rewrite it with `python -m train write-shards`, or leave it "
                            "out of the pattern")


def read_index(shards: Sequence[str]) -> Tuple[Optional[List[int]], List[str]]:
    """``(samples per shard or None, index files used)`` from ``wids`` indexes beside the shards.

    UserError when a shard's size differs from its index entry (truncated or rewritten).
    """
    entries: Dict[str, Tuple[int, Optional[int], str]] = {}
    used = []
    for folder in sorted({os.path.dirname(p) for p in shards}):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not name.endswith(".json") or not os.path.isfile(path) or os.path.getsize(path) > MAX_INDEX_BYTES:
                continue
            try:
                with open(path, encoding="utf-8") as fh:
                    doc = json.load(fh)
                listed = doc["shardlist"] if doc.get("__kind__") == INDEX_KIND else None
                found = {os.path.normpath(os.path.join(folder, e["url"])): (int(e["nsamples"]), e.get("filesize"), path)
                         for e in listed or ()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue        # not an index of ours (any JSON may live beside the shards)
            if found:
                entries.update(found)
                used.append(path)
    for shard in shards:
        if shard in entries and entries[shard][1] is not None and os.path.getsize(shard) != entries[shard][1]:
            raise UserError(f"shard {shard} has {os.path.getsize(shard)} bytes but its index {entries[shard][2]} says "
                            f"{entries[shard][1]}: it was truncated or rewritten; write it again with "
                            "`python -m train write-shards` (or delete the index to read it as it is)")
    if not shards or any(s not in entries for s in shards):
        return None, used
    return [entries[s][0] for s in shards], used


def shard_samples(path: str) -> Iterator[Dict]:
    """The samples of one shard in tar order: WebDataset's grouping of members by key."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as fh:
        yield from group_by_keys({**member, "__url__": path} for member in tar_file_iterator(fh))


def decode_sample(sample: Dict, max_pixels: int) -> Image.Image:
    """The sample's image as 8-bit RGB; :class:`ImageRefused` when it has none or too many pixels."""
    ext = next((e for e in IMAGE_KEYS if e in sample), None)
    if ext is None:
        members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
        raise ImageRefused(f"has no image member (members: {members}); store images as .jpg/.png members")
    return load_rgb(io.BytesIO(sample[ext]), max_pixels)


def probe(shards: Sequence[str], size: int, max_pixels: int) -> None:
    """UserError unless some shard yields a usable image; reads one sample when the data is good."""
    problem = ""
    for path in shards:
        try:
            for sample in shard_samples(path):
                try:
                    crop_image(decode_sample(sample, max_pixels), size, np.random.default_rng(0), False,
                               (1.0, 1.0), max_pixels)
                    return
                except Exception as exc:  # noqa: BLE001 - any failure means "not a usable image"
                    problem = problem or f"sample {sample['__key__']} in {path}: {_why(exc)}"
        except Exception as exc:  # noqa: BLE001 - a damaged tar
            problem = problem or f"{path} is damaged ({_why(exc)})"
    raise UserError(f"no usable image in the shards (e.g. {problem or 'every shard is empty'}); check them, "
                    "or write them again with `python -m train write-shards`")


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ImageRefused) else f"{type(exc).__name__}: {exc}"


def resolve_shards(cfg, where: Optional[str] = None) -> ShardSpec:
    """The run's shards (``where`` or ``data.path``), checked before training starts."""
    pattern = str(where if where is not None else cfg.data.path)
    size = int(cfg.data.image_size)
    max_pixels = int(getattr(cfg.data, "max_image_pixels", DEFAULT_MAX_PIXELS))
    shards = expand_pattern(pattern)
    check_shards(pattern, shards)
    counts, index_files = read_index(shards)
    if counts is None and cfg.train.max_steps is None and cfg.train.max_epochs is not None:
        raise UserError(f"train.max_epochs needs the number of samples, and the shards {pattern} have no index "
                        "(write-shards writes one); set train.max_steps (or --max-steps) instead")
    probe(shards, size, max_pixels)
    n = f"{sum(counts)} samples (index {', '.join(index_files)})" if counts else "sample count unknown (no index)"
    return ShardSpec(paths=[], image_size=size, random_crop=bool(cfg.data.random_crop),
                     source=f"WebDataset shards {pattern} ({len(shards)} shards, {n})", max_pixels=max_pixels,
                     shards=list(shards), counts=counts)


# ----------------------------------------------------------------------------------------
# Reading: one stream per reader slot, batches by micro-batch number

class _Entry:
    """One sample of a stream: decoded once, when first needed."""

    __slots__ = ("key", "file_index", "sample", "image", "problem")

    def __init__(self, key: str, file_index: int, sample: Dict):
        self.key, self.file_index, self.sample = key, file_index, sample
        self.image: Optional[Image.Image] = None
        self.problem: Optional[str] = None


class _Lookahead:
    """An iterator whose next items can be looked at without being consumed."""

    def __init__(self, items: Iterator):
        self.items, self.ahead = items, deque()

    def take(self):
        return self.ahead.popleft() if self.ahead else next(self.items)

    def peek(self, i: int):
        while len(self.ahead) <= i:
            self.ahead.append(next(self.items))
        return self.ahead[i]


class ShardBatches(torch.utils.data.IterableDataset):
    """Batches of one rank, from micro-batch ``start_step * accumulate`` to ``end_step * accumulate``.

    Yields collated batches: ``{"image": uint8 (B, 3, S, S), "path": [sample keys],
    "file_index": (B,) (offset in the indexed shards, -1 without an index), "skipped": (B,)}``.
    ``readers`` must equal the DataLoader's worker count (1 without workers).
    """

    def __init__(self, spec: ShardSpec, seed: int, batch_size: int, accumulate: int, world_size: int, rank: int,
                 start_step: int, end_step: Optional[int], readers: int):
        self.spec, self.seed = spec, int(seed)
        self.batch_size, self.accumulate = int(batch_size), int(accumulate)
        self.world_size, self.rank, self.readers = int(world_size), int(rank), max(1, int(readers))
        self.start_step, self.end_step = int(start_step), end_step
        self.offsets = np.concatenate([[0], np.cumsum(spec.counts)]) if spec.counts else None
        self._perms: Dict[int, np.ndarray] = {}
        self._reported: set = set()

    # -- which shard a visit reads, and a slot's stream of samples -----------------------
    def shard_of_visit(self, v: int) -> int:
        n = len(self.spec.shards)
        epoch = v // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, 3, epoch]).permutation(n)}
        return int(self._perms[epoch][v % n])

    def _visit(self, v: int) -> Iterator[_Entry]:
        shard = self.shard_of_visit(v)
        path = self.spec.shards[shard]
        rng = np.random.default_rng([self.seed, 4, v])
        buffer: List[_Entry] = []

        def pop() -> _Entry:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            return buffer.pop()

        pos = 0
        try:
            for pos, sample in enumerate(shard_samples(path), 1):
                index = int(self.offsets[shard]) + pos - 1 if self.offsets is not None else -1
                buffer.append(_Entry(str(sample["__key__"]), index, sample))
                if len(buffer) >= SHUFFLE_BUFFER:
                    yield pop()
        except Exception as exc:  # noqa: BLE001 - a damaged tar ends the visit, the same way every time
            self._warn(path, f"warning: shard {path} is damaged after {pos} samples ({_why(exc)}); the rest of it "
                             "is skipped")
        while buffer:
            yield pop()

    def stream(self, slot: int, start: int) -> Iterator[_Entry]:
        """Samples of reader slot ``slot`` from its ``start``-th on (endless)."""
        step = self.world_size * self.readers
        counts, v, empty = self.spec.counts, slot, 0
        while True:
            if counts is not None and start >= counts[self.shard_of_visit(v)]:
                start -= counts[self.shard_of_visit(v)]       # skipped without opening the shard
                v += step
                continue
            seen = 0
            for entry in self._visit(v):
                seen += 1
                if start:
                    start -= 1
                else:
                    yield entry
            empty = 0 if seen else empty + 1
            if empty > 2 * len(self.spec.shards) + step:
                raise UserError(f"{empty} shard visits in a row yielded no sample ({self.spec.source}); check the "
                                "shards")
            v += step

    # -- decoding and cropping -----------------------------------------------------------
    def _warn(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            print(message, file=sys.stderr)

    def _crop(self, entry: _Entry, rng: np.random.Generator) -> Optional[np.ndarray]:
        if entry.image is None and entry.problem is None:
            try:
                entry.image = decode_sample(entry.sample, self.spec.max_pixels)
            except Exception as exc:  # noqa: BLE001 - any decoding failure skips the sample
                entry.problem = _why(exc)
            entry.sample = None
        if entry.image is not None:
            try:
                return crop_image(entry.image, self.spec.image_size, rng, self.spec.random_crop, (1.0, 1.0),
                                  self.spec.max_pixels)
            except ImageRefused as exc:
                entry.image, entry.problem = None, str(exc)
        self._warn(entry.key, f"warning: skipping unusable sample {entry.key} ({entry.problem})")
        return None

    def _item(self, look: _Lookahead, k: int) -> Dict:
        """Sample number ``k``: the next entry, or (when it is unusable) the next usable one after it."""
        rng = np.random.default_rng([self.seed, 1, k])
        entry, skipped = look.take(), 0
        chosen, crop = entry, self._crop(entry, rng)
        while crop is None:
            if skipped >= MAX_BAD_RUN:
                raise UserError(f"{MAX_BAD_RUN} samples in a row could not be used (e.g. {entry.key}: "
                                f"{entry.problem}); check the shards ({self.spec.source})")
            chosen = look.peek(skipped)
            skipped += 1
            crop = self._crop(chosen, rng)
        return {"image": torch.from_numpy(crop.transpose(2, 0, 1).copy()), "path": chosen.key,
                "file_index": chosen.file_index, "skipped": skipped}

    def micro_batch(self, look: _Lookahead, m: int) -> Dict:
        first = (m * self.world_size + self.rank) * self.batch_size
        items = [self._item(look, first + i) for i in range(self.batch_size)]
        return torch.utils.data.default_collate(items)

    def __iter__(self) -> Iterator[Dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        W, B = self.readers, self.batch_size
        first = self.start_step * self.accumulate
        last = self.end_step * self.accumulate if self.end_step is not None else None
        role = (worker + first) % W
        m = first + (role - first) % W            # this reader's first micro-batch
        look = _Lookahead(self.stream(self.rank * W + role, (m // W) * B))
        while last is None or m < last:
            yield self.micro_batch(look, m)
            m += W


def make_shard_loader(spec: ShardSpec, seed: int, batch_size: int, accumulate: int, world_size: int, rank: int,
                      start_step: int, end_step: Optional[int], num_workers: int = 0, pin_memory: bool = False):
    """``train.data.make_loader`` for shards: a DataLoader over :class:`ShardBatches`."""
    workers = loader_workers(num_workers)
    readers = max(1, workers) * int(world_size)
    if rank == 0 and len(spec.shards) < readers:
        print(f"warning: {len(spec.shards)} shard(s) for {readers} readers ({world_size} process(es) x "
              f"{max(1, workers)} loader worker(s)): some samples repeat within an epoch; write more, smaller "
              "shards (write-shards --shard-size)", file=sys.stderr)
    dataset = ShardBatches(spec, seed, batch_size, accumulate, world_size, rank, start_step, end_step, workers)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=2 if workers else None)


def first_crops(spec: ShardSpec, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` deterministic crops (B, 3, S, S) in [-1, 1]: the start of one reader's stream
    (``train.data.fixed_crops`` for shards; the same on every rank)."""
    batches = ShardBatches(spec, seed, count, 1, 1, 0, 0, 1, readers=1)
    return next(iter(batches))["image"].float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------
# Writing: python -m train write-shards SOURCE OUT_PATTERN

_NUMBER = re.compile(r"%(0?\d*)d")


def shard_name(pattern: str, i: int) -> str:
    return _NUMBER.sub(lambda mt: f"{i:{mt.group(1)}d}", pattern, count=1)


def data_pattern(pattern: str, n: int) -> str:
    """The ``--data`` value naming shards 0..n-1 written with ``pattern``."""
    if n == 1:
        return shard_name(pattern, 0)
    spec = _NUMBER.search(pattern).group(1)
    return _NUMBER.sub(lambda mt: f"{{{0:{spec}d}..{n - 1:{spec}d}}}", pattern, count=1)


def _sample_key(i: int, path: str) -> str:
    # WebDataset splits a member name at its first dot: keys hold no dots.
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(path))[0])[:60]
    return f"{i:08d}_{stem}"


def encode_image(path: str, size: Optional[int], max_pixels: int) -> Tuple[str, bytes]:
    """``(member extension, bytes)`` of one image, its shorter side reduced to ``size`` if larger."""
    with open(path, "rb") as fh:
        data = fh.read()
    img = load_rgb(io.BytesIO(data), max_pixels)        # decodes: unreadable files are refused here
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    ext = {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)
    if size is None or min(img.size) <= size:
        return ext, data
    w, h = img.size
    img = img.resize((max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))), Image.BICUBIC)
    out = io.BytesIO()
    if ext == "jpg":
        img.save(out, format="JPEG", quality=95)
        return "jpg", out.getvalue()
    img.save(out, format="PNG")
    return "png", out.getvalue()


def write_shards(paths: Sequence[str], pattern: str, shard_size: int, size: Optional[int] = None, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, log=print) -> Dict:
    """Write ``paths`` (in an order shuffled by ``seed``) into shards; returns what was written."""
    from webdataset import TarWriter

    folder = os.path.dirname(os.path.abspath(shard_name(pattern, 0)))
    os.makedirs(folder, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(paths))
    entries, skipped, pending = [], [], []

    def flush():
        path = shard_name(pattern, len(entries))
        with atomic.replacing(path) as tmp:
            with open(tmp, "wb") as fh, TarWriter(fh, encoder=False, mtime=0.0) as sink:
                for key, ext, data in pending:
                    sink.write({"__key__": key, ext: data})
        entries.append({"url": os.path.basename(path), "nsamples": len(pending), "filesize": os.path.getsize(path)})
        pending.clear()

    written = 0
    for i in order:
        source = paths[int(i)]
        try:
            ext, data = encode_image(source, size, max_pixels)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is skipped, as in training
            skipped.append(source)
            if len(skipped) <= 5:
                log(f"warning: skipping {source} ({_why(exc)})")
            continue
        pending.append((_sample_key(written, source), ext, data))
        written += 1
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not entries:
        raise UserError(f"no readable image among the {len(paths)} source files; nothing was written")
    stem = re.sub(r"[-_.]+$", "", os.path.basename(pattern).split("%")[0]) or "shards"
    index = os.path.join(folder, f"{stem}.json")
    atomic.write_text(index, json.dumps({"__kind__": INDEX_KIND, "wids_version": 1, "name": stem,
                                         "shardlist": entries}, indent=1) + "\n")
    return {"shards": len(entries), "samples": written, "skipped": skipped, "index": index,
            "data": data_pattern(pattern, len(entries))}


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m train write-shards",
                      description="Write images into WebDataset tar shards for `fit --data PATTERN`.")
    p.add_argument("source", help="image folder, file list (one path per line) or 'builtin'")
    p.add_argument("out_pattern", help="shard paths with a number field, e.g. shards/train-%%04d.tar")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--size", type=positive_int, help="reduce each image's shorter side to this many pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    return p


def cli_main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    pattern = args.out_pattern
    if len(_NUMBER.findall(pattern)) != 1 or not pattern.endswith(".tar"):
        raise UserError(f"write-shards: OUT_PATTERN {pattern!r} must end in .tar and hold one shard number field "
                        "such as %04d (e.g. shards/train-%04d.tar)")
    check_out_path(os.path.dirname(os.path.abspath(shard_name(pattern, 0))), "folder", "write-shards", "OUT_PATTERN")
    paths = builtin_paths() if args.source == "builtin" else paths_from_argument(os.path.abspath(args.source))[0]
    done = write_shards(paths, pattern, args.shard_size, args.size, args.seed)
    skipped = f", skipped {len(done['skipped'])} unreadable file(s)" if done["skipped"] else ""
    print(f"wrote {done['samples']} samples in {done['shards']} shard(s){skipped}; index {done['index']}\n"
          f"train with: --data '{done['data']}'")
    return 0


__all__ = ["ShardSpec", "ShardBatches", "is_shard_pattern", "resolve_shards", "make_shard_loader", "first_crops",
           "write_shards", "shard_samples", "cli_main"]
