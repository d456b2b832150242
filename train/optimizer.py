"""Optimizer construction, in one place for the trainer and ``migrate``.

    from train.optimizer import build_optimizer, get_optimizer
    opt_g = build_optimizer(model, model.generator_parameters(), lr=4.5e-6, weight_decay=0.0,
                            betas=(0.5, 0.9))
    gen_optim = get_optimizer(model.parameters(), lr=1e-4, wd=0.05)

``build_optimizer`` is what ``python -m train fit`` trains each network with, and what
``python -m train migrate`` lays carried Adam moments out for: both call it, so a migrated
optimizer state always has the trainer's parameter groups and order.

* ``weight_decay == 0``: taming's plain Adam, one group, in the order the parameters are
  given (upstream's order, so migrated states line up position by position).
* ``weight_decay > 0``: ``get_optimizer``, AdamW without weight decay where decay does harm.

``get_optimizer``: weight decay is applied to weight matrices and kernels only.  Norm
scales, biases, embeddings (position / class / register tokens, ``nn.Embedding`` tables)
and codebooks are exempt, the rule of BERT / ViT / BEiT v2 recipes: decaying them shrinks
scales and code vectors towards zero.  The split itself is timm's
``timm.optim.param_groups_weight_decay``: it skips frozen parameters, exempts every 1-D
tensor and every ``*.bias``, and exempts the names in its ``no_weight_decay_list`` (fnmatch
patterns; timm's models supply them from ``model.no_weight_decay()``).  What stays ours is
that list -- our models declare no ``no_weight_decay()``, so the names of embeddings and
codebooks are found here -- and the group order (decayed group first).

What can be told apart depends on what ``get_optimizer`` is given:

* an ``nn.Module``: module types (norms, ``nn.Embedding``) and parameter names;
* ``(name, parameter)`` pairs (``model.named_parameters()``): names and shapes;
* bare parameters (``model.parameters()``, as in the DinoVQ reference API): shapes only, so
  1-D tensors (biases, norm scales) are exempt and every matrix is decayed.

A parameter that receives no gradient in a step (``grad`` None) is not touched by AdamW at
all, weight decay included: that is what keeps an optimizer built over
``model.parameters()`` from moving the discriminator (see ``tests/test_seed_loop.py``).
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Set, Tuple, Union

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

# Name fragments of parameters that are embeddings or codebooks (checked on the last
# component of the dotted name, lower-cased).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token",
                  "dist_token", "embedding", "codebook", "embed_avg", "bias")

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
              nn.modules.batchnorm._NormBase, nn.RMSNorm)

Named = List[Tuple[str, torch.nn.Parameter]]


def _no_decay_by_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    if any(fragment in leaf for fragment in NO_DECAY_NAMES):
        return True
    # Weights of modules that are code tables (taming's ``quantize.embedding.weight``).
    return any(part in ("embedding", "embed", "codebook") for part in name.lower().split(".")[:-1])


def _exempt_by_module_type(module: nn.Module) -> Set[str]:
    """Names of parameters owned by norm layers and ``nn.Embedding`` tables."""
    exempt = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, NORM_TYPES) or isinstance(sub, nn.Embedding) or "norm" in type(sub).__name__.lower():
            exempt.update(f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False))
    return exempt


def _named_and_exempt(params) -> Tuple[Named, Set[str]]:
    """``(unique (name, parameter) pairs, names exempt from decay beyond timm's 1-D rule)``."""
    if isinstance(params, nn.Module):
        named = list(params.named_parameters())
        exempt = _exempt_by_module_type(params)
    else:
        named = []
        for i, item in enumerate(params):
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                named.append((item[0], item[1]))
            elif isinstance(item, torch.Tensor):
                named.append((str(i), item))   # no name: a position says nothing to the name rule
            else:
                raise TypeError("get_optimizer: params must be a module, parameters or "
                                f"(name, parameter) pairs; got an item of type {type(item).__name__}")
        exempt = set()
    unique, seen = [], set()
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append((name, p))
    exempt |= {name for name, _ in unique if _no_decay_by_name(name)}
    return unique, exempt


class _NamedParameters:
    """The one method ``param_groups_weight_decay`` reads of its model, over a given list
    (it takes a module; the trainer hands it a subset of one, e.g. generator parameters)."""

    def __init__(self, named: Named):
        self._named = named

    def named_parameters(self):
        return iter(self._named)


def split_decay(params) -> Tuple[List[torch.nn.Parameter], List[torch.nn.Parameter]]:
    """``(decay, no_decay)`` lists of trainable parameters, each parameter once."""
    named, exempt = _named_and_exempt(params)
    # Parameter names never hold fnmatch wildcards, so exact names match only themselves.
    groups = param_groups_weight_decay(_NamedParameters(named), weight_decay=1.0,
                                       no_weight_decay_list=sorted(exempt))
    decay = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    return decay, no_decay


def get_optimizer(params: Union[nn.Module, Iterable], lr: float, wd: float = 0.0,
                  betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``params`` with decay ``wd`` on weights and none on norms, biases,
    embeddings and codebooks (as far as ``params`` lets them be told apart)."""
    decay, no_decay = split_decay(params)
    if not decay and not no_decay:
        raise ValueError("get_optimizer: no trainable parameters given")
    groups = [g for g in ({"params": decay, "weight_decay": float(wd)},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps))


def build_optimizer(module: nn.Module, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    betas: Sequence[float]) -> torch.optim.Optimizer:
    """The optimizer of one network in training: ``params`` (a subset of ``module``'s, in
    the order given) named as in ``module`` so the weight-decay rule sees their names."""
    params = list(params)
    betas = tuple(float(b) for b in betas)
    if weight_decay > 0:
        names = {id(p): n for n, p in module.named_parameters()}
        return get_optimizer([(names.get(id(p), str(i)), p) for i, p in enumerate(params)],
                             lr=lr, wd=weight_decay, betas=betas)
    return torch.optim.Adam(params, lr=float(lr), betas=betas)


__all__ = ["build_optimizer", "get_optimizer", "split_decay", "NO_DECAY_NAMES"]
