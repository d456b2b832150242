"""torchrun worker for tests/test_ema_quantizer.py: EMA codebooks under 2-process DDP (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_ema_worker.py OUT_DIR

Each rank quantizes its own batches (different data per rank), then trains a tiny EMAVQ
model wrapped in DDP with ``broadcast_buffers=False`` -- so only the quantizer's own
all-reduce can keep the codebooks equal -- and writes ``OUT_DIR/rank{r}.pt``.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from adapters.ema_quantizer import EMAVectorQuantizer  # noqa: E402

N_EMBED, DIM = 16, 4


def make_quantizer() -> EMAVectorQuantizer:
    torch.manual_seed(0)  # the same initial codebook everywhere
    return EMAVectorQuantizer(N_EMBED, DIM, decay=0.8).train()


def make_data(rank: int, steps: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    # rank-dependent offset: the ranks' data distributions really differ
    return torch.randn(steps, 3, DIM, 4, 4, generator=gen) + 2.0 * rank


def run_updates(q: EMAVectorQuantizer, batches) -> None:
    for z in batches:
        q(z)


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from adapters import build_model
    from train.schema import make_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    data = make_data(rank)
    q = make_quantizer()
    run_updates(q, data)

    ddconfig = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    model = build_model(make_config(model_type="TamingVQGAN", model_variant="EMAVQ",
                                    model_args=dict(ddconfig=ddconfig, n_embed=32, embed_dim=8)))
    ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.Adam(model.generator_parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(7 + rank)
    for _ in range(2):
        x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1 + 0.5 * rank
        xrec, qloss = ddp(x)
        loss = (x - xrec).abs().mean() + qloss
        opt.zero_grad()
        loss.backward()
        opt.step()

    torch.save({"data": data, "quantizer": q.state_dict(),
                "model_codebook": model.quantize.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
