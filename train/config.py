"""Read every config shape into one normalized :class:`~train.schema.ExperimentConfig`.

Three shapes are recognised by their keys:

* legacy JSON experiment files (legacy EMAVQ experiments): ``model_type`` + ``model_args`` (with
  ``model_variant``, ``lossconfig``) + ``train_args``;
* taming-transformers / latent-diffusion YAML: ``model.target`` + ``model.params``
  (``ddconfig``, ``lossconfig``), plus ``data`` and ``lightning`` sections;
* this tool's own YAML/JSON (the schema's shape; see ``train/schema.py``).

Keys a legacy file carries that the tool does not use are kept in ``extras`` and reported
by ``validate`` as warnings.  Upstream ``data`` / ``lightning`` sections are kept in
``upstream`` and never stop validation or model building.

    cfg = load_config("configs/legacy/taming_emavq_nogan.json", ["train.max_steps=100"])

The loader works in two steps so that ``validate`` can report every problem at once:
:func:`read_document` parses the file (unusable input -> ``ConfigFileError``, exit 2),
:func:`normalize` maps it to a plain dict in the schema's shape and records, for each
normalized key, where it lives in the source file (used by ``validate --fix``);
:func:`to_structured` type-checks that dict against the schema.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adapters.registry import (NOT_FIRST_STAGE, RegistryError, canonical_loss_target, get_model_type,
                               resolve_model)
from train import atomic
from train.errors import UserError
from train.schema import (DataSection, ExperimentConfig, LossSection, SourceInfo, TeacherSection,
                          TrainSection)


class ConfigFileError(UserError):
    """The file is missing, empty, unparseable, a directory, or not a config at all."""


# ----------------------------------------------------------------------------------
# Legacy ``train_args`` spellings -> (section, field).  Users' trainers varied; these are
# the names seen in the wild for the same settings.
TRAIN_RENAMES: Dict[str, Tuple[str, str]] = {
    "lr": ("train", "learning_rate"),
    "base_lr": ("train", "base_learning_rate"),
    "epochs": ("train", "max_epochs"),
    "num_epochs": ("train", "max_epochs"),
    "n_epochs": ("train", "max_epochs"),
    "num_steps": ("train", "max_steps"),
    "total_steps": ("train", "max_steps"),
    "max_iters": ("train", "max_steps"),
    "steps": ("train", "max_steps"),
    "grad_accum_steps": ("train", "accumulate_grad_batches"),
    "gradient_accumulation_steps": ("train", "accumulate_grad_batches"),
    "grad_clip_norm": ("train", "grad_clip"),
    "clip_grad": ("train", "grad_clip"),
    "max_grad_norm": ("train", "grad_clip"),
    "disc_update_freq": ("train", "disc_update_every"),
    "disc_update_interval": ("train", "disc_update_every"),
    "log_interval": ("train", "log_every"),
    "save_interval": ("train", "ckpt_every"),
    "save_every": ("train", "ckpt_every"),
    "sample_interval": ("train", "image_every"),
    "image_size": ("data", "image_size"),
    "img_size": ("data", "image_size"),
    "resolution": ("data", "image_size"),
    "crop_size": ("data", "image_size"),
    "data_path": ("data", "path"),
    "data_dir": ("data", "path"),
    "train_dir": ("data", "path"),
    "train_data": ("data", "path"),
    "val_dir": ("data", "val_path"),
    "val_data": ("data", "val_path"),
}

TOP_LEVEL = [f.name for f in dataclasses.fields(ExperimentConfig)]
SECTION_CLASSES = {"lossconfig": LossSection, "train": TrainSection, "data": DataSection,
                   "teacher": TeacherSection, "source": SourceInfo}


@dataclass
class Normalized:
    """A config in the schema's shape, as plain data, plus where each key came from."""

    data: Dict[str, Any]
    fmt: str                                   # native | legacy_json | taming_yaml
    path: str
    raw: Any                                   # the parsed source document
    # normalized dotted path -> key path in the source document (for --fix)
    keymap: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # normalized dotted path of an extra (ignored) key -> its source key path
    ignored: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # notes made while normalizing (renames applied): (dotted path, message)
    notes: List[Tuple[str, str]] = field(default_factory=list)
    # keys written twice in the source file (the parser keeps the last): "a.b (line 3)"
    duplicates: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------
# Parsing

# ----------------------------------------------------------------------------------
# Bounded reading.  A config is a few hundred values; these limits sit far above any real
# one and far below what would hang or exhaust the machine (a 1.7 KB YAML alias bomb
# expands to ~10^9 values; a 10^5-deep list overflows the parser's recursion).

MAX_CONFIG_BYTES = 4 * 1024 * 1024     # file size
MAX_DEPTH = 50                         # nesting of mappings / lists
MAX_VALUES = 100_000                   # values after YAML aliases are expanded
MAX_NUMBER_DIGITS = 40                 # digits of one integer literal (2**128 has 39)


def _too_long_number(origin: str, text: str, where: str = "") -> ConfigFileError:
    return ConfigFileError(f"{origin}{where}: a number with {len(text.lstrip('+-'))} digits; no setting takes "
                           f"more than {MAX_NUMBER_DIGITS} digits; write a normal-sized value")


def _json_int(origin: str):
    def parse(text: str) -> int:
        # json would call int() itself and fail past 4300 digits with a bare ValueError.
        if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
            raise _too_long_number(origin, text)
        return int(text)
    return parse


def _json_duplicates_hook(duplicates: Dict[int, List[str]]):
    """object_pairs_hook that keeps json's last-wins dict but records repeated keys,
    by the id of the dict they end up in (paths are filled in by :func:`_dict_paths`)."""
    def hook(pairs):
        out: Dict[str, Any] = {}
        repeated = []
        for key, value in pairs:
            if key in out and key not in repeated:
                repeated.append(key)
            out[key] = value
        if repeated:
            duplicates[id(out)] = repeated
        return out
    return hook


def _walk_depth(doc: Any, origin: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH (iteratively: deep input must not recurse)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigFileError(f"{origin}: nested more than {MAX_DEPTH} levels deep; a config needs a few "
                                  "levels; flatten the structure")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _dict_paths(doc: Any, wanted: Dict[int, List[str]]) -> List[str]:
    """Dotted paths of the repeated keys recorded in ``wanted`` (dict id -> keys)."""
    found: List[str] = []
    stack: List[Tuple[Any, str]] = [(doc, "")]
    while stack and wanted:
        node, prefix = stack.pop()
        if isinstance(node, dict):
            for key in wanted.get(id(node), ()):
                found.append(f"{prefix}{key}")
            stack.extend((v, f"{prefix}{k}.") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{prefix}{i}.") for i, v in enumerate(node))
    return sorted(found)


def load_json_text(text: str, origin: str) -> Tuple[Any, List[str]]:
    """Parse JSON text with the limits above.  Returns (document, repeated key paths)."""
    duplicates: Dict[int, List[str]] = {}
    try:
        doc = json.loads(text, object_pairs_hook=_json_duplicates_hook(duplicates), parse_int=_json_int(origin))
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{origin}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}; "
                              "fix the syntax at that line") from None
    except RecursionError:
        raise ConfigFileError(f"{origin}: nested more than {MAX_DEPTH} levels deep; a config needs a few "
                              "levels; flatten the structure") from None
    _walk_depth(doc, origin)
    return doc, _dict_paths(doc, duplicates)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with the limits above, and repeated keys recorded, not merged.

    Composing builds a node graph in which an alias is one shared node, so it stays as
    small as the text; the expanded size is then counted over that graph (each node once,
    memoised) before any Python object is built, which is where a bomb would explode.
    """

    origin = "config"

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self.duplicates: List[str] = []

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigFileError(f"{self.origin}:{mark.line + 1}: nested more than {MAX_DEPTH} levels deep; "
                                      "a config needs a few levels; flatten the structure")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        self._check_graph(node)
        return super().construct_document(node)

    def _check_graph(self, root) -> None:
        sizes: Dict[int, int] = {}
        on_path: set = set()
        # Iterative post-order walk: (node, dotted path, children done?)
        stack = [(root, "", False)]
        while stack:
            node, path, done = stack.pop()
            key = id(node)
            if done:
                on_path.discard(key)
                children = _yaml_children(node)
                sizes[key] = 1 + sum(sizes[id(c)] for _, c in children)
                if sizes[key] > MAX_VALUES:
                    raise ConfigFileError(
                        f"{self.origin}: the document expands to more than {MAX_VALUES} values through YAML "
                        "aliases (*name); a config needs far fewer; write the values out instead of nesting aliases")
                continue
            if key in sizes:
                continue
            if key in on_path:
                mark = node.start_mark
                raise ConfigFileError(f"{self.origin}:{mark.line + 1}: a YAML alias refers to a value that contains "
                                      "it (an endless loop); write the value out instead")
            on_path.add(key)
            stack.append((node, path, True))
            if isinstance(node, yaml.MappingNode):
                seen: Dict[Tuple[str, str], int] = {}
                for key_node, _ in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                        ident = (key_node.tag, key_node.value)
                        if ident in seen and seen[ident] == 1:
                            self.duplicates.append(f"{path}{key_node.value} (line {key_node.start_mark.line + 1})")
                        seen[ident] = seen.get(ident, 0) + 1
            for label, child in _yaml_children(node):
                if id(child) not in sizes:
                    stack.append((child, f"{path}{label}.", False))

    def construct_yaml_int(self, node):
        digits = node.value.replace("_", "").lstrip("+-")
        if len(digits) > MAX_NUMBER_DIGITS:
            raise _too_long_number(self.origin, node.value, f":{node.start_mark.line + 1}")
        return super().construct_yaml_int(node)

    def construct_yaml_timestamp(self, node):
        # A date-like value (``name: 2024-01-01``) stays text: the config schema has no dates.
        return self.construct_scalar(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:timestamp", _BoundedLoader.construct_yaml_timestamp)


def _yaml_children(node) -> List[Tuple[str, Any]]:
    if isinstance(node, yaml.MappingNode):
        out = []
        for k, v in node.value:
            label = k.value if isinstance(k, yaml.ScalarNode) else "?"
            out.append((f"{label}#key", k))
            out.append((label, v))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [(str(i), v) for i, v in enumerate(node.value)]
    return []


def load_yaml_text(text: str, origin: str) -> Tuple[Any, List[str]]:
    """Parse YAML text with the limits above.  Returns (document, repeated key paths).

    Unusable text raises ``ConfigFileError`` naming the line."""
    loader = _BoundedLoader(text)
    loader.origin = origin
    try:
        doc = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigFileError(f"{origin}{where}: invalid YAML: {problem}; fix the syntax at that line") from None
    except RecursionError:
        raise ConfigFileError(f"{origin}: nested more than {MAX_DEPTH} levels deep; a config needs a few "
                              "levels; flatten the structure") from None
    finally:
        loader.dispose()
    return doc, loader.duplicates


def read_config_file(path: str) -> Tuple[Any, str, List[str]]:
    """Parse a JSON or YAML file.  Returns (document, syntax, repeated key paths), syntax
    "json"|"yaml".  Unusable files raise ``ConfigFileError`` (exit 2) naming the problem."""
    if not os.path.exists(path):
        raise ConfigFileError(f"{path}: no such file; check the path")
    if os.path.isdir(path):
        raise ConfigFileError(f"{path}: is a directory, not a config file; name a .json or .yaml file")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            # Bounded read: a device or pipe (/dev/zero) must not fill the memory.
            text = fh.read(MAX_CONFIG_BYTES + 1)
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not a text file; name a .json or .yaml config") from None
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"{path}: larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB; a config is a few KB; "
                              "name the config file, not a data or checkpoint file")
    if not text.strip():
        raise ConfigFileError(f"{path}: the file is empty; it should hold a JSON or YAML config")
    is_json = path.lower().endswith(".json") or text.lstrip().startswith("{")
    if is_json:
        doc, duplicates = load_json_text(text, path)
        syntax = "json"
    else:
        doc, duplicates = load_yaml_text(text, path)
        syntax = "yaml"
    if not isinstance(doc, dict):
        raise ConfigFileError(f"{path}: not a config (top level is {type(doc).__name__}, expected a mapping "
                              "with model_type or model.target)")
    return doc, syntax, duplicates


def read_document(path: str) -> Tuple[Any, str]:
    """Parse a JSON or YAML file.  Returns (document, syntax) with syntax "json"|"yaml"."""
    doc, syntax, _ = read_config_file(path)
    return doc, syntax


def detect_format(doc: Dict[str, Any]) -> Optional[str]:
    if isinstance(doc.get("model"), dict) and ("target" in doc["model"] or "params" in doc["model"]):
        return "taming_yaml"
    if "model_type" in doc:
        margs = doc.get("model_args")
        if "train_args" in doc or (isinstance(margs, dict) and ("model_variant" in margs or "lossconfig" in margs)):
            return "legacy_json"
        return "native"
    if "model_args" in doc or "train_args" in doc:
        return "legacy_json"
    return None


# ----------------------------------------------------------------------------------
# Normalizing

def _empty() -> Dict[str, Any]:
    return {"name": None, "model_type": None, "model_variant": None, "model_args": {},
            "lossconfig": {"target": None, "params": {}}, "train": {}, "data": {}, "teacher": {},
            "extras": {}, "upstream": {}}


def _map_dict(norm: Normalized, prefix: str, values: Dict[str, Any], src: Tuple[str, ...]) -> None:
    if not isinstance(values, dict):
        return      # not a mapping: validate reports the section's type
    for key, value in values.items():
        norm.keymap[f"{prefix}.{key}"] = src + (key,)


def _normalize_legacy(doc: Dict[str, Any], norm: Normalized) -> None:
    out = norm.data
    out["model_type"] = doc.get("model_type")
    norm.keymap["model_type"] = ("model_type",)
    margs = doc.get("model_args") or {}
    if not isinstance(margs, dict):
        margs = {}
        out["extras"]["model_args"] = doc.get("model_args")
    for key, value in margs.items():
        if key == "model_variant":
            out["model_variant"] = value
            norm.keymap["model_variant"] = ("model_args", "model_variant")
        elif key == "lossconfig" and not isinstance(value, dict):
            # Not a mapping: kept as the section itself, so validate reports its type.
            out["lossconfig"] = copy.deepcopy(value)
            norm.keymap["lossconfig"] = ("model_args", "lossconfig")
        elif key == "lossconfig":
            out["lossconfig"] = {"target": value.get("target"), "params": copy.deepcopy(value.get("params") or {})}
            norm.keymap["lossconfig.target"] = ("model_args", "lossconfig", "target")
            norm.keymap["lossconfig.params"] = ("model_args", "lossconfig", "params")
            _map_dict(norm, "lossconfig.params", out["lossconfig"]["params"], ("model_args", "lossconfig", "params"))
        else:
            out["model_args"][key] = copy.deepcopy(value)
            norm.keymap[f"model_args.{key}"] = ("model_args", key)
    if "model_variant" not in norm.keymap:
        norm.keymap["model_variant"] = ("model_args", "model_variant")
    targs = doc.get("train_args") or {}
    if not isinstance(targs, dict):
        # ``train_args: "fast"``: kept as the train section, so validate reports its type.
        out["train"] = copy.deepcopy(targs)
        norm.keymap["train"] = ("train_args",)
    train_fields = {f.name for f in dataclasses.fields(TrainSection)}
    data_fields = {f.name for f in dataclasses.fields(DataSection)}
    for key, value in (targs.items() if isinstance(targs, dict) else []):
        if key in train_fields:
            out["train"][key] = value
            norm.keymap[f"train.{key}"] = ("train_args", key)
        elif key in TRAIN_RENAMES:
            section, name = TRAIN_RENAMES[key]
            out[section][name] = value
            norm.keymap[f"{section}.{name}"] = ("train_args", key)
            norm.notes.append((f"{section}.{name}", f"train_args.{key} read as {section}.{name}"))
        elif key in data_fields:
            out["data"][key] = value
            norm.keymap[f"data.{key}"] = ("train_args", key)
        else:
            out["extras"][f"train_args.{key}"] = value
            norm.ignored[f"train_args.{key}"] = ("train_args", key)
    for key in ("name", "experiment_name", "exp_name"):
        if key in doc and out["name"] is None:
            out["name"] = doc[key]
            norm.keymap["name"] = (key,)
    for key in ("data", "data_args"):
        if isinstance(doc.get(key), dict):
            for dkey, value in doc[key].items():
                if dkey in data_fields:
                    out["data"][dkey] = value
                    norm.keymap[f"data.{dkey}"] = (key, dkey)
                elif dkey in TRAIN_RENAMES and TRAIN_RENAMES[dkey][0] == "data":
                    out["data"][TRAIN_RENAMES[dkey][1]] = value
                    norm.keymap[f"data.{TRAIN_RENAMES[dkey][1]}"] = (key, dkey)
                else:
                    out["extras"][f"{key}.{dkey}"] = value
                    norm.ignored[f"{key}.{dkey}"] = (key, dkey)
    known = {"model_type", "model_args", "train_args", "name", "experiment_name", "exp_name", "data", "data_args"}
    for key, value in doc.items():
        if key not in known:
            if key == "teacher" and isinstance(value, dict):
                out["teacher"] = copy.deepcopy(value)
                _map_dict(norm, "teacher", value, ("teacher",))
                continue
            out["extras"][key] = value
            norm.ignored[key] = (key,)


def _normalize_taming_yaml(doc: Dict[str, Any], norm: Normalized) -> None:
    out = norm.data
    model = doc["model"]
    target = model.get("target")
    params = copy.deepcopy(model.get("params") or {})
    if not isinstance(params, dict):
        # Kept as model_args, so validate reports that it is not a mapping.
        out["model_args"], params = params, {}
        norm.keymap["model_args"] = ("model", "params")
    out["upstream"]["model_target"] = target
    norm.keymap["model_type"] = ("model", "target")
    norm.keymap["model_variant"] = ("model", "target")
    if target in NOT_FIRST_STAGE:
        out["model_type"] = target
    else:
        try:
            out["model_type"], out["model_variant"] = resolve_model(str(target))
        except RegistryError:
            out["model_type"] = target
    if "base_learning_rate" in model:
        out["train"]["base_learning_rate"] = model["base_learning_rate"]
        norm.keymap["train.base_learning_rate"] = ("model", "base_learning_rate")
    for key, value in params.items():
        if key == "lossconfig" and not isinstance(value, dict):
            out["lossconfig"] = value
            norm.keymap["lossconfig"] = ("model", "params", "lossconfig")
        elif key == "lossconfig":
            out["lossconfig"] = {"target": value.get("target"), "params": copy.deepcopy(value.get("params") or {})}
            norm.keymap["lossconfig.target"] = ("model", "params", "lossconfig", "target")
            norm.keymap["lossconfig.params"] = ("model", "params", "lossconfig", "params")
            _map_dict(norm, "lossconfig.params", out["lossconfig"]["params"],
                      ("model", "params", "lossconfig", "params"))
        else:
            out["model_args"][key] = value
            norm.keymap[f"model_args.{key}"] = ("model", "params", key)
    # taming's default is to train the GAN; the YAML has no use_gan switch.
    data = doc.get("data")
    if isinstance(data, dict):
        out["upstream"]["data"] = copy.deepcopy(data)
        dparams = data.get("params") or {}
        if isinstance(dparams, dict):
            if "batch_size" in dparams:
                out["train"]["batch_size"] = dparams["batch_size"]
                norm.keymap["train.batch_size"] = ("data", "params", "batch_size")
            if "num_workers" in dparams:
                out["train"]["num_workers"] = dparams["num_workers"]
                norm.keymap["train.num_workers"] = ("data", "params", "num_workers")
            train_ds = dparams.get("train")
            if isinstance(train_ds, dict) and isinstance(train_ds.get("params"), dict):
                size = train_ds["params"].get("size")
                if size is not None:
                    out["data"]["image_size"] = size
                    norm.keymap["data.image_size"] = ("data", "params", "train", "params", "size")
    lightning = doc.get("lightning")
    if isinstance(lightning, dict):
        out["upstream"]["lightning"] = copy.deepcopy(lightning)
        trainer = lightning.get("trainer") or {}
        if isinstance(trainer, dict):
            for src, dst in (("max_steps", "max_steps"), ("accumulate_grad_batches", "accumulate_grad_batches"),
                             ("max_epochs", "max_epochs"), ("gradient_clip_val", "grad_clip")):
                if src in trainer and trainer[src] not in (None, -1):
                    out["train"][dst] = trainer[src]
                    norm.keymap[f"train.{dst}"] = ("lightning", "trainer", src)
    for key, value in doc.items():
        if key not in ("model", "data", "lightning"):
            out["extras"][key] = value
            norm.ignored[key] = (key,)


def _normalize_native(doc: Dict[str, Any], norm: Normalized) -> None:
    out = norm.data
    for key, value in doc.items():
        if key in ("model_args", "extras", "upstream"):
            out[key] = copy.deepcopy(value) if isinstance(value, dict) else value
            if isinstance(value, dict):
                _map_dict(norm, key, value, (key,))
        elif key == "lossconfig" and isinstance(value, dict):
            out["lossconfig"] = {"target": value.get("target"), "params": copy.deepcopy(value.get("params") or {})}
            norm.keymap["lossconfig.target"] = ("lossconfig", "target")
            norm.keymap["lossconfig.params"] = ("lossconfig", "params")
            _map_dict(norm, "lossconfig.params", out["lossconfig"]["params"], ("lossconfig", "params"))
            for extra in value:
                if extra not in ("target", "params"):
                    out["lossconfig"][extra] = value[extra]
        elif key in ("train", "data", "teacher", "source") and isinstance(value, dict):
            out[key] = copy.deepcopy(value)
            _map_dict(norm, key, value, (key,))
        else:
            out[key] = value
            norm.keymap[key] = (key,)
    norm.keymap.setdefault("model_variant", ("model_variant",))
    norm.keymap.setdefault("model_type", ("model_type",))


# Where the training crop size came from, kept in the normalized data under this private key
# (``_``-keys never reach the typed config).  Values: ``("config", source key path)``,
# ``("resolution", "model_args.ddconfig.resolution")`` (derived: a legacy / taming config
# that names no size trains at the size its model is built for), ``("override", key)``.
# Absent: the schema default applies (a native config that names no size).
CROP_SOURCE_KEY = "_image_size_source"
RESOLUTION_PATH = "model_args.ddconfig.resolution"


def _resolution_crop(data: Dict[str, Any]) -> Optional[int]:
    """``ddconfig.resolution`` when it is a usable crop size (an integer from 8 to the
    largest allowed crop), else None (the rules report a bad resolution themselves)."""
    from adapters.registry import MAX_IMAGE_SIZE

    args = data.get("model_args")
    dd = args.get("ddconfig") if isinstance(args, dict) else None
    value = dd.get("resolution") if isinstance(dd, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 8 <= value <= MAX_IMAGE_SIZE:
        return value
    return None


def _record_crop_source(norm: Normalized) -> None:
    """Note where ``data.image_size`` comes from; a legacy JSON or taming YAML config that
    names none trains at ``ddconfig.resolution`` (not the schema default, which for a
    resolution-32 model is 8x the size and 64x the attention positions)."""
    data = norm.data.get("data")
    if not isinstance(data, dict):
        return      # not a mapping: validate reports the section's type
    if "image_size" in data:
        source = norm.keymap.get("data.image_size", ("data", "image_size"))
        norm.data[CROP_SOURCE_KEY] = ("config", ".".join(str(k) for k in source))
        return
    if norm.fmt in ("legacy_json", "taming_yaml"):
        size = _resolution_crop(norm.data)
        if size is not None:
            data["image_size"] = size
            norm.data[CROP_SOURCE_KEY] = ("resolution", RESOLUTION_PATH)


def normalize(path: str) -> Normalized:
    """Parse ``path`` and map it to the schema's shape (no type checking yet)."""
    doc, syntax, duplicates = read_config_file(path)
    norm = normalize_document(doc, path, syntax)
    norm.duplicates = duplicates
    return norm


def normalize_document(doc: Dict[str, Any], path: str, syntax: str = "yaml",
                       keep_source: bool = False) -> Normalized:
    """Map a parsed document to the schema's shape.  ``path`` names where it came from (a
    file, or e.g. ``run/checkpoints/last.ckpt (stored config)``).  ``keep_source``: the
    document is a resolved config this tool recorded; keep the ``source`` it names."""
    if not isinstance(doc, dict):
        raise ConfigFileError(f"{path}: not a config (top level is {type(doc).__name__}, expected a mapping "
                              "with model_type or model.target)")
    fmt = detect_format(doc)
    if fmt is None:
        raise ConfigFileError(f"{path}: not a config this tool knows (no model_type, model_args or model.target); "
                              "see configs/ for examples")
    norm = Normalized(data=_empty(), fmt=fmt, path=path, raw=doc)
    {"legacy_json": _normalize_legacy, "taming_yaml": _normalize_taming_yaml,
     "native": _normalize_native}[fmt](doc, norm)
    if norm.data.get("name") is None:
        norm.data["name"] = os.path.splitext(os.path.basename(path))[0]
    recorded = doc.get("source") if fmt == "native" and keep_source else None
    if isinstance(recorded, dict) and recorded.get("format"):
        # A resolved config written by this tool (run folder, checkpoint): keep its origin,
        # which decides e.g. taming's learning-rate scaling.
        norm.data["source"] = dict(recorded)
    else:
        norm.data["source"] = {"path": os.path.abspath(path), "format": fmt}
    _record_crop_source(norm)
    norm.data["_syntax"] = syntax
    return norm


# ----------------------------------------------------------------------------------
# Type checking against the schema

def _suggest(name: str, choices: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {near[0]!r}?" if near else ""


def unknown_keys(data: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(dotted path, suggestion) for keys the schema does not have (typed sections only)."""
    problems = []
    for key in data:
        if key.startswith("_"):
            continue
        if key not in TOP_LEVEL:
            problems.append((key, _suggest(key, TOP_LEVEL)))
        elif key in SECTION_CLASSES and isinstance(data[key], dict):
            names = [f.name for f in dataclasses.fields(SECTION_CLASSES[key])]
            for sub in data[key]:
                if sub not in names:
                    problems.append((f"{key}.{sub}", _suggest(sub, names)))
    return problems


def type_errors(data: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(dotted path, message) for values whose type does not fit the schema."""
    problems = []
    for key, cls in SECTION_CLASSES.items():
        section = data.get(key)
        if not isinstance(section, dict):
            if section is not None:
                problems.append((key, f"expected a mapping, got {type(section).__name__}"))
            continue
        base = OmegaConf.structured(cls)
        known = {sub: value for sub, value in section.items() if sub in base}
        try:
            # The fields are independent: the whole section merges iff each key does, so one
            # merge clears a good section (each merge copies the base: ~6 ms per call).
            OmegaConf.merge(base, known)
            continue
        except (OmegaConfBaseException, TypeError, ValueError):
            pass
        for sub, value in known.items():
            try:
                OmegaConf.merge(base, {sub: value})
            except (OmegaConfBaseException, TypeError, ValueError) as exc:
                # (OmegaConf raises a bare TypeError merging a list into a mapping field.)
                expected = _type_name(cls, sub)
                shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
                problems.append((f"{key}.{sub}", f"{shown} is not a valid {expected}"
                                 + ("" if expected else f" ({getattr(exc, 'msg', exc)})")))
    for key in ("model_type", "name"):
        if data.get(key) is not None and not isinstance(data[key], str):
            problems.append((key, f"{data[key]!r} is not a string"))
    if data.get("model_variant") is not None and not isinstance(data["model_variant"], str):
        problems.append(("model_variant", f"{data['model_variant']!r} is not a string"))
    if not isinstance(data.get("model_args", {}), dict):
        problems.append(("model_args", "expected a mapping"))
    return problems


PLAIN_TYPES = (str, int, float, bool, type(None))


def plain_data_problems(data: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(dotted path, problem, fix) for values the typed config cannot hold as written.

    * ``${...}`` interpolations: OmegaConf would resolve them later, in the middle of
      training, against keys this tool renames; they are refused, not resolved.
    * values that are not plain data (YAML ``!!set``, ``!!binary``) and non-text keys.
    """
    found: List[Tuple[str, str, str]] = []
    stack: List[Tuple[Any, str]] = [(v, k) for k, v in data.items() if not str(k).startswith("_")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key, sub in value.items():
                if not isinstance(key, str):
                    found.append((f"{path}.{key}", f"key {key!r} is a {type(key).__name__}; config keys are text",
                                  f"write the key as text (\"{key}\") or remove it"))
                else:
                    stack.append((sub, f"{path}.{key}"))
        elif isinstance(value, list):
            stack.extend((sub, f"{path}.{i}") for i, sub in enumerate(value))
        elif isinstance(value, str):
            if "${" in value:
                found.append((path, f"{value[:60]!r} is an interpolation (${{...}}); this tool does not resolve "
                                    "interpolations", "write the value itself"))
        elif not isinstance(value, PLAIN_TYPES):
            found.append((path, f"a {type(value).__name__} value; configs hold text, numbers, true/false, lists "
                                "and mappings", "write a plain value"))
    return sorted(found)


def _type_name(cls, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            return t.replace("Optional[", "").rstrip("]") if t.startswith("Optional[") else t
    return ""


def to_structured(data: Dict[str, Any]) -> DictConfig:
    """Merge plain normalized data into the typed schema.  Raises UserError on problems."""
    clean = {k: v for k, v in data.items() if not k.startswith("_")}
    problems = [f"unknown key {p!r}.{s}" for p, s in unknown_keys(clean)]
    problems += [f"{p}: {m}" for p, m in type_errors(clean)]
    problems += [f"{p}: {m}" for p, m, _ in plain_data_problems(clean)]
    if problems:
        raise UserError("config: " + "; ".join(problems))
    clean = {k: v for k, v in clean.items() if v is not None or k in ("model_variant",)}
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        return OmegaConf.merge(schema, clean)
    except OmegaConfBaseException as exc:
        raise UserError(f"config: {exc.full_key or ''}: {exc.msg}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"config: {exc}") from None


# ----------------------------------------------------------------------------------
# Overrides: key=value with dotted keys

def parse_override(item: str) -> Tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"override {item!r} has no key (e.g. train.max_steps=100)")
    try:
        # The same bounded YAML reader as config files: an override is as hostile as a file.
        value = load_yaml_text(text, f"override {key}")[0] if text.strip() else None
    except ConfigFileError as exc:
        if "invalid YAML" not in str(exc):
            raise
        value = text    # not YAML: the text itself (a path with a colon, say)
    return key, value


def accepted_model_args(model_type: Optional[str],
                        variant: Optional[str] = None) -> Optional[Tuple[List[str], bool]]:
    """(model_args names the type accepts, whether it refuses other names), as its
    registration declares them; for a type with variants and none given, every variant's
    names.  None when the type is unknown."""
    try:
        spec = get_model_type(model_type) if model_type else None
    except RegistryError:
        return None
    return spec.accepted_args(variant) if spec is not None else None


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``key=value`` overrides to normalized data; unknown keys are rejected."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        head = parts[0]
        if head not in TOP_LEVEL:
            raise UserError(f"override {key!r}: unknown key {head!r}.{_suggest(head, TOP_LEVEL)}")
        if head in SECTION_CLASSES:
            if len(parts) == 1:
                raise UserError(f"override {key!r}: name a key inside {head} (e.g. {head}.<name>=...)")
            names = [f.name for f in dataclasses.fields(SECTION_CLASSES[head])]
            if parts[1] not in names:
                raise UserError(f"override {key!r}: {head} has no key {parts[1]!r}.{_suggest(parts[1], names)}")
            if head == "lossconfig" and parts[1] == "params" and len(parts) > 2:
                pass  # checked against the loss class by validate
            elif len(parts) > 2:
                raise UserError(f"override {key!r}: {head}.{parts[1]} has no sub-keys")
        elif head == "model_args" and len(parts) >= 2:
            present = list(data.get("model_args") or {})
            accepted = accepted_model_args(data.get("model_type"))
            known = present + (accepted[0] if accepted else [])
            if parts[1] not in known:
                raise UserError(f"override {key!r}: {data.get('model_type')} has no model argument "
                                f"{parts[1]!r}.{_suggest(parts[1], known)}")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        try:
            if head in SECTION_CLASSES and len(parts) == 2:
                OmegaConf.merge(OmegaConf.structured(SECTION_CLASSES[head]), {parts[1]: value})
        except (OmegaConfBaseException, TypeError, ValueError):
            raise UserError(f"override {key!r}: {value!r} is not a valid "
                            f"{_type_name(SECTION_CLASSES[head], parts[1])}") from None
        if key == "data.image_size":
            data[CROP_SOURCE_KEY] = ("override", key)
    _follow_resolution(data)
    return data


def _follow_resolution(data: Dict[str, Any]) -> None:
    """A crop derived from ``ddconfig.resolution`` follows an override of the resolution."""
    source = data.get(CROP_SOURCE_KEY)
    if not source or source[0] != "resolution" or not isinstance(data.get("data"), dict):
        return
    size = _resolution_crop(data)
    if size is not None:
        data["data"]["image_size"] = size
    else:       # the resolution is no longer a usable size: the schema default applies
        data["data"].pop("image_size", None)
        data.pop(CROP_SOURCE_KEY, None)


# ----------------------------------------------------------------------------------
# Public entry points

def load_config(path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Load any supported config file into the typed, normalized ExperimentConfig.

    Raises :class:`UserError` for unusable files, type errors, unknown keys and bad
    overrides.  Semantic checks (model/variant/loss consistency) live in ``validate``.
    """
    norm = normalize(path)
    data = canonicalize(apply_overrides(norm.data, overrides))
    return to_structured(data)


def canonicalize(data: Dict[str, Any]) -> Dict[str, Any]:
    """Canonical model type / variant names and installed loss-target paths (lenient)."""
    data = copy.deepcopy(data)
    try:
        data["model_type"], variant = resolve_model(str(data.get("model_type")), data.get("model_variant"))
        data["model_variant"] = variant
    except RegistryError:
        pass  # validate reports it
    loss = data.get("lossconfig") or {}
    if isinstance(loss.get("target"), str):
        loss["target"] = canonical_loss_target(loss["target"])[0]
    return data


def config_from_dict(data: Dict[str, Any]) -> DictConfig:
    """Typed config from a plain dict in the schema's shape."""
    return to_structured(data)


def save_config(cfg, path: str) -> None:
    """Write a resolved config as YAML (native shape), atomically."""
    text = OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else \
        yaml.safe_dump(cfg, sort_keys=False)
    atomic.write_text(path, text)


def uses_taming_lr_scaling(cfg) -> bool:
    """taming scales base_learning_rate by batch x accumulation x GPUs when lr is not given."""
    return cfg.train.learning_rate is None and cfg.train.base_learning_rate is not None
