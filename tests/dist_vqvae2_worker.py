"""Model and data of the vqvae2 codebook job of tests/dist_worker.py (and of its
single-process reference in tests/test_vqvae2.py): every rank builds the same tiny model
(same seed) and runs a few training-mode forwards on its *own* images."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adapters.vqvae2 import VQVAE2  # noqa: E402

TINY = dict(channel=8, n_res_block=1, n_res_channel=4, embed_dim=4, n_embed=16)
STEPS = 3
BATCH = 2


def images(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    # Different brightness per rank so the ranks' code statistics really differ.
    return (torch.rand(BATCH, 3, 16, 16, generator=g) * 2 - 1) * (0.3 + 0.7 * rank)


def make_model() -> VQVAE2:
    torch.manual_seed(0)
    model = VQVAE2(**TINY).eval()
    # Seed both codebooks with features of a shared batch (as k-means-style inits do), so
    # codes are spread over the data instead of all vectors picking the same random code.
    feats = {}
    hooks = [q.register_forward_pre_hook(lambda mod, args, name=name: feats.__setitem__(name, args[0]))
             for name, q in (("t", model.quantize_t), ("b", model.quantize_b))]
    with torch.no_grad():
        model(torch.cat([images(r, 99) for r in range(2)]))
        for name, q in (("t", model.quantize_t), ("b", model.quantize_b)):
            flat = feats[name].reshape(-1, q.dim)
            pick = flat[torch.randperm(flat.shape[0])[: q.n_embed]].t()
            q.embed.copy_(pick)
            q.embed_avg.copy_(pick)
    for h in hooks:
        h.remove()
    return model.train()


def buffers(model: VQVAE2):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("quantize_t.", "quantize_b."))}
