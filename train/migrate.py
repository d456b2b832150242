"""``python -m train migrate``: bring a legacy experiment (config + checkpoint) into this tool.

    python -m train migrate CONFIG [--ckpt FILE] --out DIR [--force]
    python -m train migrate --export DIR_OR_CKPT --out FILE.ckpt     # back to upstream taming

Migration writes, into ``DIR`` (built in a temporary folder next to it and renamed at the
end, so a failed migration leaves nothing half-written):

* ``config.yaml``          the native config (``train/schema.ExperimentConfig``) with every
                           ``validate --fix`` correction applied (the legacy ``vqvae2`` +
                           ``EMAVQ`` becomes ``TamingVQGAN``), ``ckpt_path`` removed;
* ``model.safetensors``    generator weights, upstream key names without ``loss.``;
* ``discriminator.safetensors``  the taming loss' ``discriminator.*`` entries (keys as in
                           ``TamingLossCalculator.state_dict()``), when the checkpoint has them;
* ``train_state.pt``       ``{"global_step", "epoch", "optimizer_states": {"generator"?,
                           "discriminator"?}}`` -- tensors and builtins only, so
                           ``torch.load(weights_only=True)`` reads it;
* ``report.md`` / ``report.json``  every config change, every key renamed / dropped /
                           initialised, and what could not be carried and why.

``python -m train fit DIR/config.yaml --resume DIR`` continues at the recorded step.

How the pieces are converted:

* The checkpoint is read by :mod:`train.safe_load` (no code from the file ever runs).
  Wrapper prefixes (DDP ``module.``, ``model.``, vendored ``models.taming.``) are stripped;
  ``loss.perceptual_loss.*`` (LPIPS, rebuilt from the lpips package) and latent-diffusion's
  ``model_ema.*`` are dropped with a note; the rest must load *strictly* into the model the
  config builds (a shape mismatch names the key and both shapes, exit 2).
* EMAVQ: ``quantize.embedding.{weight,cluster_size,embed_avg}`` are carried.  A plain VQ
  checkpoint migrated to EMAVQ gets ``cluster_size = 1`` for every code and
  ``embed_avg = weight``: the EMA quantizer's codebook ``embed_avg / smoothed(cluster_size)``
  is then exactly the old codebook (Laplace smoothing of equal counts is the identity), and
  each code starts with the weight of one pseudo-observation, so real batches take over
  after a few hundred steps at decay 0.99.  The other way (EMAVQ -> VQ) drops the statistics.
* Optimizer states: taming's Lightning ``configure_optimizers`` builds ``opt_ae`` over
  encoder, decoder, quantize (not for EMAVQ), quant_conv, post_quant_conv parameters in that
  order, and ``opt_disc`` over ``loss.discriminator``.  A saved state is carried only when
  its parameter count and every moment's shape match that order; it is then re-indexed for
  this tool's optimizer (built as the trainer builds it).  Otherwise the report says why it
  was not carried, and training starts those moments fresh.

The ``restricted unpickler`` idea and the upstream layouts are described in
``train/safe_load.py`` and ``adapters/taming_vqgan.py``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from train import atomic
from train.errors import UserError
from train.optimizer import build_optimizer

# The upstream VQModel's top-level modules (state-dict roots), in configure_optimizers order.
GENERATOR_GROUPS = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")
# Buffers under quantize that are never optimizer parameters.
QUANTIZE_BUFFERS = ("quantize.used",)
EMA_STATS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")
# Model arguments that point at the old checkpoint: the weights now live in model.safetensors.
CHECKPOINT_ARGS = ("ckpt_path", "ignore_keys")


# --------------------------------------------------------------------------------------
# The report.

@dataclass
class Report:
    config_path: str = ""
    checkpoint_path: Optional[str] = None
    out_dir: str = ""
    config: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Dict[str, Any] = field(default_factory=dict)
    weights: Dict[str, Any] = field(default_factory=lambda: {
        "prefixes_stripped": {}, "renamed": [], "dropped": [], "initialised": [], "missing": [],
        "generator_tensors": 0, "discriminator_tensors": 0})
    train_state: Dict[str, Any] = field(default_factory=dict)
    not_carried: List[Dict[str, str]] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)

    def drop(self, what: str, count: int, reason: str) -> None:
        self.weights["dropped"].append({"keys": what, "count": count, "reason": reason})

    def cannot_carry(self, what: str, why: str) -> None:
        self.not_carried.append({"what": what, "why": why})

    def as_dict(self) -> Dict[str, Any]:
        return {"config_path": self.config_path, "checkpoint_path": self.checkpoint_path,
                "out_dir": self.out_dir, "config": self.config, "checkpoint": self.checkpoint,
                "weights": self.weights, "train_state": self.train_state,
                "not_carried": self.not_carried, "outputs": self.outputs}


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render_markdown(report: Report) -> str:
    r = report
    lines = ["# Migration report", "",
             f"- config: `{r.config_path}` ({r.config.get('format', '?')})",
             f"- checkpoint: `{r.checkpoint_path}`" if r.checkpoint_path else "- checkpoint: none (config only)",
             f"- output: `{r.out_dir}`", "",
             "Resume with:", "", "```",
             f"python -m train fit {os.path.join(r.out_dir, 'config.yaml')} --resume {r.out_dir}", "```", ""]
    lines += ["## Config changes", ""]
    fixes = r.config.get("fixes", [])
    if fixes:
        lines += ["Corrections (`validate --fix`):", ""]
        for fx in fixes:
            lines.append(f"- `{fx['path']}`: {_short(fx['before'])} -> {_short(fx['after'])} -- {fx['message']}")
        lines.append("")
    changes = r.config.get("changes", [])
    if changes:
        lines += ["Every changed value (normalized source -> migrated config):", ""]
        for ch in changes:
            lines.append(f"- `{ch['path']}`: {_short(ch['before'])} -> {_short(ch['after'])}")
        lines.append("")
    for note in r.config.get("notes", []):
        lines.append(f"- note: {note}")
    for finding in r.config.get("remaining", []):
        lines.append(f"- {finding['level']}: `{finding['path']}`: {finding['message']} (fix: {finding['fix']})")
    if not (fixes or changes or r.config.get("notes") or r.config.get("remaining")):
        lines.append("No changes.")
    lines.append("")
    if r.checkpoint:
        ck = r.checkpoint
        lines += ["## Checkpoint", "", f"- read with: {ck.get('load_method')}"]
        for part in ck.get("dropped_objects", []):
            lines.append(f"- object not restored (inert placeholder, no code ran): {part}")
        for note in ck.get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
        w = r.weights
        lines += ["## Weights", "",
                  f"- generator tensors written: {w['generator_tensors']}",
                  f"- discriminator tensors written: {w['discriminator_tensors']}"]
        for prefix, count in w["prefixes_stripped"].items():
            lines.append(f"- prefix `{prefix}` removed from {count} keys")
        if w["renamed"]:
            shown = w["renamed"][:5]
            lines.append(f"- {len(w['renamed'])} keys renamed, e.g. " +
                         ", ".join(f"`{a}` -> `{b}`" for a, b in shown))
        for d in w["dropped"]:
            lines.append(f"- dropped `{d['keys']}` ({d['count']} keys): {d['reason']}")
        for init in w["initialised"]:
            lines.append(f"- initialised `{init['key']}`: {init['how']}")
        for m in w["missing"]:
            lines.append(f"- missing `{m['key']}`: {m['fix']}")
        lines.append("")
        ts = r.train_state
        lines += ["## Training state", "",
                  f"- global_step: {ts.get('global_step')}  epoch: {ts.get('epoch')}"]
        for name, info in ts.get("optimizers", {}).items():
            state = "carried" if info.get("carried") else "not carried"
            lines.append(f"- {name} optimizer: {state}. {info.get('detail', '')}".rstrip())
        if ts.get("hyperparameters_note"):
            lines.append(f"- {ts['hyperparameters_note']}")
        lines.append("")
    lines += ["## Not carried", ""]
    if r.not_carried:
        for item in r.not_carried:
            lines.append(f"- {item['what']}: {item['why']}")
    else:
        lines.append("Everything was carried.")
    lines += ["", "## Files", ""] + [f"- `{name}`" for name in r.outputs] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Config: validate --fix, then the native schema.

def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _get_path(data: Dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def migrate_config(path: str, report: Report):
    """The corrected native config for ``path`` (``validate --fix`` applied) and the report.

    Reuses ``train.validate``: the fixes are applied to the source document by
    ``fix_document``, written in the source's own format to a scratch file with the same
    name, and loaded again, so migration and ``validate --fix`` can never disagree.
    """
    from omegaconf import OmegaConf

    from train.config import canonicalize, to_structured
    from train.validate import DELETE, ERROR, fix_document, validate_file, write_document

    norm, before = validate_file(path)
    syntax = norm.data.get("_syntax", "json")
    with tempfile.TemporaryDirectory(prefix="vqtok-migrate-") as scratch:
        fixed_path = os.path.join(scratch, os.path.basename(path))
        write_document(fix_document(norm, before), fixed_path, syntax)
        norm_fixed, after = validate_file(fixed_path)
    errors = [f for f in after if f.level == ERROR]
    if errors:
        listing = "; ".join(f"{f.path}: {f.message} (fix: {f.fix})" for f in errors)
        raise UserError(f"{path}: {len(errors)} config error(s) that validate --fix cannot correct: {listing}. "
                        "Edit the config and run migrate again")

    data = canonicalize(norm_fixed.data)
    # The weights come from --ckpt and end up in model.safetensors: the migrated config must
    # not load the old file again on every build.
    model_args = data.get("model_args") or {}
    removed_args = {k: model_args.pop(k) for k in CHECKPOINT_ARGS if k in model_args}
    data["name"] = norm.data.get("name") or data.get("name")
    data["source"] = {"path": os.path.abspath(path), "format": norm.fmt}
    cfg = to_structured(data)

    original = canonicalize(norm.data)
    fixes = []
    for finding in before:
        for op_path, value in finding.ops:
            fixes.append({"path": op_path, "before": _get_path(norm.data, op_path),
                          "after": None if value is DELETE else value, "message": finding.message,
                          "code": finding.code})
    final_plain = OmegaConf.to_container(cfg, resolve=True)
    old_flat = _flatten({k: v for k, v in norm.data.items() if not k.startswith("_")})
    new_flat = _flatten(final_plain)
    changes = [{"path": key, "before": old_flat.get(key), "after": new_flat.get(key)}
               for key in sorted(set(old_flat) | set(new_flat))
               if old_flat.get(key) != new_flat.get(key) and key in old_flat
               and old_flat.get(key) not in (None, {}, []) and not key.startswith("source.")]
    notes = [msg for _, msg in norm.notes]
    if original.get("model_type") != norm.data.get("model_type"):
        notes.append(f"model_type {norm.data.get('model_type')!r} written as {original.get('model_type')!r}")
    for key, value in removed_args.items():
        notes.append(f"model_args.{key} ({_short(value)}) removed: the migrated weights are in "
                     "model.safetensors")
    report.config = {
        "format": norm.fmt,
        "findings": [f.as_dict() for f in before],
        "fixes": fixes,
        "changes": changes,
        "notes": notes,
        "remaining": [f.as_dict() for f in after if f.level != ERROR],
        "removed_model_args": removed_args,
    }
    return cfg, removed_args


# --------------------------------------------------------------------------------------
# Weights.

def _discriminator_from_config(cfg) -> Optional[nn.Module]:
    """taming's PatchGAN discriminator as ``VQLPIPSWithDiscriminator`` builds it from
    ``lossconfig.params`` (without LPIPS, which needs VGG weights migration does not use)."""
    from adapters.registry import get_model_type, loss_family_of_target
    from losses.gan import build_discriminator
    from train.schema import as_dict

    family = get_model_type(cfg.model_type).loss_family
    if cfg.lossconfig.target:
        family = loss_family_of_target(str(cfg.lossconfig.target)) or family
    if family != "taming":
        return None
    params = as_dict(cfg.lossconfig.params)
    ddconfig = as_dict(cfg.model_args).get("ddconfig") or {}
    return build_discriminator(in_channels=int(params.get("disc_in_channels", ddconfig.get("out_ch", 3))),
                               n_layers=int(params.get("disc_num_layers", 3)),
                               ndf=int(params.get("disc_ndf", 64)),
                               use_actnorm=bool(params.get("use_actnorm", False)))


class _DiscriminatorHolder(nn.Module):
    """Gives the discriminator the calculator's key names (``discriminator.*``)."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.discriminator = disc


def _split_checkpoint(sd: Dict[str, torch.Tensor], report: Report, ignore_keys: Sequence[str]):
    """Generator entries, discriminator entries (``discriminator.*``), both ordered."""
    gen: Dict[str, torch.Tensor] = collections.OrderedDict()
    disc: Dict[str, torch.Tensor] = collections.OrderedDict()
    dropped: Dict[str, Tuple[int, str]] = collections.OrderedDict()

    def note(group: str, reason: str) -> None:
        count, _ = dropped.get(group, (0, reason))
        dropped[group] = (count + 1, reason)

    for key, value in sd.items():
        if ignore_keys and key.startswith(tuple(ignore_keys)):
            note(f"{key.split('.')[0]}.* (ignore_keys)", "listed in the config's model_args.ignore_keys; "
                 "these keep their initial values, as upstream's init_from_ckpt does")
        elif key.startswith("loss.discriminator."):
            disc[key[len("loss."):]] = value
        elif key.startswith("loss.perceptual_loss."):
            note("loss.perceptual_loss.*", "LPIPS weights are fixed and rebuilt from the lpips package "
                 "(and the VGG16 trunk file) by the loss; nothing trained is lost")
        elif key.startswith("loss."):
            note("loss.*", f"not part of the taming discriminator (e.g. {key}); this tool's loss has no "
                 "such state")
        elif key.startswith("model_ema."):
            note("model_ema.*", "latent-diffusion's weight EMA copy; this tool keeps no weight EMA, the "
                 "trained weights themselves were carried")
        else:
            gen[key] = value
    for group, (count, reason) in dropped.items():
        report.drop(group, count, reason)
    return gen, disc


def _convert_codebook(model: nn.Module, gen: Dict[str, torch.Tensor], report: Report) -> None:
    """EMA statistics in or out, as the target variant needs (module docstring)."""
    own = model.state_dict()
    wants_ema = all(k in own for k in EMA_STATS)
    has_ema = [k for k in EMA_STATS if k in gen]
    weight = gen.get("quantize.embedding.weight")
    # With a codebook of another size the strict load reports the mismatch; initialising
    # statistics of that wrong size would only add confusing lines to the message.
    if wants_ema and not has_ema and weight is not None and \
            tuple(weight.shape) == tuple(own["quantize.embedding.weight"].shape):
        gen["quantize.embedding.cluster_size"] = torch.ones(weight.shape[0], dtype=weight.dtype)
        gen["quantize.embedding.embed_avg"] = weight.clone()
        report.weights["initialised"] += [
            {"key": "quantize.embedding.cluster_size",
             "how": "1 for every code: the checkpoint's codebook was trained by gradients (plain VQ) and has "
                    "no EMA statistics; one pseudo-count per code keeps the EMA codebook equal to the old one"},
            {"key": "quantize.embedding.embed_avg",
             "how": "a copy of quantize.embedding.weight, so embed_avg / cluster_size reproduces the old codebook"}]
    elif has_ema and not wants_ema:
        for key in has_ema:
            gen.pop(key)
        report.drop("quantize.embedding.{cluster_size,embed_avg}", len(has_ema),
                    "EMA statistics of an EMAVQ codebook; the target variant trains its codebook by gradients "
                    "(the codebook weight itself was carried)")


def _load_strictly(module: nn.Module, sd: Dict[str, torch.Tensor], source: str, allow_missing=()) -> None:
    from adapters.weights import load_model_weights

    load_model_weights(module, sd, strict=True, source=source, allow_missing=tuple(allow_missing))


# --------------------------------------------------------------------------------------
# Optimizer states.

def _source_generator_orders(gen: Dict[str, torch.Tensor]) -> List[Tuple[str, List[str]]]:
    """Candidate parameter orders of upstream's ``opt_ae`` for the checkpoint's keys."""
    def group(prefix: str) -> List[str]:
        return [k for k in gen if k.startswith(prefix + ".")]

    enc_dec = group("encoder") + group("decoder")
    convs = group("quant_conv") + group("post_quant_conv")
    quant = [k for k in group("quantize") if k not in QUANTIZE_BUFFERS]
    quant_no_ema = [k for k in quant if k not in EMA_STATS]
    orders = [("taming VQModel/GumbelVQ (encoder, decoder, quantize, quant_conv, post_quant_conv)",
               enc_dec + quant_no_ema + convs),
              ("taming EMAVQ (encoder, decoder, quant_conv, post_quant_conv; codebook by EMA only)",
               enc_dec + convs)]
    if quant != quant_no_ema:
        orders.append(("VQModel.configure_optimizers on an EMA quantizer (EMA tensors as parameters)",
                       enc_dec + quant + convs))
    return orders


def _check_saved_optimizer(saved: Any, names: List[str], shapes: Dict[str, torch.Size]) -> Optional[str]:
    """None when ``saved`` (a torch optimizer state_dict) fits ``names`` in that order,
    else the reason it does not."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        return "it is not a torch optimizer state_dict"
    ids = [i for g in saved["param_groups"] if isinstance(g, dict) for i in (g.get("params") or [])]
    if len(ids) != len(names):
        return f"it holds {len(ids)} parameters, the expected order has {len(names)}"
    for pos, pid in enumerate(ids):
        st = saved["state"].get(pid)
        if not isinstance(st, dict):
            continue
        for moment in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            t = st.get(moment)
            if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(shapes[names[pos]]):
                return (f"its entry {pos} ({moment}) has shape {tuple(t.shape)} but parameter {names[pos]} has "
                        f"{tuple(shapes[names[pos]])}: the parameter order differs from upstream's")
    return None


def _trainer_optimizers(cfg, model: nn.Module, disc: Optional[nn.Module]):
    """Fresh optimizers built by the trainer's own function (``train.optimizer.build_optimizer``):
    one over ``model.generator_parameters()`` and one over the discriminator, none when
    ``use_gan`` is false, so the carried state dicts have the trainer's groups and order."""
    gen_params = list(model.generator_parameters())
    t = cfg.train
    # The trainer resets lr to the configured one after loading, so any positive value works.
    lr = float(t.learning_rate or t.base_learning_rate or 1e-4)
    gen_opt = build_optimizer(model, gen_params, lr, float(t.weight_decay), t.adam_betas)
    disc_opt = None
    if disc is not None and bool(t.use_gan) and str(cfg.model_variant or "").lower() != "nodisc":
        disc_opt = build_optimizer(disc, disc.parameters(), lr, float(t.weight_decay), t.adam_betas)
    return gen_opt, disc_opt


def _carry_into(optimizer: torch.optim.Optimizer, named_params: Dict[int, str], saved: Dict[str, Any],
                names: List[str]) -> Tuple[Dict[str, Any], int, List[str]]:
    """Copy the per-parameter moments of ``saved`` (indexed by ``names``) into ``optimizer``
    by parameter name; returns its state_dict, how many were carried and source names
    whose moments had no place in the target."""
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    by_name = {names[pos]: saved["state"][pid] for pos, pid in enumerate(ids) if pid in saved["state"]}
    carried = 0
    target_names = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = named_params.get(id(p))
            target_names.add(name)
            st = by_name.get(name)
            if st is None:
                continue
            new = {}
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    value = value.detach().clone().to(p.device)
                    if key == "step":
                        value = value.float()
                elif key == "step":
                    value = torch.tensor(float(value))
                new[key] = value
            optimizer.state[p] = new
            carried += 1
    orphaned = [n for n in by_name if n not in target_names]
    return optimizer.state_dict(), carried, orphaned


def carry_optimizers(cfg, ckpt: Dict[str, Any], model: nn.Module, disc: Optional[nn.Module],
                     gen: Dict[str, torch.Tensor], disc_sd: Dict[str, torch.Tensor],
                     report: Report) -> Dict[str, Any]:
    saved = ckpt.get("optimizer_states") if isinstance(ckpt, dict) else None
    info: Dict[str, Dict[str, Any]] = {}
    out: Dict[str, Any] = {}
    if not saved:
        report.cannot_carry("optimizer states", "the checkpoint has none (a weights-only file); Adam moments "
                            "start fresh")
        report.train_state["optimizers"] = info
        return out
    saved = list(saved) if isinstance(saved, (list, tuple)) else [saved]
    gen_opt, disc_opt = _trainer_optimizers(cfg, model, disc)
    model_names = {id(p): n for n, p in model.named_parameters()}
    gen_shapes = {k: v.shape for k, v in gen.items()}

    used = set()
    gen_reasons = []
    for idx, state in enumerate(saved):
        for label, names in _source_generator_orders(gen):
            reason = _check_saved_optimizer(state, names, gen_shapes)
            if reason is None:
                sd, carried, orphaned = _carry_into(gen_opt, model_names, state, names)
                out["generator"] = sd
                used.add(idx)
                detail = (f"optimizer_states[{idx}] matched {label}; moments of {carried} parameters re-indexed "
                          "for this tool's generator optimizer")
                if orphaned:
                    detail += f"; {len(orphaned)} had no place here and were left out ({', '.join(orphaned[:3])})"
                    report.cannot_carry(f"generator optimizer moments of {', '.join(orphaned[:3])}",
                                        "these parameters are not trained by the optimizer in the target "
                                        "variant (e.g. an EMA codebook)")
                info["generator"] = {"carried": True, "detail": detail, "source_index": idx}
                break
            gen_reasons.append(f"optimizer_states[{idx}] vs {label.split(' (')[0]}: {reason}")
        if "generator" in out:
            break
    if "generator" not in out:
        why = "no saved optimizer fits the generator's parameter order: " + "; ".join(gen_reasons[:4])
        info["generator"] = {"carried": False, "detail": why}
        report.cannot_carry("generator optimizer state", why + ". Adam moments start fresh")

    if disc is not None and disc_sd:
        disc_names = [n for n, _ in _DiscriminatorHolder(disc).named_parameters()]
        disc_shapes = {k: v.shape for k, v in disc_sd.items()}
        if disc_opt is None:
            why = ("train.use_gan is false (or the variant is NoDisc): this tool builds no discriminator "
                   "optimizer (the discriminator weights were still carried)")
            info["discriminator"] = {"carried": False, "detail": why}
            report.cannot_carry("discriminator optimizer state", why)
        elif not all(n in disc_shapes for n in disc_names):
            why = "the checkpoint's discriminator lacks some parameters"
            info["discriminator"] = {"carried": False, "detail": why}
            report.cannot_carry("discriminator optimizer state", why)
        else:
            disc_reasons = []
            holder_names = {id(p): f"discriminator.{n}" for n, p in disc.named_parameters()}
            for idx, state in enumerate(saved):
                if idx in used:
                    continue
                reason = _check_saved_optimizer(state, disc_names, disc_shapes)
                if reason is None:
                    sd, carried, _ = _carry_into(disc_opt, holder_names, state, disc_names)
                    out["discriminator"] = sd
                    info["discriminator"] = {"carried": True, "source_index": idx,
                                             "detail": f"optimizer_states[{idx}] matched loss.discriminator; "
                                                       f"moments of {carried} parameters carried"}
                    break
                disc_reasons.append(f"optimizer_states[{idx}]: {reason}")
            if "discriminator" not in out:
                why = "no saved optimizer fits the discriminator's parameters: " + \
                      ("; ".join(disc_reasons[:3]) or "the checkpoint has only one optimizer")
                info["discriminator"] = {"carried": False, "detail": why}
                report.cannot_carry("discriminator optimizer state", why + ". Adam moments start fresh")
    hyper = []
    for name, sd in out.items():
        src = saved[info[name]["source_index"]]
        old = {k: v for k, v in src["param_groups"][0].items() if k in ("lr", "betas", "weight_decay")}
        hyper.append(f"{name}: checkpoint {old}")
    if hyper:
        report.train_state["hyperparameters_note"] = (
            "learning rate and betas come from the migrated config, not the checkpoint (" + "; ".join(hyper) + ")")
    lr_sched = ckpt.get("lr_schedulers") if isinstance(ckpt, dict) else None
    if lr_sched:
        report.cannot_carry("lr_schedulers", "this tool uses a constant learning rate (taming's VQGAN does too); "
                            "the saved scheduler state was left out")
    if isinstance(ckpt, dict) and ckpt.get("native_amp_scaling_state"):
        report.cannot_carry("native_amp_scaling_state", "the fp16 loss scale restarts at its default and "
                            "adapts within a few steps")
    report.train_state["optimizers"] = info
    return out


# --------------------------------------------------------------------------------------
# The whole migration.

def _plain_int(value: Any, default: int = 0) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value.item())
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _atomic_dir(out_dir: str, force: bool) -> str:
    """A fresh temporary folder beside ``out_dir`` (renamed over it at the end)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise UserError(f"--out {out_dir} exists and is a file; name a folder")
        if os.listdir(out_dir) and not force:
            raise UserError(f"--out {out_dir} already exists and is not empty; choose a new folder or pass --force "
                            "to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.migrating-", dir=parent)


def _publish(tmp_dir: str, out_dir: str) -> None:
    out_dir = os.path.abspath(out_dir)
    old = None
    if os.path.exists(out_dir):
        old = f"{tmp_dir}.old"
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _save_safetensors(sd: Dict[str, torch.Tensor], path: str) -> None:
    atomic.save_safetensors(sd, path, metadata={"format": "pt", "written_by": "python -m train migrate"})


def migrate(config_path: str, ckpt_path: Optional[str], out_dir: str, force: bool = False) -> Report:
    """Run the migration; returns the report (also written to ``out_dir``)."""
    from omegaconf import OmegaConf

    from adapters import build_model
    from train.safe_load import extract_state_dict, load_checkpoint, strip_prefixes, to_plain

    report = Report(config_path=os.path.abspath(config_path), out_dir=os.path.abspath(out_dir))
    cfg, removed_args = migrate_config(config_path, report)
    if ckpt_path is None and removed_args.get("ckpt_path"):
        ckpt_path = str(removed_args["ckpt_path"])
        report.config["notes"].append(f"checkpoint taken from the config's model_args.ckpt_path: {ckpt_path}")
    ignore_keys = [str(k) for k in (removed_args.get("ignore_keys") or [])]

    tmp_dir = _atomic_dir(out_dir, force)
    try:
        files = []
        if ckpt_path is not None:
            report.checkpoint_path = os.path.abspath(ckpt_path)
            loaded = load_checkpoint(ckpt_path)
            if isinstance(loaded.data, dict) and loaded.data.get("format") == "vqtok-train-state":
                raise UserError(f"{ckpt_path} is already a checkpoint of this tool (python -m train fit); it needs "
                                "no migration: continue it with python -m train fit --resume "
                                f"{ckpt_path}, or export it with python -m train migrate --export")
            sd, notes = extract_state_dict(loaded.data)
            report.checkpoint = {"load_method": loaded.method, "dropped_objects": loaded.dropped_summary(),
                                 "notes": notes}
            if loaded.weights_only_error:
                report.checkpoint["notes"].append(
                    "torch.load(weights_only=True) refused the file (it pickles Lightning/OmegaConf objects); "
                    "read again with those classes as inert placeholders")
            ckpt = loaded.data if isinstance(loaded.data, dict) else {}
            hp = ckpt.get("hyper_parameters")
            if hp is not None:
                report.checkpoint["hyper_parameters"] = to_plain(hp)

            model = build_model(cfg)
            roots = [name for name, _ in model.named_children()] + \
                [name for name, _ in model.named_buffers(recurse=False)] + ["loss", "model_ema"]
            renamed_sd, stripped = strip_prefixes(sd, roots)
            report.weights["prefixes_stripped"] = stripped
            report.weights["renamed"] = [[a, b] for a, b in zip(sd, renamed_sd) if a != b]
            gen, disc_sd = _split_checkpoint(renamed_sd, report, ignore_keys)
            _convert_codebook(model, gen, report)
            source = str(ckpt_path)
            _load_strictly(model, gen, source, allow_missing=ignore_keys)
            model_sd = model.state_dict()
            for key in model_sd:
                if key not in gen:
                    report.weights["missing"].append(
                        {"key": key, "fix": "kept its initial value (listed in ignore_keys)"})
            _save_safetensors(model_sd, os.path.join(tmp_dir, "model.safetensors"))
            files.append("model.safetensors")
            report.weights["generator_tensors"] = len(model_sd)

            disc = None
            if disc_sd:
                disc = _discriminator_from_config(cfg)
                if disc is None:
                    report.drop("loss.discriminator.*", len(disc_sd),
                                f"the {cfg.model_type} loss family has no taming discriminator")
                    disc_sd = {}
                else:
                    holder = _DiscriminatorHolder(disc)
                    _load_strictly(holder, disc_sd, f"{source} (loss.discriminator)")
                    _save_safetensors(holder.state_dict(), os.path.join(tmp_dir, "discriminator.safetensors"))
                    files.append("discriminator.safetensors")
                    report.weights["discriminator_tensors"] = len(disc_sd)
                    report.weights["renamed"].append(["loss.discriminator.*", "discriminator.*"])
            elif _discriminator_from_config(cfg) is not None and bool(cfg.train.use_gan) and \
                    str(cfg.model_variant or "").lower() != "nodisc":
                report.cannot_carry("discriminator weights", "the checkpoint has no loss.discriminator.* entries; "
                                    "the discriminator starts from taming's initialisation")

            step = _plain_int(ckpt.get("global_step"))
            epoch = _plain_int(ckpt.get("epoch"))
            if "global_step" not in ckpt:
                report.cannot_carry("global_step", "the checkpoint does not record it; training restarts at step 0 "
                                    "(disc_start counts from there)")
            report.train_state.update({"global_step": step, "epoch": epoch})
            optimizer_states = carry_optimizers(cfg, ckpt, model, disc, gen, disc_sd, report)
            atomic.save_torch({"global_step": step, "epoch": epoch, "optimizer_states": optimizer_states},
                              os.path.join(tmp_dir, "train_state.pt"))
            files.append("train_state.pt")
        else:
            report.cannot_carry("weights and training state", "no --ckpt given (and no model_args.ckpt_path); only "
                                "the config was migrated, training starts from scratch")

        OmegaConf.save(cfg, os.path.join(tmp_dir, "config.yaml"))
        files.insert(0, "config.yaml")
        report.outputs = files + ["report.md", "report.json"]
        atomic.write_text(os.path.join(tmp_dir, "report.json"),
                          json.dumps(report.as_dict(), indent=2, default=str) + "\n")
        atomic.write_text(os.path.join(tmp_dir, "report.md"), render_markdown(report))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private; the result is a normal folder
        _publish(tmp_dir, out_dir)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return report


# --------------------------------------------------------------------------------------
# Command line.

def _summary(report: Report) -> str:
    lines = [f"migrated {report.config_path} -> {report.out_dir}"]
    fixes = report.config.get("fixes", [])
    if fixes:
        lines.append(f"  config: {len(fixes)} correction(s): " +
                     "; ".join(f"{f['path']} -> {_short(f['after'], 40)}" for f in fixes[:4]))
    if report.checkpoint_path:
        w, ts = report.weights, report.train_state
        lines.append(f"  weights: {w['generator_tensors']} generator + {w['discriminator_tensors']} discriminator "
                     f"tensors; step {ts.get('global_step')}, epoch {ts.get('epoch')}")
        if report.checkpoint.get("dropped_objects"):
            lines.append(f"  not restored from the pickle (no code ran): "
                         f"{len(report.checkpoint['dropped_objects'])} object type(s), see report.md")
    for item in report.not_carried:
        lines.append(f"  not carried: {item['what']}: {item['why']}")
    lines.append(f"  report: {os.path.join(report.out_dir, 'report.md')}")
    lines.append(f"  resume: python -m train fit {os.path.join(report.out_dir, 'config.yaml')} "
                 f"--resume {report.out_dir}")
    return "\n".join(lines)


def cli_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train migrate",
        description="Convert a legacy config (+ checkpoint) into a folder this tool trains from; "
                    "or, with --export, turn a migrated/trained folder back into an upstream taming checkpoint.")
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="legacy JSON, taming YAML or native config")
    parser.add_argument("--ckpt", metavar="FILE", help="Lightning .ckpt, plain state dict or .safetensors")
    parser.add_argument("--out", metavar="PATH", help="output folder (migrate) or .ckpt file (--export)")
    parser.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument("--export", metavar="SRC",
                        help="export SRC (a migrated folder, a run folder or its last.ckpt) to --out as a plain "
                             "{'state_dict': ...} checkpoint with upstream key names (loss.discriminator.* included)")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return 2 if exc.code else 0
    if not args.out:
        print("error: --out is required (a folder for migrate, a .ckpt file for --export)", file=sys.stderr)
        return 2
    if args.export:
        if args.config or args.ckpt:
            print("error: --export takes SRC and --out only (no CONFIG, no --ckpt)", file=sys.stderr)
            return 2
        from train.export import export_checkpoint

        info = export_checkpoint(args.export, args.out, force=args.force)
        print(f"exported {info['tensors']} tensors ({info['discriminator_tensors']} discriminator) at step "
              f"{info['global_step']} to {args.out}")
        return 0
    if not args.config:
        print("error: CONFIG is required: python -m train migrate CONFIG [--ckpt FILE] --out DIR", file=sys.stderr)
        return 2
    report = migrate(args.config, args.ckpt, args.out, force=args.force)
    print(_summary(report))
    return 0
