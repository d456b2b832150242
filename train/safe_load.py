"""Read legacy checkpoints without ever running code from the file.

A ``.ckpt`` is a pickle, and a pickle is a small program: every class or function it names
is looked up (``find_class``) and may be called.  torch's ``weights_only=True`` loader only
allows tensors and plain containers, so it refuses real Lightning checkpoints (callback
classes used as dict keys, OmegaConf ``DictConfig`` hyper-parameters, ``argparse.Namespace``,
numpy scalars).  This module reads them anyway:

1. ``torch.load(weights_only=True)`` first: torch's own safe path.
2. If torch refuses the file, ``torch.load`` again with a restricted pickle module whose
   ``find_class`` returns real objects only for a short allowlist (tensor and storage
   rebuild functions, ``OrderedDict``, torch dtypes and devices, numpy arrays/scalars) and an
   inert :class:`Placeholder` class for every other name.  A placeholder records the name,
   its arguments and its state, and never calls anything.  Names that only a malicious file
   would use (``os.system``, ``subprocess.*``, ``builtins.eval`` / ``exec`` / ``open``,
   ``__import__``, ``getattr``, ...) refuse the whole file with a :class:`UserError`.
3. What was turned into placeholders is reported (``LoadedCheckpoint.dropped``), and
   :func:`to_plain` recovers OmegaConf / Namespace hyper-parameters as plain data.

The idea is the one the ``pickle`` documentation describes under "Restricting Globals"
(override ``Unpickler.find_class``); torch's ``_weights_only_unpickler`` applies it with a
refusal for every unknown name, here unknown names become inert records instead.

    >>> from train.safe_load import load_checkpoint, extract_state_dict
    >>> ckpt = load_checkpoint("last.ckpt")        # doctest: +SKIP
    >>> sd, notes = extract_state_dict(ckpt.data)  # doctest: +SKIP
"""
from __future__ import annotations

import collections
import datetime
import os
import pickle
import types
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from train.errors import UserError

# --------------------------------------------------------------------------------------
# Placeholders: what an unknown class becomes.


class Placeholder:
    """An inert stand-in for an object whose class is not on the allowlist.

    Construction, ``__setstate__`` (pickle's BUILD), item assignment and ``append`` /
    ``extend`` only *record* what the pickle handed over; no method of the original class
    is ever looked up or run.  Subclasses are made per original name by
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
# The allowlist and the refusals.

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
# Single names that run code although their module is harmless.
_DANGEROUS_NAMES = {
    ("builtins", n) for n in (
        "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
        "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help",
        "__builtins__", "apply", "execfile", "file", "reload")
} | {("__builtin__", n) for n in ("eval", "exec", "compile", "open", "__import__", "getattr",
                                  "setattr", "execfile", "file", "apply", "reload", "input")} | {
    ("torch", "load"), ("torch.serialization", "load"), ("torch.storage", "_load_from_bytes"),
    ("torch", "save"), ("torch.serialization", "save"), ("numpy", "load"), ("numpy", "save"),
    ("numpy.lib.npyio", "load"), ("numpy", "fromfile"), ("numpy", "loadtxt"),
    ("copyreg", "add_extension"), ("copy_reg", "add_extension"),
    ("io", "open"), ("io", "FileIO"), ("_io", "open"), ("_io", "FileIO"), ("io", "open_code"),
    ("types", "FunctionType"), ("types", "CodeType"), ("types", "LambdaType"),
    ("types", "MethodType"), ("functools", "reduce"),
}


def _is_dangerous(module: str, name: str) -> bool:
    if (module, name) in _DANGEROUS_NAMES:
        return True
    return any(module == m or module.startswith(m + ".") for m in _DANGEROUS_MODULES)


class _Refused(Exception):
    """Raised inside the unpickler when the file names a code-running global."""


def _as_int_tuple(value, what: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(isinstance(v, int) for v in value):
        raise pickle.UnpicklingError(f"tensor {what} is not a tuple of ints")
    return tuple(value)


def _check_storage(storage):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}, not a torch storage")


def _rebuild_tensor(storage, storage_offset, size, stride):
    """torch's ``_rebuild_tensor`` after checking its arguments are plain data."""
    _check_storage(storage)
    if not isinstance(storage_offset, int):
        raise pickle.UnpicklingError("tensor storage offset is not an int")
    return torch._utils._rebuild_tensor(storage, storage_offset, _as_int_tuple(size, "size"),
                                        _as_int_tuple(stride, "stride"))


def _set_metadata(tensor, metadata):
    # Only the conj/neg bits torch writes; anything else is ignored.
    if isinstance(metadata, dict) and metadata and all(
            isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items()):
        torch._utils.set_tensor_metadata(tensor, metadata)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # Backward hooks from a file would be called during backward: never restore them.
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    tensor.requires_grad = bool(requires_grad) and tensor.is_floating_point()
    _set_metadata(tensor, metadata)
    return tensor


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, dtype=None, metadata=None):
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    if isinstance(dtype, torch.dtype) and tensor.dtype != dtype:
        tensor = tensor.view(dtype)
    tensor.requires_grad = bool(requires_grad) and tensor.is_floating_point()
    _set_metadata(tensor, metadata)
    return tensor


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    # Python attributes on a Parameter (``state``) are not restored: they are not weights.
    return torch.nn.Parameter(data, bool(requires_grad))


_TENSOR_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state=None):
    """Tensor subclasses / tensors with attributes: keep the plain tensor only."""
    if func not in _TENSOR_REBUILDERS or not isinstance(args, tuple):
        raise pickle.UnpicklingError("tensor rebuilt by an unknown function")
    return func(*args)


def _safe_defaultdict(factory=None, *args):
    # The factory would run on every missing key later: keep it only when it is a builtin type.
    if factory not in (None, list, dict, set, int, float, str, tuple, collections.OrderedDict):
        factory = None
    return collections.defaultdict(factory, *args)


def _torch_attribute(name: str):
    """dtypes, layouts and memory formats pickle as ``torch.<name>``."""
    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return value
    return None


def _numpy_allowlist() -> Dict[Tuple[str, str], Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return {}
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        # scalar(dtype, bytes) and _reconstruct + ndarray.__setstate__ only copy bytes.
        allowed[(mod, "scalar")] = multiarray.scalar
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = _plain_numpy_dtype
    for dtype_cls in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                      "Int16DType", "Int8DType", "UInt8DType", "BoolDType"):
        if hasattr(getattr(np, "dtypes", None), dtype_cls):
            allowed[("numpy.dtypes", dtype_cls)] = getattr(np.dtypes, dtype_cls)
    return allowed


# Numeric and object dtypes only.  pickle's BUILD hands a dtype its state (fields, subarray,
# flags) from the file, and numpy trusts the flags: a string/void dtype given an object field
# with the "holds objects" flag cleared reads raw file bytes as object pointers (a crash, or
# worse, on first access), and datetime dtypes crash on a malformed state.  Builtin numeric
# dtypes ignore such a state.  Arrays / scalars of other kinds refuse the file.
_PLAIN_DTYPE_KINDS = "biufcO"


def _plain_numpy_dtype(*args):
    import numpy as np

    dtype = np.dtype(*args)
    if dtype.kind not in _PLAIN_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} (kind {dtype.kind!r}) is not loaded from a checkpoint "
                                     "pickle: only numeric and object arrays are")
    return dtype


def _allowlist() -> Dict[Tuple[str, str], Any]:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): _safe_defaultdict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        # Not torch.Tensor / Parameter themselves: torch.Tensor(10**12) would allocate that much.
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        # Protocol-2 pickles write bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): _codecs_encode,
        ("datetime", "datetime"): datetime.datetime,
        ("datetime", "date"): datetime.date,
        ("datetime", "timedelta"): datetime.timedelta,
    }
    for builtin in (set, frozenset, slice, complex, int, float, bool, str, list, tuple, dict):
        allowed[("builtins", builtin.__name__)] = builtin
        allowed[("__builtin__", builtin.__name__)] = builtin
    for builtin in (bytes, bytearray):
        allowed[("builtins", builtin.__name__)] = allowed[("__builtin__", builtin.__name__)] = \
            _bytes_from_data(builtin)
    allowed.update(_numpy_allowlist())
    return allowed


def _bytes_from_data(kind):
    """``bytes`` / ``bytearray`` from existing data only: ``bytearray(10**12)`` would be a
    memory bomb, so integer sizes are refused."""

    def build(*args):
        if args and isinstance(args[0], int):
            raise pickle.UnpicklingError(f"{kind.__name__}(<size>) is not allowed in a checkpoint")
        return kind(*args)

    return build


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Only the text codecs pickle itself uses; "zlib_codec" & co. could be memory bombs.
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"unsupported byte encoding {encoding!r} in pickle")
    return text.encode(encoding, errors)


_ALLOWED: Optional[Dict[Tuple[str, str], Any]] = None


def resolve_global(module: str, name: str) -> Any:
    """What the restricted unpickler hands back for the global ``module.name``.

    An allowlisted object, a torch dtype/layout, an inert placeholder class, or
    :class:`_Refused` raised for code-running names.
    """
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _allowlist()
    module, name = str(module), str(name)
    hit = _ALLOWED.get((module, name))
    if hit is not None:
        return hit
    if module == "torch":
        value = _torch_attribute(name)
        if value is not None:
            return value
    if _is_dangerous(module, name):
        raise _Refused(f"{module}.{name}")
    return placeholder_class(module, name)


def _restricted_pickle_module() -> types.SimpleNamespace:
    """A stand-in for the ``pickle`` module, as ``torch.load(pickle_module=...)`` expects."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return resolve_global(module, name)

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="train.safe_load.restricted_pickle",
                                 Unpickler=RestrictedUnpickler, load=load)


# --------------------------------------------------------------------------------------
# Loading.


@dataclass
class DroppedPart:
    path: str          # where in the loaded object, e.g. "callbacks[<key 0>]" or "hyper_parameters"
    qualname: str      # the class or function the file named, e.g. "omegaconf.dictconfig.DictConfig"


@dataclass
class LoadedCheckpoint:
    path: str
    data: Any
    method: str                      # "weights_only" | "restricted" | "safetensors"
    dropped: List[DroppedPart] = field(default_factory=list)
    weights_only_error: Optional[str] = None   # why torch's safe loader refused the file

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
        from safetensors.torch import load_file
        try:
            return LoadedCheckpoint(path, load_file(path, device="cpu"), "safetensors")
        except Exception as exc:  # safetensors raises its own error types
            raise UserError(f"checkpoint {path!r} is not a readable safetensors file "
                            f"({_first_line(exc)}); re-export it or pass the original .ckpt") from None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        # torch.load hands TorchScript archives to torch.jit.load: code, not a checkpoint.
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            raise UserError(f"checkpoint {path!r} is a TorchScript archive (it contains code), not a "
                            "state-dict checkpoint; pass the training .ckpt file instead")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return LoadedCheckpoint(path, data, "weights_only")
    except pickle.UnpicklingError as exc:
        refused_by_torch = _first_line(exc)
    except Exception as exc:  # corrupt files raise RuntimeError, EOFError, ...
        refused_by_torch = _first_line(exc)
    try:
        data = torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle_module())
    except _Refused as exc:
        raise UserError(
            f"checkpoint {path!r} refused: loading it would call "
            f"{exc.args[0].replace('__builtin__.', 'builtins.')}, which runs code or "
            "touches files (this is how malicious pickles work); nothing from it was executed. "
            "Do not use this file; get the checkpoint from a trusted source") from None
    except Exception as exc:
        raise UserError(f"checkpoint {path!r} cannot be read ({_first_line(exc)}); check that it is "
                        "a torch/Lightning checkpoint and was copied completely") from None
    return LoadedCheckpoint(path, data, "restricted", dropped=find_placeholders(data),
                            weights_only_error=refused_by_torch)


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


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """Plain Python data from a loaded object, for reports and hyper-parameter recovery.

    OmegaConf ``DictConfig`` / ``ListConfig`` / value-node placeholders become dicts, lists
    and values; ``argparse.Namespace`` becomes a dict; other placeholders become the string
    ``"<dropped module.Class>"``; tensors become ``"<tensor shape dtype>"``.
    """
    if _depth > 50:
        return "<too deep>"
    nxt = _depth + 1
    if isinstance(obj, type) and issubclass(obj, Placeholder):
        return f"<class {obj.qualname()}>"
    if isinstance(obj, Placeholder):
        cls = type(obj)
        state = obj.ph_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict state, slot state)
        if cls.ph_module.startswith("omegaconf") and isinstance(state, dict):
            if cls.ph_name in _OMEGACONF_CONTAINERS and "_content" in state:
                return to_plain(state["_content"], nxt)
            if cls.ph_name in _OMEGACONF_VALUE_NODES and "_val" in state:
                return to_plain(state["_val"], nxt)
        if cls.ph_module == "argparse" and cls.ph_name == "Namespace" and isinstance(state, dict):
            return {str(k): to_plain(v, nxt) for k, v in state.items()}
        return repr(obj)
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return obj.item()
        return f"<tensor {tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}>"
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else to_plain(k, nxt)):
                to_plain(v, nxt) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, nxt) for v in obj]
    try:
        import numpy as np
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist() if obj.size <= 16 else f"<ndarray {obj.shape} {obj.dtype}>"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


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
