"""``python -m train fit`` under torchrun: two real CPU processes (gloo) train every model
type's tiny config with the GAN on (the suite's one launch, ``tests/dist_worker.py``);
weights, discriminator and EMA codebooks must end up identical on both ranks, and only rank
0 writes the run folder."""
import json
import os

import pytest
import torch

from adapters import registry


def ranks(folder):
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def output(folder):
    return "".join((folder / f"rank{r}.log").read_text() for r in (0, 1))


@pytest.mark.parametrize("name", registry.list_model_types())
def test_every_model_type_keeps_ranks_identical(torchrun_jobs, name):
    folder = torchrun_jobs / f"fit-{name}"
    r0, r1 = ranks(folder)
    assert r0["code"] == r1["code"] == 0
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
    # The ranks read different images ...
    assert set(r0["first_samples"]).isdisjoint(r1["first_samples"])
    # ... and still hold bit-identical weights, discriminator and EMA codebooks.
    assert any(k.startswith("discriminator.") for k in r0["digest"])
    assert [k for k in r0["digest"] if r0["digest"][k] != r1["digest"][k]] == []
    verdict = json.loads((folder / "run" / "ranks_in_sync.json").read_text())
    assert verdict["in_sync"] and verdict["world_size"] == 2
    if registry.get_model_type(name).ema_codebook(registry.get_model_type(name).tiny_config().get("model_variant")):
        # The EMA codebooks really were updated (counts moved away from their start).
        moved = [k for k in r0["tensors"] if "cluster_size" in k]
        assert moved and all(float(r0["tensors"][k].sum()) > 0 for k in moved)


def test_taming_run_folder_is_written_by_rank_0_only(torchrun_jobs):
    folder = torchrun_jobs / "fit-TamingVQGAN"
    r0, _ = ranks(folder)
    ema = [k for k in r0["digest"] if k.startswith("model.quantize.embedding.")]
    assert sorted(ema) == ["model.quantize.embedding.cluster_size", "model.quantize.embedding.embed_avg",
                           "model.quantize.embedding.weight"]
    assert float(r0["tensors"]["model.quantize.embedding.cluster_size"].sum()) > 0
    run_dir = folder / "run"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "step-2.ckpt").is_file()
    assert len(os.listdir(run_dir / "tb")) == 1
    printed = output(folder)
    assert printed.count("run folder:") == 1
    assert "learning rate" in printed

    # Each rank's own random state is in the checkpoint, so a 2-process resume continues
    # both streams (they differ: every rank was seeded with its rank).
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    per_rank = state["rng_per_rank"]
    assert len(per_rank) == 2
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])
    assert torch.equal(per_rank[0]["torch"], state["rng"]["torch"])
