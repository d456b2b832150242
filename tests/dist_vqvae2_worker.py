"""Worker for the 2-process vqvae2 tests (tests/test_vqvae2.py starts it with torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_vqvae2_worker.py OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_vqvae2_worker.py \
        fit OUT_DIR CONFIG [fit arguments ...]

Codebook mode: every rank builds the same tiny model (same seed), runs a few training-mode forwards on
its *own* images, and writes its codebook buffers plus what its local-only statistics
would have been to OUT_DIR/rank{r}.pt.  Rank 0 also writes the single-process result of
the same steps on the concatenation of both ranks' images (reference.pt).

Fit mode: every rank runs the real ``python -m train fit`` code path (``train.fit.run``)
and saves its model and discriminator tensors to OUT_DIR/fit_rank{r}.pt.
"""
import os
import sys

import torch
import torch.distributed as dist

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


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    local_counts = []
    with torch.no_grad():
        for step in range(STEPS):
            x = images(rank, step)
            _, _, (id_t, id_b) = model(x, return_codes=True)
            local_counts.append(torch.stack([torch.bincount(i.flatten(), minlength=TINY["n_embed"])
                                             for i in (id_t, id_b)]))
    torch.save({"buffers": buffers(model), "local_counts": torch.stack(local_counts)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        # Single process, full batch: what the all-reduced update must equal.
        ref = make_model()
        with torch.no_grad():
            for step in range(STEPS):
                ref(torch.cat([images(r, step) for r in range(world)]))
        torch.save({"buffers": buffers(ref)}, os.path.join(out_dir, "reference.pt"))


def fit_main() -> int:
    from train.fit import run

    out_dir, argv = sys.argv[2], sys.argv[3:]
    code, trainer = run(argv)
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    if trainer.disc is not None:
        tensors.update({f"discriminator.{k}": v.detach().cpu().clone()
                        for k, v in trainer.disc.module.state_dict().items()})
    torch.save({"tensors": tensors, "step": trainer.step, "world": trainer.world, "code": code},
               os.path.join(out_dir, f"fit_rank{int(os.environ.get('RANK', '0'))}.pt"))
    return code


if __name__ == "__main__":
    if sys.argv[1] == "fit":
        sys.exit(fit_main())
    main()
