"""Worker for the 2-process ``fit`` test (tests/test_distributed.py starts it with torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_fit_worker.py \
        OUT_DIR CONFIG [fit arguments ...]

Runs the real ``python -m train fit`` code path (``train.fit.run``) on every rank, then
each rank writes the sha256 of every tensor of its own model and discriminator to
OUT_DIR/rank{r}.json, plus the sample numbers of its first micro-batch, so the test can
compare ranks independently of the trainer's own ``ranks_in_sync.json`` verdict.
"""
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.fit import run  # noqa: E402


def digest(tensors):
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}


def main() -> int:
    out_dir, argv = sys.argv[1], sys.argv[2:]
    code, trainer = run(argv)
    rank = int(os.environ.get("RANK", "0"))
    tensors = dict(trainer.model.state_dict())
    if trainer.disc is not None:
        tensors.update({f"discriminator.{k}": v for k, v in trainer.disc.module.state_dict().items()})
    from train.data import StepBatchSampler

    sampler = StepBatchSampler(trainer.cfg.train.batch_size, trainer.cfg.train.accumulate_grad_batches,
                               trainer.world, trainer.rank)
    record = {"rank": rank, "world": trainer.world, "exit_code": code, "step": trainer.step,
              "digest": digest(tensors), "first_samples": next(iter(sampler)),
              "cluster_size_sum": float(trainer.model.state_dict()["quantize.embedding.cluster_size"].sum())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)
    return code


if __name__ == "__main__":
    sys.exit(main())
