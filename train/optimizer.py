"""``get_optimizer(params, lr, wd)``: AdamW without weight decay where decay does harm.

Weight decay is applied to weight matrices and kernels only.  Norm scales, biases,
embeddings (position / class / register tokens, ``nn.Embedding`` tables) and codebooks are
exempt, the rule of BERT / ViT / BEiT v2 training recipes (and timm's
``param_groups_weight_decay``): decaying them shrinks scales and code vectors towards zero.

What it can tell apart depends on what it is given:

* an ``nn.Module``: module types (norms, ``nn.Embedding``) and parameter names;
* ``(name, parameter)`` pairs (``model.named_parameters()``): names and shapes;
* bare parameters (``model.parameters()``, as in seed 000): shapes only, so 1-D tensors
  (biases, norm scales) are exempt and every matrix is decayed.

Frozen parameters (``requires_grad`` false when the optimizer is built, e.g. LPIPS) are left
out.  A parameter that receives no gradient in a step (``grad`` None) is not touched by
AdamW at all, weight decay included: that is what keeps the seed's generator optimizer,
built over ``model.parameters()``, from moving the discriminator (see
``tests/test_seed_loop.py``).

    from train.optimizer import get_optimizer
    gen_optim = get_optimizer(model.parameters(), lr=1e-4, wd=0.05)
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn

# Name fragments of parameters that are embeddings or codebooks (checked on the last
# component of the dotted name, lower-cased).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token",
                  "dist_token", "embedding", "codebook", "embed_avg", "bias")

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
              nn.modules.batchnorm._NormBase, nn.RMSNorm)


def _no_decay_by_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    if any(fragment in leaf for fragment in NO_DECAY_NAMES):
        return True
    # Weights of modules that are code tables (taming's ``quantize.embedding.weight``).
    return any(part in ("embedding", "embed", "codebook") for part in name.lower().split(".")[:-1])


def _named_from_module(module: nn.Module) -> List[Tuple[str, torch.nn.Parameter, bool]]:
    exempt_ids = set()
    for sub in module.modules():
        if isinstance(sub, NORM_TYPES) or isinstance(sub, nn.Embedding) or "norm" in type(sub).__name__.lower():
            exempt_ids.update(id(p) for p in sub.parameters(recurse=False))
    return [(name, p, id(p) in exempt_ids or p.ndim <= 1 or _no_decay_by_name(name))
            for name, p in module.named_parameters()]


def split_decay(params) -> Tuple[List[torch.nn.Parameter], List[torch.nn.Parameter]]:
    """``(decay, no_decay)`` lists of trainable parameters, each parameter once."""
    if isinstance(params, nn.Module):
        items = _named_from_module(params)
    else:
        items = []
        for i, item in enumerate(params):
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                name, p = item
                items.append((name, p, p.ndim <= 1 or _no_decay_by_name(name)))
            elif isinstance(item, torch.Tensor):
                items.append((str(i), item, item.ndim <= 1))
            else:
                raise TypeError("get_optimizer: params must be a module, parameters or "
                                f"(name, parameter) pairs; got an item of type {type(item).__name__}")
    decay, no_decay, seen = [], [], set()
    for _, p, exempt in items:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if exempt else decay).append(p)
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
