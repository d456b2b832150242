"""Training images: folders, file lists, taming ``CustomTrain`` sections and built-in photos.

    python -m train fit CONFIG --data /path/to/images        # a folder (searched recursively)
    python -m train fit CONFIG --data train_files.txt        # one image path per line
    python -m train fit CONFIG --data builtin                # scikit-image's photographs

Where the images come from (first that is set wins): ``--data``, ``data.path`` in the
config, then a taming YAML ``data`` section whose ``train`` dataset is
``taming.data.custom.CustomTrain`` (its ``training_images_list_file``, read with taming's
semantics: one path per line, rescale the shorter side to ``size``, centre crop).

Exact resume needs the data to be a pure function of the step, not of an iterator's
history.  So a sample is addressed by its *global sample number* k (how many images all
ranks have drawn before it): k picks the epoch (k // N), the epoch's permutation (seeded by
``(seed, epoch)``) picks the file, and a generator seeded by ``(seed, k)`` picks the crop.
:class:`StepBatchSampler` hands out the sample numbers of each micro-batch from any step
onward, so a run resumed at step s reads exactly the batches the uninterrupted run read.

Unreadable or corrupt images never stop training: a file that cannot be read or decoded is
replaced by the next file of the permutation and counted in ``batch["skipped"]``.  ``fit``
opens no file before training beyond what proves the data usable (``resolve_data(...,
scan=False)``): files are tried in the order of the first epoch until one decodes, so a
million-file data set starts as fast as a small one, and a data set with no readable image
is still a :class:`UserError` before training starts.  ``eval`` and ``extract-features``
read every file anyway; they keep the header scan (``scan=True``), which drops unreadable
files up front and names them.

The data pipeline (``make_loader``):

* ``train.num_workers: auto`` (the default) starts :func:`loader_workers` worker processes:
  the CPUs this process may use (``os.sched_getaffinity``) shared among the processes of
  this node (torchrun's ``LOCAL_WORLD_SIZE``), one left for the training process, at most
  8; none on a one-CPU share.  Workers are persistent and prefetch.  An int sets the count
  (0 = load in the training process).
* Crops travel between processes as uint8 ``(3, S, S)`` tensors (a quarter of float32);
  :func:`to_model_range` turns them into taming's ``x / 127.5 - 1`` floats on the training
  device, bit-identical to :func:`to_tensor` on the host (a 256-entry table, not a
  division, which CUDA computes as a multiplication by the reciprocal).
* JPEGs are decoded in draft mode (libjpeg's DCT scaling by 1/2, 1/4 or 1/8) when the stored
  image is at least twice what the crop needs (its shorter side >= 2 x image_size x the
  largest zoom of ``scale_range``): decoding a 1000 x 750 photograph for 256 px crops takes
  a fraction of the time.  The crop is then taken from the smaller decode, so its pixels
  differ slightly from a full decode followed by the bicubic rescale (no more than a
  different resampling filter would); the result is still a pure function of the file and
  the sample number.  ``extract-features`` decodes the same way, so cached DINO features
  match the training crops.
* Batches depend on the sample numbers only, never on which worker made them: any worker
  count gives bit-identical batches, and a resumed run reads exactly what the uninterrupted
  one read.

Hostile files are treated the same way, before they cost memory: the pixel count from the
header is checked against ``data.max_image_pixels`` before decoding (a 661-byte PNG can
declare 200000 x 1 pixels, or 50000 x 50000), and so is the size the image would have once
its shorter side is rescaled to the crop size (an extreme aspect ratio).  16-bit and float
images are scaled to 8 bits (``to_rgb``) instead of being clipped.  Folder listings follow
symbolic links but list each real folder once, so a link loop cannot multiply the images.
"""
from __future__ import annotations

import contextlib
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from train.errors import UserError
from train.schema import DataSection

# A --data value ending in one of these names WebDataset tar shards (train/shards.py).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# scikit-image's bundled colour photographs (skimage/data) used by ``--data builtin``; its
# grey ones are left out because a mostly grey training set teaches a model to drop colour.
# The held-out pair is never trained on: the demo measures PSNR on it.
BUILTIN_TRAIN = ("astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                 "motorcycle_right.png", "retina.jpg", "rocket.jpg")
BUILTIN_HELDOUT = ("chelsea.png", "coffee.png")
# Built-in crops are taken after rescaling the shorter side to image_size x U(1, 4) (capped
# at the photo's own size), so a few photographs give many different crops.
BUILTIN_SCALE_RANGE = (1.0, 4.0)

# Upstream dataset classes that are plain image-path lists (their file-list parameter).
TAMING_LIST_DATASETS = {
    "taming.data.custom.CustomTrain": "training_images_list_file",
    "taming.data.custom.CustomTest": "test_images_list_file",
}

# data.max_image_pixels when no config says otherwise (its meaning is in train/schema.py).
DEFAULT_MAX_PIXELS = DataSection.max_image_pixels
# Modes PIL gives 16-bit images (PNG, TIFF); "I" is 32-bit but holds 16-bit PNGs in older Pillows.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class DataSpec:
    """Which files to read and how to crop them."""

    paths: List[str]
    image_size: int
    random_crop: bool = True
    # Shorter side is rescaled to image_size x U(lo, hi) before cropping; (1, 1) is taming's.
    scale_range: Tuple[float, float] = (1.0, 1.0)
    # Where the list came from, for the log ("folder /x (1200 images)").
    source: str = ""
    # Files dropped because their header could not be read (only when the headers were scanned).
    unreadable: List[str] = field(default_factory=list)
    # Keep decoded images in memory (the built-in set is a few MB).
    cache: bool = False
    # data.max_image_pixels: larger images (as stored, or once rescaled for cropping) are skipped.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Why each unreadable file was dropped (path -> problem and fix), for the messages.
    problems: Dict[str, str] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        """Images in one epoch (``train/shards.py``'s ShardSpec counts its samples)."""
        return len(self.paths)


# ----------------------------------------------------------------------------------------
# Finding the files

def builtin_dir() -> str:
    try:
        import skimage
    except ImportError:
        raise UserError("--data builtin needs scikit-image (pip install scikit-image); "
                        "or point --data at an image folder") from None
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def builtin_paths(heldout: bool = False) -> List[str]:
    names = BUILTIN_HELDOUT if heldout else BUILTIN_TRAIN
    root = builtin_dir()
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))]


def list_folder(path: str) -> List[str]:
    """Image files under ``path`` (recursive, sorted so every rank sees the same order).

    Symbolic links to folders are followed (data sets are often assembled from links), but
    each real folder is listed once, where the sorted walk first reaches it: a link back up
    the tree would otherwise list the same files again at every level, until the kernel's
    limit of 40 links in one path.
    """
    found = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []        # already listed under another name: neither its files nor below
            continue
        seen.add((st.st_dev, st.st_ino))
        # Real sub-folders before links: a folder reached both ways is listed under its own path.
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))) + \
            sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def read_file_list(path: str) -> List[str]:
    """taming ``CustomTrain`` semantics: one path per line.

    Relative paths are taken relative to the working directory, as taming does; when that
    does not exist, relative to the list file's folder (lists that travel with their data).
    """
    try:
        with open(path, "r", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--data {path}: neither an image folder nor a text file list; "
                        "give a folder or a file with one image path per line") from None
    except OSError as exc:
        raise UserError(f"--data {path}: cannot be read ({exc.strerror})") from None
    base = os.path.dirname(os.path.abspath(path))
    paths = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not os.path.isabs(line) and not os.path.exists(line) and os.path.exists(os.path.join(base, line)):
            line = os.path.join(base, line)
        paths.append(line)
    return paths


def data_argument(value: str, flag: str = "--data") -> str:
    """A ``--data`` value as a run records it: ``builtin`` or an absolute path.

    An empty value is refused: ``os.path.abspath("")`` is the working directory, so it would
    silently train on whatever images lie anywhere below it.
    """
    if not str(value).strip():
        raise UserError(f"{flag} is empty; give an image folder, a file list (one path per line) or 'builtin'")
    return value if value == "builtin" else os.path.abspath(value)


def is_shard_pattern(value) -> bool:
    """Whether a ``--data`` value names tar shards (a brace pattern or one ``.tar`` file)."""
    return isinstance(value, str) and value.lower().endswith(SHARD_SUFFIXES)


def paths_from_argument(path: str) -> Tuple[List[str], str]:
    """A ``--data`` value -> (file paths, description)."""
    if not str(path).strip():
        raise UserError("data.path is empty; give an image folder, a file list (one path per line) or 'builtin'")
    if is_shard_pattern(path):
        # fit reads shards through train/shards.py before it gets here; other commands read files.
        raise UserError(f"--data {path}: WebDataset shards are read by `fit` only; give this command an image "
                        "folder or a file list")
    if path == "builtin":
        paths = builtin_paths()
        return paths, f"builtin ({len(paths)} scikit-image photographs)"
    if os.path.isdir(path):
        paths = list_folder(path)
        return paths, f"folder {path} ({len(paths)} image files)"
    if os.path.isfile(path):
        if path.lower().endswith(IMAGE_EXTENSIONS):
            return [path], f"image {path}"
        paths = read_file_list(path)
        return paths, f"file list {path} ({len(paths)} entries)"
    raise UserError(f"--data {path}: no such file or folder; give an image folder, a file list "
                    "(one path per line) or 'builtin'")


def _taming_list_file(cfg, split: str) -> Optional[Tuple[str, int]]:
    """(list file, size) from a taming YAML ``data`` section; None when there is none."""
    upstream = cfg.upstream.get("data") if cfg.upstream is not None else None
    if not upstream:
        return None
    from train.schema import as_dict

    upstream = as_dict(upstream)
    params = upstream.get("params") or {}
    section = params.get(split)
    if not isinstance(section, dict):
        return None
    target = section.get("target", "")
    if target not in TAMING_LIST_DATASETS:
        raise UserError(f"data.params.{split}.target {target!r}: only taming's CustomTrain/CustomTest "
                        "(file lists) can be read directly; pass --data /path/to/image/folder "
                        "(or a file with one image path per line) instead")
    key = TAMING_LIST_DATASETS[target]
    dparams = section.get("params") or {}
    if not dparams.get(key):
        raise UserError(f"data.params.{split}.params.{key} is missing; set it or pass --data")
    return str(dparams[key]), int(dparams.get("size") or cfg.data.image_size)


class ImageRefused(ValueError):
    """An image this tool will not decode or crop; the message says why and what to do.

    A ValueError, so every place that skips undecodable files skips and counts these too.
    """


@contextlib.contextmanager
def _own_pixel_limit():
    """PIL's decompression-bomb check off while opening a header.

    PIL warns above 89 M pixels and refuses above 179 M, whatever ``data.max_image_pixels``
    says; :func:`too_many_pixels` applies the configured limit to the same header size
    before anything is decoded.  Data workers are processes, so the global is not shared
    with another thread that opens images.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_header(path: str) -> Image.Image:
    """``Image.open`` (reads the header only; nothing is decoded yet)."""
    with _own_pixel_limit():
        return Image.open(path)


def too_many_pixels(w: int, h: int, max_pixels: int) -> Optional[str]:
    """Why a ``w`` x ``h`` image is refused by the pixel limit, or None."""
    if w * h > max_pixels:
        return (f"{w} x {h} = {w * h:,} pixels is more than data.max_image_pixels ({max_pixels:,}); shrink the "
                "image, or raise the limit (data.max_image_pixels=N) if such images are meant")
    return None


def rescaled_size(w: int, h: int, short: int, size: int) -> Tuple[int, int]:
    """Size of a ``w`` x ``h`` image whose shorter side is rescaled to ``short`` (never below ``size``)."""
    ratio = short / min(w, h)
    return max(size, int(round(w * ratio))), max(size, int(round(h * ratio)))


def rescale_problem(w: int, h: int, short: int, size: int, max_pixels: int) -> Optional[str]:
    """Why rescaling a ``w`` x ``h`` image for ``size`` px crops is refused, or None.

    Only extreme aspect ratios get here: a 200000 x 1 image rescaled to a 256 px shorter
    side would be 51200000 x 256 pixels (13 billion) for one 256 x 256 crop.
    """
    w2, h2 = rescaled_size(w, h, short, size)
    if w2 * h2 > max_pixels:
        return (f"{w} x {h} pixels rescaled to a {short} px shorter side would be {w2} x {h2} = {w2 * h2:,} pixels, "
                f"more than data.max_image_pixels ({max_pixels:,}): its aspect ratio is too extreme for "
                f"{size} px crops; crop the image to a less elongated shape, or leave it out")
    return None


def image_problem(path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """Why ``path`` cannot be used for ``size`` px crops, from its header alone; None when it can."""
    try:
        # A FIFO (or a device) named like an image would block the open, or never end.
        if isinstance(path, (str, bytes, os.PathLike)) and not stat.S_ISREG(os.stat(path).st_mode):
            return "is not a regular file (a FIFO, socket or device); leave it out of the data"
        with open_header(path) as im:
            w, h = im.size
    except Exception as exc:  # noqa: BLE001 - any failure means "not a readable image"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return f"cannot be read as an image ({reason}); check that it is an image file and not damaged"
    if w <= 0 or h <= 0:
        return f"has no pixels ({w} x {h}); leave it out"
    return too_many_pixels(w, h, max_pixels) or rescale_problem(w, h, size, size, max_pixels)


def check_readable(paths: Sequence[str], size: int = 1,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[List[str], List[str], Dict[str, str]]:
    """Split ``paths`` into (readable, unreadable, {unreadable path: why}) from each header.

    Only the header is read (fast); files that fail to decode later are handled at load time.
    """
    good, bad, problems = [], [], {}
    for p in paths:
        problem = image_problem(p, size, max_pixels)
        if problem is None:
            good.append(p)
        else:
            bad.append(p)
            problems[p] = problem
    return good, bad, problems


def no_image_message(source: str, bad: Sequence[str], problems: Dict[str, str]) -> str:
    """The error for a data set without one usable image: the first file and why."""
    if not bad:
        return f"no readable image in {source}; check the path and the files"
    why = problems.get(bad[0], "cannot be read as an image; check the path and the files")
    if len(bad) == 1 and source.startswith("image "):
        return f"no readable image in {source}: {why}"
    return f"no readable image in {source} (e.g. {bad[0]}: {why})"


def resolve_data(cfg, data_arg: Optional[str] = None, split: str = "train", scan: bool = True) -> DataSpec:
    """The training (or held-out, ``split="validation"``) images of a run.

    ``scan`` reads every file's header now and drops the unreadable ones (``eval``: it names
    what it leaves out).  ``scan=False`` (``fit``) opens no header: files are decoded in the
    first epoch's order (``train.seed``) only until one gives a crop (:func:`check_usable`),
    and bad files are skipped and counted when training first reads them.
    Raises :class:`UserError` when nothing names the data or no file is a readable image.
    """
    size = int(cfg.data.image_size)
    random_crop = bool(cfg.data.random_crop) if split == "train" else False
    scale = (1.0, 1.0)
    cache = False
    where = data_arg if split == "train" else None
    if where is None:
        where = cfg.data.path if split == "train" else cfg.data.val_path
    if split != "train" and where is None and (data_arg == "builtin" or cfg.data.path == "builtin"):
        where = "builtin"
    if where == "builtin":
        paths = builtin_paths(heldout=split != "train")
        source = f"builtin ({len(paths)} scikit-image photographs{', held out' if split != 'train' else ''})"
        scale, cache = BUILTIN_SCALE_RANGE, True
        # Held-out crops are random too (still a fixed function of the seed): centre crops of
        # two photos would repeat the same few views.
        random_crop = True
    elif where is not None:
        paths, source = paths_from_argument(str(where))
    else:
        found = _taming_list_file(cfg, split)
        if found is None:
            if split != "train":
                return DataSpec(paths=[], image_size=size, random_crop=False, source="none")
            raise UserError("no training data: pass --data /path/to/images (a folder, a file list or "
                            "'builtin'), or set data.path in the config")
        list_file, size = found
        paths = read_file_list(list_file)
        # taming's CustomTrain/CustomTest always centre-crop after rescaling.
        random_crop = False
        source = f"taming file list {list_file} ({len(paths)} entries)"
    max_pixels = int(getattr(cfg.data, "max_image_pixels", DEFAULT_MAX_PIXELS))
    if not scan:
        spec = DataSpec(paths=paths, image_size=size, random_crop=random_crop, scale_range=scale,
                        source=source, cache=cache, max_pixels=max_pixels)
        check_usable(spec, int(cfg.train.seed))
        return spec
    good, bad, problems = check_readable(paths, size, max_pixels)
    if not good and split == "train":
        raise UserError(no_image_message(source, bad, problems))
    return DataSpec(paths=good, image_size=size, random_crop=random_crop, scale_range=scale,
                    source=source, unreadable=bad, cache=cache, max_pixels=max_pixels, problems=problems)


def check_usable(spec: DataSpec, seed: int) -> None:
    """:class:`UserError` unless some file of ``spec`` gives a crop.

    Files are decoded in the order training reads them (the first epoch's permutation), so
    on good data this decodes one file -- the first one training needs anyway -- and a data
    set without one usable image is refused before any worker starts.  Nothing is printed
    for the bad files met on the way: training warns about each when it reaches it.
    """
    ImageCrops(spec, seed).sample(0, quiet=True)


# ----------------------------------------------------------------------------------------
# Loading and cropping

# Image.info key of a draft-decoded image: ((width, height) as stored, the area of the
# stored image in decoded pixels, PIL's draft box).
DRAFT_AREA = "vqtok_draft_area"


def load_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_short: int = 0) -> Image.Image:
    """The image at ``path`` (a file name, or an open binary file such as a shard member's
    bytes) as 8-bit RGB; :class:`ImageRefused` when it has more than
    ``max_pixels`` pixels (checked from the header, before decoding) or is no regular file.

    ``draft_short`` > 0: a JPEG whose shorter side is at least twice ``draft_short`` is
    decoded at 1/2, 1/4 or 1/8 scale (PIL's ``Image.draft``, libjpeg's DCT scaling), the
    smallest that keeps its shorter side >= ``draft_short``.
    """
    # Checked here, not only in the header scan fit no longer runs: opening a FIFO named
    # like an image would block until someone writes to it.
    if isinstance(path, (str, bytes, os.PathLike)) and not stat.S_ISREG(os.stat(path).st_mode):
        raise ImageRefused("is not a regular file (a FIFO, socket or device); leave it out of the data")
    with open_header(path) as im:
        problem = too_many_pixels(im.size[0], im.size[1], max_pixels)
        if problem:
            raise ImageRefused(problem)
        stored = im.size
        drafted = None
        if draft_short > 0 and im.format == "JPEG":
            # PIL picks the largest scale s in (8, 4, 2) with both sides // s >= draft_short,
            # or none: only an image at least twice as large as needed is drafted.
            drafted = im.draft(None, (draft_short, draft_short))
        im.load()
        rgb = to_rgb(im)
    if drafted is not None and rgb.size != stored:
        # (The area the decoded pixels cover, in their own units: see resize_stored.)
        rgb.info[DRAFT_AREA] = (stored, drafted[1])
    return rgb


def stored_size(img: Image.Image) -> Tuple[int, int]:
    """The size of ``img`` as stored in its file (larger than ``img.size`` when drafted)."""
    area = img.info.get(DRAFT_AREA)
    return tuple(area[0]) if area else img.size


def resize_stored(img: Image.Image, size: Tuple[int, int]) -> Image.Image:
    """``img`` resized (bicubic) to ``size`` as if from the image as stored.

    A draft-decoded side that is no multiple of the scale s ends in a pixel covering less
    than s stored pixels (683 rows / 8 = 85.4 decoded rows): the resize reads exactly the
    stored image's area (PIL's ``box``) instead of stretching 86 rows over it.
    """
    area = img.info.get(DRAFT_AREA)
    out = img.resize(size, Image.BICUBIC, box=area[1] if area else None)
    out.info.pop(DRAFT_AREA, None)          # the result is an ordinary image of its own size
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB, scaling high-bit-depth pixels instead of clipping them.

    PIL's ``convert("RGB")`` clips 16-bit and float values to 0..255: a 16-bit PNG becomes
    almost all white and a float image in [0, 1] almost all black.  16-bit values are
    divided by 257 (65535 -> 255) and floats in [0, 1] multiplied by 255, both rounded.
    Floats outside [0, 1] (or NaN) and 32-bit integers beyond 16 bits have no agreed
    scale: they are refused (:class:`ImageRefused`) rather than guessed at.
    """
    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise ImageRefused(f"32-bit integer pixels from {lo} to {hi} have no known scale (16-bit images hold "
                               "0..65535); save the image as 8- or 16-bit")
        grey = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ImageRefused("float pixels include NaN or infinity; save the image as 8- or 16-bit")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageRefused(f"float pixels from {lo:g} to {hi:g}: only floats in [0, 1] have a known scale; "
                               "scale the image to [0, 1] or save it as 8- or 16-bit")
        grey = np.rint(values * 255.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def crop_image(img: Image.Image, size: int, rng: np.random.Generator, random_crop: bool,
               scale_range: Tuple[float, float], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Rescale the shorter side to ``size * U(scale_range)`` (never below ``size``), crop.

    With ``scale_range=(1, 1)`` and a centre crop this is taming's ``ImagePaths``
    preprocessing (albumentations ``SmallestMaxSize`` + ``CenterCrop``/``RandomCrop``).
    :class:`ImageRefused` when the rescaled image would exceed ``max_pixels`` (an extreme
    aspect ratio), before anything is allocated.
    """
    w, h = stored_size(img)
    lo, hi = scale_range
    if hi > lo:
        # A random zoom, but never upsampling past the photo's own resolution.
        short = max(size, min(int(round(size * float(rng.uniform(lo, hi)))), min(w, h)))
    else:
        short = max(size, int(round(size * lo)))
    if min(w, h) != short or img.size != (w, h):
        problem = rescale_problem(w, h, short, size, max_pixels)
        if problem:
            raise ImageRefused(problem)
        img = resize_stored(img, rescaled_size(w, h, short, size))
        w, h = img.size
    if random_crop:
        x = int(rng.integers(0, w - size + 1))
        y = int(rng.integers(0, h - size + 1))
    else:
        x, y = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((x, y, x + size, y + size)), dtype=np.uint8)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1] (taming's ``image / 127.5 - 1``)."""
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_uint8_chw(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> uint8 CHW: what data workers send (a quarter of :func:`to_tensor`'s bytes)."""
    # One copy, which also makes PIL's read-only buffer writable (torch warns otherwise).
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), dtype=np.uint8, order="C"))


# The 256 values of to_tensor, computed by the same numpy expression: looking them up gives
# bit-identical floats on any device (CUDA divides a tensor by a scalar as a multiplication
# by its reciprocal, which can differ in the last bit).
_MODEL_RANGE = torch.from_numpy(np.arange(256, dtype=np.float32) / 127.5 - 1.0)
_MODEL_RANGE_ON: Dict[torch.device, torch.Tensor] = {}


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1], equal to :func:`to_tensor`'s values,
    computed where ``images`` lie (the training device).  Float images are taken to be in
    the model's range already and returned as they are."""
    if images.dtype != torch.uint8:
        return images
    table = _MODEL_RANGE_ON.get(images.device)
    if table is None:
        table = _MODEL_RANGE_ON.setdefault(images.device, _MODEL_RANGE.to(images.device))
    return table[images.int()]         # int32 indices: half the transient memory of int64


class ImageCrops(Dataset):
    """Item ``k`` is the crop for global sample number ``k`` (see the module docstring).

    ``len()`` is the number of files (one epoch); indices beyond it address later epochs.
    Each item is ``{"image": uint8 (3, S, S), "path": str, "file_index": int, "skipped":
    int}`` (``path`` lets DinoVQ look features up in its cache); :func:`to_model_range`
    turns a batch of them into the model's [-1, 1] on the training device.
    """

    def __init__(self, spec: DataSpec, seed: int):
        if not spec.paths:
            raise UserError(f"no readable image in {spec.source or 'the data set'}")
        self.spec = spec
        self.seed = int(seed)
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None
        self._cache: Dict[int, Image.Image] = {}
        self._reported: set = set()

    def __len__(self) -> int:
        return len(self.spec.paths)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self))
            self._perm_epoch = epoch
        return self._perm

    def _image(self, index: int) -> Image.Image:
        if index in self._cache:
            return self._cache[index]
        # The largest zoom of scale_range needs this shorter side: draft decoding keeps it.
        need = int(math.ceil(self.spec.image_size * max(1.0, float(self.spec.scale_range[1]))))
        img = load_rgb(self.spec.paths[index], self.spec.max_pixels, draft_short=need)
        if self.spec.cache:
            # Cached photos are stored no larger than the largest zoom needs (faster crops).
            limit = int(round(self.spec.image_size * self.spec.scale_range[1]))
            w, h = stored_size(img)
            if min(w, h) > limit:
                img = resize_stored(img, (round(w * limit / min(w, h)), round(h * limit / min(w, h))))
            self._cache[index] = img
        return img

    def __getitem__(self, k: int) -> Dict[str, torch.Tensor]:
        return self.sample(k)

    def sample(self, k: int, quiet: bool = False) -> Dict[str, torch.Tensor]:
        """Item ``k``; ``quiet`` prints no warning for the files it skips."""
        n = len(self)
        epoch, pos = divmod(int(k), n)
        perm = self.permutation(epoch)
        rng = np.random.default_rng([self.seed, 1, int(k)])
        first_bad, why = None, ""
        # A file that fails to decode is replaced by the next one of the permutation, so the
        # choice stays a function of k (exact resume) and a bad file never stops training.
        for offset in range(n):
            index = int(perm[(pos + offset) % n])
            try:
                img = self._image(index)
                crop = crop_image(img, self.spec.image_size, rng, self.spec.random_crop, self.spec.scale_range,
                                  self.spec.max_pixels)
                return {"image": to_uint8_chw(crop), "path": self.spec.paths[index], "file_index": index,
                        "skipped": offset}
            except Exception as exc:  # noqa: BLE001 - any decoding failure skips the file
                path = self.spec.paths[index]
                if first_bad is None:
                    first_bad = path
                    why = str(exc) if isinstance(exc, ImageRefused) else (
                        f"cannot be read as an image ({type(exc).__name__}: {exc}); "
                        "check that it is an image file and not damaged")
                if not quiet and path not in self._reported:
                    self._reported.add(path)
                    print(f"warning: skipping unreadable image {path} ({type(exc).__name__}: {exc})",
                          file=sys.stderr)
        raise UserError(no_image_message(self.spec.source, [first_bad], {first_bad: why}))


class StepBatchSampler:
    """Sample numbers of every micro-batch from ``start_step`` on (infinite when no end).

    Micro-batch ``m`` of optimizer step ``s`` on ``rank`` gets the ``batch_size`` numbers
    starting at ``((s * accumulate + m) * world_size + rank) * batch_size``: ranks never
    share a sample, and every epoch is one permutation of the files.
    """

    def __init__(self, batch_size: int, accumulate: int = 1, world_size: int = 1, rank: int = 0,
                 start_step: int = 0, end_step: Optional[int] = None):
        self.batch_size, self.accumulate = int(batch_size), int(accumulate)
        self.world_size, self.rank = int(world_size), int(rank)
        self.start_step, self.end_step = int(start_step), end_step

    def first_sample(self, step: int, micro: int) -> int:
        return ((step * self.accumulate + micro) * self.world_size + self.rank) * self.batch_size

    def __iter__(self) -> Iterator[List[int]]:
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            for micro in range(self.accumulate):
                first = self.first_sample(step, micro)
                yield list(range(first, first + self.batch_size))
            step += 1

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an open-ended StepBatchSampler has no length")
        return max(0, self.end_step - self.start_step) * self.accumulate


def steps_for_epochs(epochs: float, n_images: int, images_per_step: int) -> int:
    """Optimizer steps that cover ``epochs`` passes over ``n_images``."""
    return max(1, math.ceil(epochs * n_images / images_per_step))


# train.num_workers: auto starts at most this many workers per process: past it, decoding
# 256 px crops outpaces a GPU step of the tokenizers trained here, and each worker holds
# its own copy of the file list and of the decoded images in flight.
MAX_AUTO_WORKERS = 8
# Batches each worker prepares ahead of the training step (DataLoader's prefetch_factor).
PREFETCH_BATCHES = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroups cpusets, SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):         # not on Linux
        return os.cpu_count() or 1


def loader_workers(value, cpus: Optional[int] = None, local_processes: Optional[int] = None) -> int:
    """Worker processes for ``train.num_workers`` (``"auto"`` or an int >= 0).

    ``auto``: the CPUs this process may use, shared among the training processes of this
    node (``LOCAL_WORLD_SIZE``, set by torchrun), minus one for the training process itself,
    at most :data:`MAX_AUTO_WORKERS`; 0 (load in the training process) on a one-CPU share.
    """
    if value != "auto":
        return int(value)
    cpus = usable_cpus() if cpus is None else int(cpus)
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    share = cpus // max(1, local_processes)
    return min(MAX_AUTO_WORKERS, share - 1) if share > 1 else 0


def make_loader(spec: DataSpec, seed: int, batch_size: int, accumulate: int, world_size: int, rank: int,
                start_step: int, end_step: Optional[int], num_workers="auto", pin_memory: bool = False):
    """A DataLoader over :class:`ImageCrops` driven by :class:`StepBatchSampler`.

    Batches hold uint8 images (see :func:`to_model_range`).  ``num_workers`` is
    ``train.num_workers`` (:func:`loader_workers`); workers are persistent and prefetch
    :data:`PREFETCH_BATCHES` batches each.  The loader gets its own ``torch.Generator`` so
    creating it never draws from the global RNG (which is part of the checkpointed state);
    items depend on their sample number only, so the worker count never changes a batch.
    """
    dataset = ImageCrops(spec, seed)
    sampler = StepBatchSampler(batch_size, accumulate, world_size, rank, start_step, end_step)
    workers = loader_workers(num_workers)
    extra = {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES} if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **extra)


def fixed_crops(spec: DataSpec, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` deterministic crops (B, 3, S, S) in [-1, 1] of ``spec`` -- e.g. a held-out eval batch."""
    dataset = ImageCrops(spec, seed)
    return to_model_range(torch.stack([dataset[k]["image"] for k in range(count)]))


__all__ = ["DataSpec", "ImageCrops", "StepBatchSampler", "resolve_data", "make_loader", "fixed_crops",
           "builtin_paths", "list_folder", "read_file_list", "steps_for_epochs", "BUILTIN_TRAIN",
           "BUILTIN_HELDOUT", "ImageRefused", "load_rgb", "to_rgb", "crop_image", "image_problem",
           "data_argument", "no_image_message", "is_shard_pattern", "check_usable", "to_model_range",
           "to_uint8_chw", "loader_workers", "usable_cpus"]
