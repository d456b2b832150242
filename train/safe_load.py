"""Read checkpoints and weight files without ever running code from them.

Every ``torch.load`` of the project happens here, always with ``weights_only=True``: torch's
own allowlisting unpickler, which only rebuilds tensors, plain containers and the globals it
is told are safe.  Two entry points:

* :func:`load_weights_file` -- a file torch reads as it is (a state dict, a trainer
  checkpoint, a VGG16 or DINO weights file), memory-mapped when the format allows it.
  Failures raise :class:`UnreadableFile` (a :class:`UserError`) carrying torch's own reason,
  never its advice to retry with ``weights_only=False``.
* :func:`load_checkpoint` -- a legacy Lightning ``.ckpt``.  Such files pickle callback
  classes (also as dict keys), OmegaConf ``DictConfig`` hyper-parameters,
  ``argparse.Namespace`` and numpy scalars, which torch refuses by default.  The names torch
  does not know (``torch.serialization.get_unsafe_globals_in_checkpoint``) are handed to
  ``torch.serialization.safe_globals`` as ``(placeholder class, "module.Name")`` pairs: an
  inert :class:`Placeholder` records what the pickle passes to it and never runs anything.
  :func:`to_plain` recovers the hyper-parameters from those records.

    >>> from train.safe_load import load_checkpoint, extract_state_dict
    >>> ckpt = load_checkpoint("last.ckpt")        # doctest: +SKIP
    >>> sd, notes = extract_state_dict(ckpt.data)  # doctest: +SKIP

What torch's mechanism does not cover, and is therefore written here (the smallest pieces
that hold the cases, each tested in ``tests/test_safe_load.py``):

* **A static scan of the pickle before torch reads it** (:func:`scan_pickle`, over
  ``pickletools.genops``: it disassembles, it never calls anything).  It is needed because
  (1) torch's default allowlist cannot be narrowed and hands out size-taking constructors
  (``builtins.bytearray``, ``torch.Tensor`` and the legacy tensor classes): a pickle calling
  ``bytearray(2**31)`` makes torch's own loader fill 2 GB before any check runs, so such
  calls with an integer argument refuse the file first; (2) files that name code-running
  globals (``os.system``, ``subprocess.Popen``, ``builtins.eval`` ...) are refused with a
  clear message instead of becoming placeholders, because only a malicious file names them;
  (3) ``get_unsafe_globals_in_checkpoint`` reads zip checkpoints only, and legacy (pre-1.6,
  non-zip) ``torch.save`` files still exist: for those the scan lists the globals.
* **The numpy dtype rule**: numpy scalars and arrays are allowed, but ``numpy.dtype`` goes
  through :func:`_plain_numpy_dtype`, which accepts numeric and object dtypes only.  pickle's
  BUILD hands a dtype a state from the file and numpy trusts its flags: a void dtype with an
  object field whose "holds objects" flag is cleared reads file bytes as object pointers.
* **A refusal of TorchScript archives** (``constants.pkl`` inside): they hold code, and torch
  would hand them to ``torch.jit.load``.
* **Bounds on what a file can make this process allocate** (the *Limits* block below, each
  tested in ``tests/test_hostile_checkpoints.py`` under an address-space cap): declared zip
  inflation, pickle size and opcode count before torch reads anything; after loading,
  :func:`check_loaded` refuses tensors whose shapes cover far more bytes than their
  storages (an expanded stride-0 tensor) and dtypes that BUILD rewrote.  numpy arrays and
  scalars are rebuilt by checked stand-ins (:class:`_CheckedArray`) that check the dtype
  *after* BUILD and require the data to match the shape.  :func:`to_plain` converts each
  shared object once, with a size budget.

Known limit of torch's unpickler that stays: an unknown ``dict`` / ``list`` subclass filled
by SETITEMS / APPENDS cannot be a placeholder (torch only fills exact dicts and lists), so
such a file is refused with torch's reason; ``collections.defaultdict`` is read as a dict.
"""
from __future__ import annotations

import collections
import datetime
import io
import os
import pickle
import pickletools
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch._utils import IMPORT_MAPPING, NAME_MAPPING

from train.errors import UserError

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

# --------------------------------------------------------------------------------------
# Placeholders: what an unknown class becomes.


class Placeholder:
    """An inert stand-in for an object whose class torch does not allow.

    Construction (pickle's REDUCE / NEWOBJ), ``__setstate__`` (BUILD), item assignment and
    ``append`` / ``extend`` only *record* what the pickle handed over; no method of the
    original class is ever looked up or run.  Subclasses are made per original name by
    :func:`placeholder_class`; ``ph_module`` / ``ph_name`` say which class it stood for.
    """

    ph_module = "?"
    ph_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        # object.__setattr__: a subclass must never be able to intercept attribute writes.
        object.__setattr__(self, "ph_args", args)
        object.__setattr__(self, "ph_kwargs", kwargs)
        object.__setattr__(self, "ph_state", None)
        object.__setattr__(self, "ph_items", {})
        object.__setattr__(self, "ph_list", [])
        return self

    def __init__(self, *args, **kwargs):  # arguments were recorded by __new__
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "ph_state", state)

    def __setitem__(self, key, value):
        self.ph_items[key] = value

    def append(self, value):
        self.ph_list.append(value)

    def extend(self, values):
        self.ph_list.extend(list(values) if isinstance(values, (list, tuple)) else [values])

    @classmethod
    def qualname(cls) -> str:
        return f"{cls.ph_module}.{cls.ph_name}"

    def __repr__(self) -> str:
        return f"<dropped {self.qualname()}>"


_PLACEHOLDER_CLASSES: Dict[Tuple[str, str], type] = {}


def placeholder_class(module: str, name: str) -> type:
    """The (cached) placeholder class standing for ``module.name``.

    Caching keeps one class per name, so a class used as a dict key (Lightning 1.x keys
    ``callbacks`` by callback class) stays one hashable key.
    """
    key = (str(module), str(name))
    cls = _PLACEHOLDER_CLASSES.get(key)
    if cls is None:
        safe = "".join(c if c.isalnum() else "_" for c in key[1]) or "anonymous"
        cls = type(f"Dropped_{safe}", (Placeholder,), {"ph_module": key[0], "ph_name": key[1]})
        _PLACEHOLDER_CLASSES[key] = cls
    return cls


def is_placeholder(obj: Any) -> bool:
    return isinstance(obj, Placeholder) or (isinstance(obj, type) and issubclass(obj, Placeholder))


# --------------------------------------------------------------------------------------
# The policy for globals a pickle names.

# Whole modules whose every name runs code, touches files or processes, or imports.
_DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
    "pty", "code", "codeop", "ctypes", "pickle", "_pickle", "dill", "cloudpickle",
    "marshal", "webbrowser", "multiprocessing", "signal", "asyncio", "threading", "_thread",
    "pdb", "bdb", "tempfile", "operator", "urllib", "http", "ftplib", "smtplib", "telnetlib", "requests",
    "commands", "popen2", "timeit", "trace", "profile", "cProfile", "zipimport", "pkgutil",
    "torch.hub", "torch.jit", "torch.package", "torch.ops", "torch._C", "torch.utils.cpp_extension",
    "numpy.testing", "numpy.distutils", "numpy.f2py", "setuptools", "distutils",
)
# Single names that run code although their module is harmless (after torch's Python 2 name
# mapping, so ``__builtin__.eval`` is checked as ``builtins.eval``).
_DANGEROUS_NAMES = {
    ("builtins", n) for n in (
        "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
        "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help",
        "__builtins__", "apply", "execfile", "file", "reload")
} | {
    ("torch", "load"), ("torch.serialization", "load"), ("torch.storage", "_load_from_bytes"),
    ("torch", "save"), ("torch.serialization", "save"), ("numpy", "load"), ("numpy", "save"),
    ("numpy.lib.npyio", "load"), ("numpy", "fromfile"), ("numpy", "loadtxt"),
    ("copyreg", "add_extension"),
    ("io", "open"), ("io", "FileIO"), ("_io", "open"), ("_io", "FileIO"), ("io", "open_code"),
    ("types", "FunctionType"), ("types", "CodeType"), ("types", "LambdaType"),
    ("types", "MethodType"), ("functools", "reduce"),
}


def _is_dangerous(module: str, name: str) -> bool:
    if (module, name) in _DANGEROUS_NAMES:
        return True
    return any(module == m or module.startswith(m + ".") for m in _DANGEROUS_MODULES)


def _sized_constructors() -> Set[str]:
    """Globals that allocate memory of a size given as an integer argument.

    torch's allowlist hands out ``bytearray``, ``torch.Tensor`` and the legacy tensor
    classes (``torch.FloatTensor(n)``, ``torch.cuda.FloatTensor(n)``); no ``torch.save``
    output calls them with a size, a memory bomb does.
    """
    names = {"builtins.bytearray", "builtins.bytes", "torch.Tensor", "torch.nn.parameter.Parameter"}
    names.update(f"{cls.__module__}.{cls.__name__}" for cls in torch._tensor_classes)
    return names


_SIZED = _sized_constructors()


def _defaultdict_as_dict(factory=None, *args):
    # A defaultdict's factory would run on every missing key later, and torch's unpickler only
    # fills exact dicts: its items come back in a plain dict.
    return dict(*args)


# Numeric and object dtypes only.  pickle's BUILD hands a dtype its state (fields, subarray,
# flags) from the file, and numpy trusts the flags: a string/void dtype given an object field
# with the "holds objects" flag cleared reads raw file bytes as object pointers (a crash, or
# worse, on first access), and datetime dtypes crash on a malformed state.  Builtin numeric
# dtypes ignore such a state.  Arrays / scalars of other kinds refuse the file.
_PLAIN_DTYPE_KINDS = "biufcO"


def _plain_numpy_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.kind not in _PLAIN_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} (kind {dtype.kind!r}) is not loaded from a checkpoint "
                                     "pickle: only numeric and object arrays are")
    return dtype


def _checked_dtype(dtype: Any) -> np.dtype:
    """A fresh, canonical dtype equal to ``dtype``, or UnpicklingError.

    :func:`_plain_numpy_dtype` sees a dtype *before* pickle's BUILD hands it a state, and
    numpy applies that state to any dtype that is not a builtin singleton: a copied
    ``np.dtype('O', False, True)`` (every honest pickle asks for a copy) or ``'>f8'`` can be
    given an object field and cleared flags after the check, and numpy then reads file
    bytes as object pointers (a segfault).  So the dtype is checked again where an array or
    scalar is built from it: it must equal the canonical dtype of its type and byte order in
    every property BUILD can change, and the canonical one is what numpy gets.
    """
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"numpy array or scalar with dtype {type(dtype).__name__}, not a numpy dtype")
    order = dtype.byteorder if dtype.byteorder in "<>" else "="
    try:
        canon = np.dtype(dtype.type).newbyteorder(order)
    except TypeError:
        canon = None
    if canon is None or canon.kind not in _PLAIN_DTYPE_KINDS or dtype.fields is not None or \
            dtype.subdtype is not None or dtype.names is not None or \
            (dtype.itemsize, dtype.alignment, dtype.flags, dtype.hasobject) != \
            (canon.itemsize, canon.alignment, canon.flags, canon.hasobject):
        raise pickle.UnpicklingError(
            f"numpy dtype {dtype!r} was rewritten by the pickle (fields, flags or sizes that no "
            "numeric or object dtype has): a forged dtype, not loaded")
    return canon


class _CheckedArray(np.ndarray):
    """The ndarray a checkpoint pickle gets: its ``__setstate__`` (pickle's BUILD) checks the
    state before numpy's own runs.

    numpy's ``ndarray.__setstate__`` trusts the state: a forged dtype makes it read bytes as
    object pointers, and a shape of 2*10^8 with a one-item list makes it allocate 1.6 GB and
    read past the list (a segfault).  Here the dtype must pass :func:`_checked_dtype`, and
    the data must be exactly what the shape needs (a list of that many objects, or that many
    bytes), so an array never holds more than the file carried.  Calling the class itself
    (``numpy.ndarray(shape)`` from a pickle) would allocate any size: refused.  Instances
    behave as ndarrays and pickle as plain ones.
    """

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray(...) called by the pickle (a size-taking constructor); "
                                     "numpy pickles never do that")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("numpy array state is not numpy's (version, shape, dtype, order, data)")
        version = state[:-4]
        shape, dtype, fortran, data = state[-4:]
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"numpy array shape {shape!r} is not a tuple of sizes")
        dtype = _checked_dtype(dtype)
        count = 1
        for n in shape:
            count *= n
        if dtype.hasobject:
            ok = isinstance(data, list) and len(data) == count
        else:
            ok = isinstance(data, (bytes, bytearray)) and len(data) == count * dtype.itemsize
        if not ok:
            have = f"{len(data)} items" if isinstance(data, (list, bytes, bytearray)) else type(data).__name__
            raise pickle.UnpicklingError(f"numpy array of shape {shape} ({dtype}) comes with {have} of data: "
                                         "the shape claims more than the file holds")
        np.ndarray.__setstate__(self, version + (shape, dtype, bool(fortran), data))

    def __reduce__(self):
        return self.view(np.ndarray).__reduce__()

    def __repr__(self):
        return repr(self.view(np.ndarray))


def _checked_reconstruct(subtype, shape=(0,), typecode=b"b"):
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``: an empty array that BUILD then fills
    (always empty here: the size comes from the checked state, never from these args)."""
    if subtype is not _CheckedArray:
        raise pickle.UnpicklingError(f"numpy _reconstruct of {subtype!r}: only numpy.ndarray is rebuilt")
    return np.ndarray.__new__(_CheckedArray, (0,), "b")


def _checked_scalar(dtype, *args):
    """numpy's ``scalar(dtype, data)`` with the dtype checked after BUILD (:func:`_checked_dtype`)."""
    return _multiarray.scalar(_checked_dtype(dtype), *args)


def _own_allowlist() -> Dict[str, Any]:
    """Globals torch does not allow by default that checkpoints legitimately hold, by the
    name a pickle uses for them."""
    allowed: Dict[str, Any] = {
        "collections.defaultdict": _defaultdict_as_dict,
        "datetime.datetime": datetime.datetime,
        "datetime.date": datetime.date,
        "datetime.timedelta": datetime.timedelta,
        # Arrays and scalars are rebuilt by the checked stand-ins below: a dtype is checked
        # again where it is used, after pickle's BUILD had its say (see _checked_dtype).
        "numpy.ndarray": _CheckedArray,
        "numpy.dtype": _plain_numpy_dtype,
    }
    for builtin in (frozenset, slice, int, float, bool, str, list, tuple, dict, bytes):
        allowed[f"builtins.{builtin.__name__}"] = builtin
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{mod}.scalar"] = _checked_scalar
        allowed[f"{mod}._reconstruct"] = _checked_reconstruct
    # The dtype classes are what BUILD sees (torch only builds instances of allowed types).
    for dtype_cls in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                      "Int16DType", "Int8DType", "UInt8DType", "BoolDType", "ObjectDType",
                      "UInt16DType", "UInt32DType", "UInt64DType", "Complex64DType", "Complex128DType"):
        cls = getattr(getattr(np, "dtypes", None), dtype_cls, None)
        if cls is not None:
            allowed[f"numpy.dtypes.{dtype_cls}"] = cls
    return allowed


_OWN_ALLOWED = _own_allowlist()


class Refused(pickle.UnpicklingError):
    """The static scan found a global or a call that no honest checkpoint holds."""

    def __init__(self, reason: str, runs_code: bool, fix: Optional[str] = None):
        super().__init__(reason)
        self.reason = reason
        self.runs_code = runs_code
        self.fix = fix or "check that it is a torch/Lightning checkpoint and was copied completely"


def resolve_global(module: str, name: str) -> Any:
    """What a global named in a checkpoint pickle stands for under this module's policy.

    :class:`Refused` for code-running names; for size-taking constructors (``torch.Tensor``,
    ``Parameter``) an inert placeholder class: torch's table would hand out the real ones,
    and the scan refuses a file that calls them with a size (the only call a checkpoint
    could make of them); an object of this module's allowlist or of torch's; else an inert
    placeholder class.
    """
    module, name = _mapped(str(module), str(name))
    if _is_dangerous(module, name):
        raise Refused(f"{module}.{name}", runs_code=True)
    full = f"{module}.{name}"
    if full in _OWN_ALLOWED:
        return _OWN_ALLOWED[full]
    if full in _SIZED:
        return placeholder_class(module, name)
    torch_allowed = _torch_allowlist()
    if full in torch_allowed:
        return torch_allowed[full]
    return placeholder_class(module, name)


def _torch_allowlist() -> Dict[str, Any]:
    # torch exposes its default table only privately; resolve_global is a report of the
    # policy, the loader itself asks torch (get_unsafe_globals_in_checkpoint, torch.load).
    from torch import _weights_only_unpickler

    return dict(getattr(_weights_only_unpickler, "_get_allowed_globals", dict)())


def _mapped(module: str, name: str) -> Tuple[str, str]:
    """torch's own Python 2 -> 3 renaming of pickled globals (``__builtin__`` -> ``builtins``)."""
    if (module, name) in NAME_MAPPING:
        return NAME_MAPPING[(module, name)]
    return IMPORT_MAPPING.get(module, module), name


# --------------------------------------------------------------------------------------
# Limits: how much a checkpoint file can make this process allocate.  An honest file needs
# far less than each; a crafted one is refused before the allocation, with the limit named.

# Bytes of one object pickle (a zip checkpoint's data.pkl, or a legacy file's): it holds the
# structure and small values; tensors are separate records (a 7 GB Lightning file: ~1 MB).
MAX_PICKLE_BYTES = 256 << 20
# Opcodes one pickle may run.  Each builds at most one Python object (tens of bytes), so this
# bounds what unpickling allocates to a few hundred MB; a large Lightning checkpoint runs ~10^5.
MAX_PICKLE_OPS = 4_000_000
# Compressed zip records (torch.save writes them stored, so only an archiver or a zip bomb
# compresses them): together they may declare at most INFLATE_RATIO x the file's size, or
# INFLATE_FLOOR bytes, whichever is larger.  Deflate reaches 1032:1, weights about 1.1:1.
INFLATE_RATIO = 8
INFLATE_FLOOR = 64 << 20
# Tensors: the bytes their shapes cover (numel x element size, what a clone or a save
# allocates) may exceed the bytes of their distinct storages (stride-0 / overlapping views,
# weights tied into several entries) by this factor plus this many bytes, no more.
TENSOR_VIEW_FACTOR = 4
TENSOR_EXPANSION_BYTES = 64 << 20


# --------------------------------------------------------------------------------------
# The static scan.

_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}


class _Global(str):
    """A global on the scan's symbolic stack (its ``module.name``)."""


class _Int(int):
    """An integer on the scan's symbolic stack."""


class _Str(str):
    """A short text on the scan's symbolic stack (storage keys of persistent ids)."""


_STR_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")


# Bytes per element of torch's typed storage classes, for the sizes a legacy (non-zip) file
# declares; an unknown type counts one byte per element (never a false refusal).
_STORAGE_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                     "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8,
                     "QInt8": 1, "QUInt8": 1, "QInt32": 4, "QUInt4x2": 1, "QUInt2x4": 1, "Untyped": 1}


def _declared_storage_bytes(storage_type: str, numel: int) -> int:
    name = storage_type.rpartition(".")[2]
    return numel * _STORAGE_ITEMSIZE.get(name[:-len("Storage")] if name.endswith("Storage") else name, 1)


def scan_pickle(stream: io.BufferedIOBase, max_ops: int = MAX_PICKLE_OPS,
                storages: Optional[Dict[str, int]] = None) -> List[Tuple[str, str]]:
    """The globals one pickle in ``stream`` names, as ``(module, name)`` in file order.

    A symbolic run of pickle's stack machine that keeps only globals, integers and tuples,
    enough to see which global each REDUCE / NEWOBJ calls and with which top-level
    arguments.  Raises :class:`Refused` for a code-running global, a size-taking
    constructor called with an integer, or more than ``max_ops`` opcodes (the objects
    unpickling would build); ``ValueError`` where the bytes are not a pickle (torch's reader
    then gives its own reason).  With ``storages``, records the byte size each persistent
    storage id declares (``("storage", type, key, location, numel, ...)``) under its key,
    which a legacy file's reader allocates before it reads any data.
    """
    found: List[Tuple[str, str]] = []
    stack: List[Any] = []
    marks: List[int] = []
    memo: Dict[Any, Any] = {}
    for count, (op, arg, _pos) in enumerate(pickletools.genops(stream)):
        if count >= max_ops:
            raise Refused(f"its pickle runs more than {max_ops} opcodes (MAX_PICKLE_OPS), each building an "
                          "object: an object bomb, not a checkpoint (tensors are stored outside the pickle)",
                          runs_code=False)
        kind = op.name
        if kind == "MARK":
            marks.append(len(stack))
            continue
        if kind in ("GLOBAL", "INST"):
            module, name = _mapped(*arg.split(" ", 1))
            if _is_dangerous(module, name):
                raise Refused(f"{module}.{name}", runs_code=True)
            found.append((module, name))
            if kind == "GLOBAL":
                stack.append(_Global(f"{module}.{name}"))
                continue
            args = stack[marks.pop():]
            del stack[len(stack) - len(args):]
            _check_call(_Global(f"{module}.{name}"), tuple(args))
            stack.append(None)
            continue
        if kind in _INT_OPS:
            stack.append(_Int(arg) if isinstance(arg, int) and not isinstance(arg, bool) else None)
            continue
        if kind in _STR_OPS:
            text = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
            stack.append(_Str(text) if len(text) <= 64 else None)
            continue
        if kind in _PUT_OPS:
            memo[arg] = stack[-1] if stack else None
            continue
        if kind == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
            continue
        if kind in _GET_OPS:
            stack.append(memo.get(arg))
            continue
        if kind in _TUPLE_SIZES:
            n = _TUPLE_SIZES[kind]
            items = tuple(stack[len(stack) - n:]) if n else ()
            del stack[len(stack) - n:]
            stack.append(items)
            continue
        if kind == "TUPLE":
            start = marks.pop()
            items = tuple(stack[start:])
            del stack[start:]
            stack.append(items)
            continue
        if kind == "BINPERSID" and storages is not None and stack:
            pid = stack[-1]
            if isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[1], _Global) \
                    and isinstance(pid[4], _Int):
                # Views of one storage repeat its id: count each storage key once.
                key = str(pid[2]) if isinstance(pid[2], _Str) else f"#{len(storages)}"
                storages[key] = max(storages.get(key, 0), _declared_storage_bytes(pid[1], int(pid[4])))
        if kind in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            if kind == "NEWOBJ_EX":
                stack.pop()
            args = stack.pop() if stack else None
            func = stack.pop() if stack else None
            _check_call(func, args if isinstance(args, tuple) else ())
            stack.append(None)
            continue
        # Every other opcode: pop what it consumes (down to the mark where it takes one) and
        # push unknown values for what it produces.
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before:
            below = before.index(pickletools.markobject)
            del stack[marks.pop() if marks else 0:]
            del stack[max(0, len(stack) - below):]
        elif before:
            del stack[max(0, len(stack) - len(before)):]
        stack.extend([None] * len(after))
    return found


def _check_call(func: Any, args: tuple) -> None:
    if isinstance(func, _Global) and func in _SIZED and any(isinstance(a, _Int) for a in args):
        sizes = ", ".join(str(int(a)) for a in args if isinstance(a, _Int))
        raise Refused(f"{func}({sizes}): a size-taking constructor called with a size from the file "
                      "(a memory bomb, not a checkpoint)", runs_code=False)




def _pickle_streams(path: str) -> Iterator[io.BufferedIOBase]:
    """The pickles torch would unpickle from ``path``: ``data.pkl`` of a zip checkpoint, or
    the leading pickles of a legacy file (magic number, protocol, system info, the object,
    the storage keys), read one after another from one stream."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            records = [i for i in archive.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if records:
                # torch reads the whole record into memory: a (re-)compressed one could inflate
                # to any size, so its declared size is bounded (tensors live in other records).
                if records[0].file_size > MAX_PICKLE_BYTES:
                    raise Refused(f"its object pickle declares {records[0].file_size} bytes, more than "
                                  f"{MAX_PICKLE_BYTES} (tensors are stored outside it)", runs_code=False)
                with archive.open(records[0]) as stream:
                    yield stream
        return
    with open(path, "rb") as fh:
        for _ in range(5):
            if not fh.peek(1)[:1]:
                return
            yield fh


def _scan_file(path: str) -> List[Tuple[str, str]]:
    """Every global the file's pickles name (see :func:`scan_pickle`); stops quietly where
    the bytes stop being a pickle, since torch's unpickler refuses those bytes itself."""
    found: List[Tuple[str, str]] = []
    # A legacy file stores each storage's bytes after its pickles, and torch's legacy reader
    # allocates every storage at the size its pickle declares before reading them: a few
    # bytes of pickle could ask for any amount of memory.  The declared sizes must fit in
    # the file (zip files are bounded by their records instead: _check_zip_sizes).
    storages: Optional[Dict[str, int]] = None if zipfile.is_zipfile(path) else {}
    try:
        for stream in _pickle_streams(path):
            found.extend(scan_pickle(stream, storages=storages))
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error):
        pass
    if storages:
        declared, size = sum(storages.values()), os.path.getsize(path)
        if declared > size:
            raise Refused(f"its pickle declares tensor storages of {declared} bytes, but the file holds only "
                          f"{size} bytes (a memory bomb or a truncated file)", runs_code=False)
    return found


# --------------------------------------------------------------------------------------
# Reading with torch.


class UnreadableFile(UserError):
    """A file the weights-only reader cannot use.

    ``reason`` is torch's own (one line, without its advice to retry unsafely) or the scan's;
    ``objects`` is True when the file is a pickle that holds something besides tensors and
    plain data (torch's unpickler refused it), False for a corrupt or foreign file.
    """

    def __init__(self, path: str, reason: str, objects: bool, what: str = "a weights-only torch file"):
        super().__init__(f"{path}: cannot be read as {what} ({reason})")
        self.path = path
        self.reason = reason
        self.objects = objects


def torch_error_reason(exc: BaseException) -> str:
    """The line of a ``torch.load(weights_only=True)`` error that says what is wrong.

    torch's message opens with "Weights only load failed ... Re-running `torch.load` with
    `weights_only` set to `False` will likely succeed": for a corrupt or foreign file that is
    both wrong and unsafe advice, so the unpickler's own reason is reported instead."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:  # the unpickler's own words follow torch's advice
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                               "Check the documentation of torch.load"))]
    return (reasons or lines or [type(exc).__name__])[0]


def _torch_load(path: str, zipped: bool) -> Any:
    # mmap: tensors are read when used (a 528 MB vgg16 file of which LPIPS needs 59 MB);
    # only zip files (torch >= 1.6) can be mapped.
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    check_loaded(data)
    return data


def _objects(root: Any) -> Iterator[Any]:
    """Every object reachable from ``root`` through containers and placeholders' records,
    each once (by identity: shared and cyclic references are walked once; iterative, since a
    crafted file nests deeper than the recursion limit)."""
    stack = [root]
    seen: Set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, Placeholder):
            stack.extend((obj.ph_args, obj.ph_kwargs, obj.ph_state, obj.ph_items, obj.ph_list))
        elif isinstance(obj, _CheckedArray) and obj.dtype.hasobject:
            stack.extend(obj.ravel().tolist())


def check_loaded(data: Any) -> None:
    """Refuse (:class:`Refused`) what unpickling made but must not be used: a numpy dtype
    BUILD rewrote (:func:`_checked_dtype`), and tensors whose shapes cover far more bytes
    than their storages hold (an ``expand``-ed stride-0 tensor of 8 GiB over 4 bytes: any
    clone, ``contiguous()`` or save would allocate it; see ``TENSOR_VIEW_FACTOR``)."""
    covered = 0
    storages: Dict[Tuple[int, int, str], int] = {}
    for obj in _objects(data):
        if isinstance(obj, np.dtype):
            try:
                _checked_dtype(obj)
            except pickle.UnpicklingError as exc:
                raise Refused(str(exc), runs_code=False) from None
        elif isinstance(obj, torch.Tensor) and obj.layout == torch.strided and obj.device.type != "meta":
            storage = obj.untyped_storage()
            covered += obj.numel() * obj.element_size()
            storages[(storage.data_ptr(), storage.nbytes(), obj.device.type)] = storage.nbytes()
    held = sum(storages.values())
    if covered > TENSOR_VIEW_FACTOR * held + TENSOR_EXPANSION_BYTES:
        raise Refused(f"its tensors' shapes cover {covered} bytes over {held} bytes of stored data (expanded or "
                      f"overlapping views; more than TENSOR_VIEW_FACTOR {TENSOR_VIEW_FACTOR}x + "
                      f"{TENSOR_EXPANSION_BYTES} bytes): copying them would allocate that much", runs_code=False,
                      fix="save contiguous tensors (tensor.contiguous() before torch.save); do not use the file "
                          "if its origin is unknown")


def _check_zip_sizes(path: str, infos: Sequence[zipfile.ZipInfo]) -> None:
    """Refuse a zip whose records would inflate far beyond the file, before any is read.

    Readers allocate a record's *declared* uncompressed size (torch's miniz reader) or
    inflate up to it (Python's zipfile), so the declared sizes are what is bounded: a stored
    record must declare exactly the bytes it occupies, inside the file; compressed records
    together at most ``max(INFLATE_FLOOR, INFLATE_RATIO x file size)``.
    """
    size = os.path.getsize(path)
    inflated = 0
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size or info.header_offset + info.compress_size > size:
                raise Refused(f"zip record {info.filename!r} declares {info.file_size} bytes but stores "
                              f"{info.compress_size} (the file is {size} bytes): a damaged or forged archive",
                              runs_code=False)
        else:
            inflated += info.file_size
    allowed = max(INFLATE_FLOOR, INFLATE_RATIO * size)
    if inflated > allowed:
        raise Refused(f"its compressed zip records would inflate to {inflated} bytes from a {size}-byte file, more "
                      f"than the {allowed} bytes allowed (INFLATE_RATIO {INFLATE_RATIO}x, floor {INFLATE_FLOOR}): a "
                      "zip bomb, or a checkpoint re-compressed by an archiver", runs_code=False,
                      fix="torch.save stores records uncompressed: unzip the file and re-zip it with `zip -0`, "
                          "or re-save it with torch.save; do not use it if its origin is unknown")


def _guard(path: str) -> Tuple[bool, List[Tuple[str, str]]]:
    """Refusals that come before torch reads ``path``; returns whether it is a zip file and
    the globals its pickles name."""
    zipped = zipfile.is_zipfile(path)
    if zipped:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
        _check_zip_sizes(path, infos)
        names = [i.filename for i in infos]
        # torch.load hands TorchScript archives to torch.jit.load: code, not a checkpoint.
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            raise Refused("a TorchScript archive (it contains code), not a state-dict checkpoint", runs_code=False)
    return zipped, _scan_file(path)


def load_weights_file(path: str, allow: Sequence[Any] = ()) -> Any:
    """What ``path`` holds, read by ``torch.load(weights_only=True)`` (tensors on the CPU,
    memory-mapped for zip files) after the static scan; ``allow``: classes the caller trusts
    besides torch's defaults (``torch.serialization.safe_globals`` entries).
    :class:`UnreadableFile` otherwise."""
    path = os.fspath(path)
    try:
        zipped, _named = _guard(path)
        with torch.serialization.safe_globals(list(allow)):
            return _torch_load(path, zipped)
    except Refused as exc:
        raise UnreadableFile(path, exc.reason if not exc.runs_code else
                             f"the pickle names {exc.reason}, which runs code; nothing from it was executed",
                             objects=True) from None
    except pickle.UnpicklingError as exc:
        # A refused global or construct is an object; "Unsupported operand" is just not a pickle.
        reason = torch_error_reason(exc)
        raise UnreadableFile(path, reason, objects=not reason.startswith("Unsupported operand")) from None
    except Exception as exc:  # noqa: BLE001 - truncated files raise RuntimeError, EOFError, ...
        raise UnreadableFile(path, torch_error_reason(exc), objects=False) from None


# --------------------------------------------------------------------------------------
# Legacy checkpoints.


@dataclass
class DroppedPart:
    path: str          # where in the loaded object, e.g. "callbacks[<key 0>]" or "hyper_parameters"
    qualname: str      # the class or function the file named, e.g. "omegaconf.dictconfig.DictConfig"


@dataclass
class LoadedCheckpoint:
    path: str
    data: Any
    method: str                      # "weights_only" | "restricted" (with placeholders) | "safetensors"
    dropped: List[DroppedPart] = field(default_factory=list)
    weights_only_error: Optional[str] = None   # why torch's plain weights-only load refused the file

    def dropped_summary(self) -> List[str]:
        """One line per distinct dropped class, with the places it was found."""
        by_name: Dict[str, List[str]] = collections.OrderedDict()
        for part in self.dropped:
            by_name.setdefault(part.qualname, []).append(part.path)
        lines = []
        for name, paths in by_name.items():
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            lines.append(f"{name} (at {shown})")
        return lines


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _safe_globals_for(path: str, zipped: bool, named: List[Tuple[str, str]]) -> List[Tuple[Any, str]]:
    """``(object, "module.Name")`` pairs for ``torch.serialization.safe_globals``: this
    module's allowlist, and a placeholder for every other name torch does not allow."""
    pairs = [(obj, name) for name, obj in _OWN_ALLOWED.items()]
    if zipped:
        unknown = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    else:
        # get_unsafe_globals_in_checkpoint reads zip files only; the scan saw every name.
        # Names torch allows itself are looked up in its own table first, so a placeholder
        # registered for one of them is never used.
        unknown = {f"{m}.{n}" for m, n in named}
    for module, name in named:
        full = f"{module}.{name}"
        if full in unknown and full not in _OWN_ALLOWED:
            pairs.append((placeholder_class(module, name), full))
            unknown.discard(full)
    # A name torch saw that the scan did not (the scan stops where torch would fail anyway).
    pairs.extend((placeholder_class(*full.rsplit(".", 1)), full) for full in unknown
                 if full not in _OWN_ALLOWED and "." in full)
    return pairs


def load_checkpoint(path: str) -> LoadedCheckpoint:
    """Load a checkpoint file without running code from it.

    Raises :class:`UserError` for a missing or unreadable file, a TorchScript archive, or a
    pickle that names a code-running global (the message names it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} is a folder; name the checkpoint file in it (e.g. last.ckpt)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist; pass an existing .ckpt/.pt/.safetensors file")
    if path.endswith(".safetensors"):
        try:
            return LoadedCheckpoint(path, load_safetensors(path), "safetensors")
        except UnreadableFile as exc:
            raise UserError(f"checkpoint {path!r} is not a readable safetensors file ({exc.reason}); re-export it "
                            "or pass the original .ckpt") from None
    try:
        zipped, named = _guard(path)
        if zipped and not torch.serialization.get_unsafe_globals_in_checkpoint(path):
            return LoadedCheckpoint(path, _torch_load(path, zipped), "weights_only")
        refused_by_torch = None
        if not zipped:
            try:
                return LoadedCheckpoint(path, _torch_load(path, zipped), "weights_only")
            except Refused:
                raise
            except Exception as exc:  # noqa: BLE001 - retried below with placeholders
                refused_by_torch = torch_error_reason(exc)
        pairs = _safe_globals_for(path, zipped, named)
        if refused_by_torch is None:
            refused_by_torch = "unsupported globals " + ", ".join(sorted(n for _, n in pairs
                                                                         if n not in _OWN_ALLOWED))
        with torch.serialization.safe_globals(pairs):
            data = _torch_load(path, zipped)
    except Refused as exc:
        if exc.runs_code:
            raise UserError(
                f"checkpoint {path!r} refused: loading it would call {exc.reason}, which runs code or "
                "touches files (this is how malicious pickles work); nothing from it was executed. "
                "Do not use this file; get the checkpoint from a trusted source") from None
        if exc.reason.startswith("a TorchScript"):
            raise UserError(f"checkpoint {path!r} is {exc.reason}; pass the training .ckpt file instead") from None
        raise UserError(f"checkpoint {path!r} cannot be read ({exc.reason}); {exc.fix}") from None
    except Exception as exc:  # noqa: BLE001 - corrupt files raise RuntimeError, EOFError, ...
        raise UserError(f"checkpoint {path!r} cannot be read ({torch_error_reason(exc)}); check that it is "
                        "a torch/Lightning checkpoint and was copied completely") from None
    return LoadedCheckpoint(path, data, "restricted", dropped=find_placeholders(data),
                            weights_only_error=refused_by_torch)


def load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file on the CPU; :class:`UnreadableFile` otherwise."""
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise UnreadableFile(os.fspath(path), _first_line(exc), objects=False, what="a safetensors file") from None


# --------------------------------------------------------------------------------------
# Inspecting what was loaded.


def _walk(root: Any) -> Iterable[Tuple[str, Any]]:
    """(path, value) for ``root`` and everything in its dicts, lists and tuples.

    Iterative (a crafted file can nest containers deeper than Python's recursion limit);
    each container is visited once, so shared or cyclic references terminate.
    """
    stack: List[Tuple[str, Any]] = [("", root)]
    seen = set()
    while stack:
        path, obj = stack.pop()
        yield path, obj
        if not isinstance(obj, (dict, list, tuple)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        children = []
        if isinstance(obj, dict):
            for i, (key, value) in enumerate(obj.items()):
                if is_placeholder(key):
                    children.append((f"{path}[<key {i}>]" if path else f"<key {i}>", key))
                if isinstance(key, (str, int)):
                    label = f"{path}[{key!r}]" if path else str(key)
                else:
                    label = f"{path}[<key {i}>]" if path else f"<key {i}>"
                children.append((label, value))
        else:
            children = [(f"{path}[{i}]", value) for i, value in enumerate(obj)]
        stack.extend(reversed(children))


def find_placeholders(obj: Any, limit: int = 1000) -> List[DroppedPart]:
    """Every placeholder (instance or class) in ``obj``, in file order, not inside them
    (at most ``limit``: a report, not an inventory)."""
    found = []
    for where, value in _walk(obj):
        if is_placeholder(value):
            cls = value if isinstance(value, type) else type(value)
            found.append(DroppedPart(where or "<root>", cls.qualname()))
            if len(found) >= limit:
                break
    return found


_OMEGACONF_CONTAINERS = {"DictConfig", "ListConfig"}
_OMEGACONF_VALUE_NODES = {"AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                          "EnumNode", "BytesNode", "PathNode", "ValueNode"}


# to_plain's output is a report: it stays this small whatever the file holds.
PLAIN_MAX_NODES = 100_000     # values in one to_plain result; past it, "<N values not shown>"
PLAIN_REPEAT_NODES = 64       # a shared object this small is repeated; a bigger one is named once
PLAIN_MAX_DEPTH = 50          # nesting shown; deeper parts become "<too deep>"


def to_plain(obj: Any) -> Any:
    """Plain Python data from a loaded object, for reports and hyper-parameter recovery.

    OmegaConf ``DictConfig`` / ``ListConfig`` / value-node placeholders become dicts, lists
    and values; ``argparse.Namespace`` becomes a dict; other placeholders become the string
    ``"<dropped module.Class>"``; tensors become ``"<tensor shape dtype>"``.

    Each loaded object is converted once.  A pickle shares objects by reference (its memo),
    so 40 levels of lists that each hold the level below twice take 2 KB to store and 2^40
    values to print: an object met again is repeated only when its plain form is small
    (``PLAIN_REPEAT_NODES``), else it becomes ``"<same object as PATH>"``; a cycle becomes
    ``"<cycle to PATH>"``; the whole result has at most ``PLAIN_MAX_NODES`` values.
    """
    return _Plain().convert(obj, "", 0)


class _Plain:
    """One to_plain conversion: its memo (id -> (result, size, first path)) and node budget."""

    def __init__(self):
        self.memo: Dict[int, Tuple[Any, int, str]] = {}
        self.active: Dict[int, str] = {}
        self.nodes = 0
        self.keep: List[Any] = []   # keeps converted objects alive: their ids stay unique

    def convert(self, obj: Any, path: str, depth: int) -> Any:
        if self.nodes >= PLAIN_MAX_NODES:
            return "<not shown: PLAIN_MAX_NODES reached>"
        if depth > PLAIN_MAX_DEPTH:
            return "<too deep>"
        shared = isinstance(obj, (dict, list, tuple, Placeholder))
        if shared:
            key = id(obj)
            if key in self.active:
                return f"<cycle to {self.active[key] or '<root>'}>"
            if key in self.memo:
                result, size, first = self.memo[key]
                if size <= PLAIN_REPEAT_NODES:
                    self.nodes += size
                    return result
                self.nodes += 1
                return f"<same object as {first or '<root>'}>"
            self.active[key] = path
            before = self.nodes
            try:
                result = self._convert(obj, path, depth)
            finally:
                del self.active[key]
            self.memo[key] = (result, self.nodes - before, path)
            self.keep.append(obj)
            return result
        self.nodes += 1
        return self._convert(obj, path, depth)

    def _convert(self, obj: Any, path: str, depth: int) -> Any:
        nxt = depth + 1
        if isinstance(obj, type) and issubclass(obj, Placeholder):
            return f"<class {obj.qualname()}>"
        if isinstance(obj, Placeholder):
            self.nodes += 1
            cls = type(obj)
            state = obj.ph_state
            if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
                state = state[0]  # (dict state, slot state)
            if cls.ph_module.startswith("omegaconf") and isinstance(state, dict):
                if cls.ph_name in _OMEGACONF_CONTAINERS and "_content" in state:
                    return self.convert(state["_content"], path, nxt)
                if cls.ph_name in _OMEGACONF_VALUE_NODES and "_val" in state:
                    return self.convert(state["_val"], path, nxt)
            if cls.ph_module == "argparse" and cls.ph_name == "Namespace" and isinstance(state, dict):
                return self._dict(state, path, nxt)
            return repr(obj)
        if isinstance(obj, torch.Tensor):
            if obj.dim() == 0:
                return obj.item()
            return f"<tensor {tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}>"
        if isinstance(obj, dict):
            self.nodes += 1
            return self._dict(obj, path, nxt)
        if isinstance(obj, (list, tuple)):
            self.nodes += 1
            return [self.convert(v, f"{path}[{i}]", nxt) for i, v in enumerate(obj)]
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist() if obj.size <= 16 else f"<ndarray {obj.shape} {obj.dtype}>"
        if isinstance(obj, (str, int, float, bool)) or obj is None:
            return obj
        return repr(obj)

    def _dict(self, obj: Dict[Any, Any], path: str, depth: int) -> Dict[Any, Any]:
        out = {}
        for k, v in obj.items():
            key = k if isinstance(k, (str, int, float, bool)) or k is None else self.convert(k, path, depth)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                key = repr(key)
            out[key] = self.convert(v, f"{path}.{k}" if path else str(k), depth)
        return out


# --------------------------------------------------------------------------------------
# Finding the state dict and normalising key prefixes.

# Where checkpoints of various trainers keep the model weights, most specific first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "generator")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and \
        sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def extract_state_dict(data: Any) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The model state dict inside a loaded checkpoint, and notes on where it was found.

    Accepts Lightning checkpoints (``state_dict``), ``{"model": ...}``-style wrappers and
    plain state dicts.  Non-tensor entries are left out, with a note.
    """
    notes: List[str] = []
    found = None
    if isinstance(data, dict):
        for key in STATE_DICT_KEYS:
            if _is_tensor_dict(data.get(key)):
                found = data[key]
                if key != "state_dict" or len(data) > 1:
                    notes.append(f"weights read from the checkpoint's {key!r} entry")
                break
        if found is None and _is_tensor_dict(data):
            found = data
            notes.append("checkpoint is a plain state dict")
    if found is None:
        kind = type(data).__name__ if not isinstance(data, dict) else \
            f"dict with keys {sorted(map(str, data))[:8]}"
        raise UserError(f"no model weights found in the checkpoint (it holds a {kind}); expected a "
                        f"Lightning .ckpt with 'state_dict' or a plain state dict")
    sd = collections.OrderedDict()
    skipped = []
    for key, value in found.items():
        if isinstance(value, torch.Tensor):
            sd[key] = value.detach() if value.requires_grad else value
        else:
            skipped.append(key)
    if skipped:
        notes.append(f"{len(skipped)} non-tensor entries left out: {', '.join(skipped[:5])}")
    return sd, notes


def strip_prefixes(sd: Dict[str, torch.Tensor], roots: Sequence[str]
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Remove wrapper prefixes (DDP ``module.``, ``model.``, vendored ``models.taming.``...).

    ``roots`` are the model's top-level names (``encoder``, ``decoder``, ``quantize``...).
    For each key the part before the first root component is the prefix; it is removed.
    Keys with no root component stay as they are (they will show up as unexpected).
    Returns the new dict and {prefix: number of keys} for the report.  Two keys that become
    the same name are an error (the checkpoint holds two models, e.g. weights and EMA).
    """
    roots = set(roots)
    out: Dict[str, torch.Tensor] = collections.OrderedDict()
    origin: Dict[str, str] = {}
    stripped: Dict[str, int] = collections.OrderedDict()
    for key, value in sd.items():
        parts = key.split(".")
        idx = next((i for i, p in enumerate(parts) if p in roots), None)
        new = key
        if idx:
            prefix = ".".join(parts[:idx]) + "."
            new = ".".join(parts[idx:])
            stripped[prefix] = stripped.get(prefix, 0) + 1
        if new in out:
            raise UserError(f"checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}: the "
                            "file holds more than one model (e.g. weights and an EMA copy); export "
                            "the one you want as a plain state dict and pass that")
        out[new] = value
        origin[new] = key
    return out, stripped
