"""The one torchrun launch of the test suite: every distributed check in two gloo processes.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py OUT_DIR

Starting torch twice per check cost the suite minutes, so ``tests/conftest.py`` launches
this once per session (fixture ``torchrun_jobs``) and the tests read what each job left in
``OUT_DIR/<job>/``:

* ``fit-<model type>`` for every registered model type: the real ``python -m train fit``
  code path (``train.fit.run``) on the type's tiny config with the GAN on from step 0,
  3 steps; each rank writes ``rank{r}.pt`` (its model and discriminator tensors, sha256
  digests, its first sample numbers) and ``rank{r}.log`` (what it printed);
* ``codebook_init``: the same with ``train.init_codebook_from_data`` on a 64-code EMAVQ;
* ``optins``: the training opt-ins (k-means start, dead-code restarts, weight EMA, cosine
  schedule) on a plain-VQ TamingVQGAN, 3 steps; ``optins.pt`` holds rank 0's opt-in state;
* ``ema``: the EMA quantizer alone and inside a DDP model, on different data per rank;
* ``vqvae2_codebooks``: vqvae2's two EMA codebooks on different data per rank;
* ``encode``: ``python -m train encode``'s code path on a tiny vqvae2, 5 shards over 2
  ranks; ``rank{r}.json`` holds each rank's report (tests/test_encode_decode.py compares the
  files with one process's);
* ``refused``: rank 0 refused (run folder locked, disk full at a save); ``rank{r}.json``
  holds each rank's outcome;
* ``node_local``: start-up checks that fail on one node only (``--data`` missing on rank 1's,
  or holding other images there; a finished run in rank 0's ``--out``); ``rank{r}.json``
  holds each rank's message.
"""
import contextlib
import hashlib
import json
import os
import pathlib
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# ROOT first: ``tests`` is this folder (tests/__init__.py), not torch-fidelity's package.

import yaml  # noqa: E402

from adapters import registry  # noqa: E402
from train.data import StepBatchSampler  # noqa: E402
from train.fit import run  # noqa: E402


def digest(tensors):
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}


def fit_job(folder: str, config: str, *argv: str) -> None:
    """``python -m train fit CONFIG --out folder/run ...`` on this rank; records its tensors."""
    rank = dist.get_rank()
    with open(os.path.join(folder, f"rank{rank}.log"), "w") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code, trainer = run([config, "--data", "builtin", "--out", os.path.join(folder, "run"), "--no-bar", *argv])
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    if trainer.disc is not None:
        tensors.update({f"discriminator.{k}": v.detach().cpu().clone()
                        for k, v in trainer.disc.module.state_dict().items()})
    sampler = StepBatchSampler(trainer.cfg.train.batch_size, trainer.cfg.train.accumulate_grad_batches,
                               trainer.world, trainer.rank)
    torch.save({"code": code, "world": trainer.world, "step": trainer.step, "tensors": tensors,
                "digest": digest(tensors), "first_samples": next(iter(sampler))},
               os.path.join(folder, f"rank{rank}.pt"))


def fit_every_model_type(out_dir: str) -> None:
    for name in registry.list_model_types():
        folder = os.path.join(out_dir, f"fit-{name}")
        os.makedirs(folder, exist_ok=True)
        config = os.path.join(folder, "tiny.yaml")
        if dist.get_rank() == 0:
            data = registry.get_model_type(name).tiny_config()
            data.setdefault("train", {}).update(use_gan=True, log_every=1, ckpt_every=2, image_every=1000)
            with open(config, "w") as fh:
                yaml.safe_dump(data, fh)
        dist.barrier()
        fit_job(folder, config, "--max-steps", "3")
        dist.barrier()


def codebook_init_job(out_dir: str) -> None:
    from tests.test_fit import tiny_config

    folder = os.path.join(out_dir, "codebook_init")
    os.makedirs(folder, exist_ok=True)
    config = tiny_config(folder, use_gan=False) if dist.get_rank() == 0 else os.path.join(folder, "tiny.json")
    dist.barrier()
    fit_job(folder, config, "--max-steps", "2", "train.init_codebook_from_data=true")
    dist.barrier()


def optins_job(out_dir: str) -> None:
    """k-means start, dead-code restarts every step, weight EMA and a cosine schedule on a
    plain-VQ TamingVQGAN (its codebook a parameter), 3 steps."""
    from tests.test_fit import tiny_config

    folder = os.path.join(out_dir, "optins")
    os.makedirs(folder, exist_ok=True)
    config = tiny_config(folder, variant="VQ", use_gan=False) if dist.get_rank() == 0 else \
        os.path.join(folder, "tiny.json")
    dist.barrier()
    fit_job(folder, config, "--max-steps", "3", "train.init_codebook_kmeans_iters=3", "train.dead_code_threshold=1.0",
            "train.dead_code_every=1", "train.ema_decay=0.9", "train.lr_schedule=cosine", "train.warmup_steps=1")
    if dist.get_rank() == 0:
        state = torch.load(os.path.join(folder, "run", "checkpoints", "last.ckpt"), weights_only=True)
        torch.save({"model_ema": state["model_ema"], "dead_codes": state["dead_codes"]},
                   os.path.join(folder, "optins.pt"))
    dist.barrier()


def ema_job(out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from adapters import build_model
    from tests.dist_ema_worker import make_data, make_quantizer, run_updates
    from train.schema import make_config

    folder = os.path.join(out_dir, "ema")
    os.makedirs(folder, exist_ok=True)
    rank = dist.get_rank()
    data = make_data(rank)
    q = make_quantizer()
    run_updates(q, data)
    ddconfig = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    model = build_model(make_config(model_type="TamingVQGAN", model_variant="EMAVQ",
                                    model_args=dict(ddconfig=ddconfig, n_embed=32, embed_dim=8)))
    # broadcast_buffers=False: only the quantizer's own all-reduce can keep the codebooks equal.
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
    torch.save({"data": data, "quantizer": q.state_dict(), "model_codebook": model.quantize.state_dict()},
               os.path.join(folder, f"rank{rank}.pt"))
    dist.barrier()


def vqvae2_codebooks_job(out_dir: str) -> None:
    from tests.dist_vqvae2_worker import STEPS, TINY, buffers, images, make_model

    folder = os.path.join(out_dir, "vqvae2_codebooks")
    os.makedirs(folder, exist_ok=True)
    rank = dist.get_rank()
    model = make_model()
    local_counts = []
    with torch.no_grad():
        for step in range(STEPS):
            _, _, (id_t, id_b) = model(images(rank, step), return_codes=True)
            local_counts.append(torch.stack([torch.bincount(i.flatten(), minlength=TINY["n_embed"])
                                             for i in (id_t, id_b)]))
    torch.save({"buffers": buffers(model), "local_counts": torch.stack(local_counts)},
               os.path.join(folder, f"rank{rank}.pt"))
    dist.barrier()


ENCODE_ARGS = dict(shard_size=1, batch_size=2)


def encode_job(out_dir: str) -> None:
    from tests.test_encode_decode import tiny_cfg, weights_folder, write_images
    from train.encode import encode

    folder = os.path.join(out_dir, "encode")
    rank = dist.get_rank()
    if rank == 0:
        weights_folder(os.path.join(folder, "model"), tiny_cfg("vqvae2"))
        write_images(os.path.join(folder, "images"))
    dist.barrier()
    report = encode(os.path.join(folder, "model"), os.path.join(folder, "images"), os.path.join(folder, "codes"),
                    quiet=True, **ENCODE_ARGS)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump({k: report[k] for k in ("ranks", "encoded_shards", "kept_shards", "encoded_images")}, fh)
    dist.barrier()


def refused_job(out_dir: str) -> None:
    """Rank 0 refused (its folder locked by another writer; later its disk full at the first
    save): every rank must stop with rank 0's message instead of waiting for it."""
    from unittest import mock

    from tests.test_fit import tiny_config
    from train import atomic
    from train.errors import UserError
    from train.run_folder import open_run_folder

    folder = os.path.join(out_dir, "refused")
    os.makedirs(folder, exist_ok=True)
    rank = dist.get_rank()
    config = tiny_config(folder, use_gan=False, ckpt_every=1) if rank == 0 else os.path.join(folder, "tiny.json")
    dist.barrier()
    outcome = {}
    held = open_run_folder(os.path.join(folder, "locked"), is_main=rank == 0)     # a collective
    dist.barrier()
    def full(obj, path):
        # Not torch.save itself: the object collectives serialize through it.
        with atomic.replacing(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")

    for case, out in (("locked", "locked"), ("disk_full", "full")):
        with mock.patch("train.atomic.save_torch", full) if rank == 0 and case == "disk_full" else \
                contextlib.nullcontext():
            try:
                outcome[case] = run([config, "--out", os.path.join(folder, out), "--max-steps", "2", "--no-bar"])[0]
            except UserError as exc:
                outcome[case] = str(exc)
    held.release()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump(outcome, fh)
    dist.barrier()


def node_local_job(out_dir: str) -> None:
    """What each node sees differs (its own disk): the ranks must still stop together."""
    from tests.test_fit import tiny_config
    from train.errors import UserError

    folder = os.path.join(out_dir, "node_local")
    os.makedirs(folder, exist_ok=True)
    rank = dist.get_rank()
    config = tiny_config(folder, use_gan=False) if rank == 0 else os.path.join(folder, "tiny.json")
    if rank == 0:
        from tests.test_data import write_images

        write_images(pathlib.Path(folder, "images0"), 2)
        write_images(pathlib.Path(folder, "images1"), 3)
        os.makedirs(os.path.join(folder, "has_run", "checkpoints"))
        with open(os.path.join(folder, "has_run", "checkpoints", "last.ckpt"), "wb") as fh:
            fh.write(b"a finished run")
    dist.barrier()
    cases = {"data": ["--data", os.path.join(folder, "images0" if rank == 0 else "missing"),
                      "--out", os.path.join(folder, "run")],
             "other_data": ["--data", os.path.join(folder, f"images{rank}"), "--out", os.path.join(folder, "run")],
             "out": ["--out", os.path.join(folder, "has_run" if rank == 0 else "empty")]}
    outcome = {}
    for case, argv in cases.items():
        try:
            outcome[case] = run([config, "--max-steps", "1", "--no-bar", *argv])[0]
        except UserError as exc:
            outcome[case] = str(exc)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump(outcome, fh)
    dist.barrier()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    done = {}
    for job in (ema_job, vqvae2_codebooks_job, fit_every_model_type, codebook_init_job, optins_job, encode_job,
                refused_job, node_local_job):
        job(out_dir)
        done[job.__name__] = True
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "done.json"), "w") as fh:
            json.dump(done, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
