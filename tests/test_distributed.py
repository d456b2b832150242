"""``torchrun --nproc_per_node=2 -m train fit``: two real CPU processes (gloo) train a tiny
TamingVQGAN EMAVQ with the GAN on; weights, discriminator and EMA codebooks must end up
identical on both ranks, and only rank 0 writes the run folder."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.test_fit import tiny_config  # noqa: F401 - shared config writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_ranks_stay_identical(tmp_path):
    config = tiny_config(tmp_path, use_gan=True, disc_start=0)
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "dist_fit_worker.py"), str(tmp_path), str(config),
           "--data", "builtin", "--out", str(run_dir), "--max-steps", "3", "--no-bar",
           "train.log_every=1", "train.ckpt_every=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both workers
        output, _ = proc.communicate()
        pytest.fail("torchrun fit timed out:\n" + output[-3000:])
    assert proc.returncode == 0, output[-4000:]

    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
    # The ranks read different images ...
    assert set(r0["first_samples"]).isdisjoint(r1["first_samples"])
    # ... and still hold bit-identical weights, discriminator and EMA codebooks.
    ema = [k for k in r0["digest"] if k.startswith("quantize.embedding.")]
    assert sorted(ema) == ["quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
                           "quantize.embedding.weight"]
    assert any(k.startswith("discriminator.") for k in r0["digest"])
    differing = [k for k in r0["digest"] if r0["digest"][k] != r1["digest"][k]]
    assert differing == []
    assert r0["cluster_size_sum"] > 0          # the EMA codebook really was updated

    # The trainer's own cross-rank check agrees, and only rank 0 wrote files.
    verdict = json.loads((run_dir / "ranks_in_sync.json").read_text())
    assert verdict["in_sync"] and verdict["world_size"] == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "step-2.ckpt").is_file()
    assert len(os.listdir(run_dir / "tb")) == 1
    assert output.count("run folder:") == 1
    assert "learning rate" in output

    # Each rank's own random state is in the checkpoint, so a 2-process resume continues
    # both streams (they differ: every rank was seeded with its rank).
    import torch
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    per_rank = state["rng_per_rank"]
    assert len(per_rank) == 2
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])
    assert torch.equal(per_rank[0]["torch"], state["rng"]["torch"])
