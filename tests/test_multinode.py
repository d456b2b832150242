"""``python -m train fit`` across nodes, with real processes on one machine.

* Two torchrun agents (``--nnodes 2``, node ranks 0 and 1, c10d rendezvous on 127.0.0.1),
  one worker each, gloo on CPU.  Each agent runs in its own working folder, standing in for
  its node's local disk: relative paths (the default ``logs/<timestamp>_<name>`` run
  folder) land on the node that resolves them, so a second node acting as main, or
  deciding its own run folder name, leaves files where none may be.
* The same run continued by two processes started the way ``srun`` starts them (only
  ``SLURM_*`` variables, no torchrun): ``train/launch.py`` maps them to torch's names.
* Start-up checks that fail on one node only (its own ``--data``, rank 0's run folder)
  stop every rank with one message (in the suite's torchrun launch, ``tests/dist_worker.py``).
* The launch arithmetic itself: SLURM host lists and ports, ``LOCAL_RANK`` picks the GPU.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from tests.test_fit import tiny_config
from train.errors import UserError
from train.launch import cuda_index, first_host, slurm_variables
from train.rank_sync import combined_digest, state_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables of an outer launcher (a test run under torchrun or srun) must not leak in.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def free_port(candidates=None) -> int:
    for port in candidates or [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


def run_nodes(commands, timeout=240):
    """Start one process per (argv, cwd, env); wait for all; (exit code, output) per node."""
    procs = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for argv, cwd, env in commands]
    results = []
    try:
        for p in procs:
            results.append((p.wait(timeout=timeout), p.stdout.read()))
    except subprocess.TimeoutExpired:
        pytest.fail("multi-node processes timed out")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.stdout.close()
    return results


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


def checkpoint_digest(path) -> str:
    """What check_ranks_in_sync hashes (model + discriminator), from the saved checkpoint."""
    state = torch.load(path, weights_only=True)
    return combined_digest(state_digest({**state["model"], **state["loss"]}))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """3 steps on two torchrun agents; no --out, so each node would name its own run folder."""
    base = tmp_path_factory.mktemp("multinode")
    config = tiny_config(base, use_gan=True, ckpt_every=2, image_every=1000)
    nodes = [base / "node0", base / "node1"]
    for n in nodes:
        n.mkdir()
    port = free_port()
    commands = [([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                  "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                  "--rdzv-id", "multinode-test", "-m", "train", "fit", config, "--data", "builtin",
                  "--max-steps", "3", "--no-bar"], str(n), clean_env())
                for i, n in enumerate(nodes)]
    return base, nodes, run_nodes(commands)


def the_run_folder(nodes):
    """The one node holding files, and its one run folder (the other node must hold none)."""
    holding = [n for n in nodes if os.listdir(n)]
    assert len(holding) == 1, {str(n): files_under(n) for n in nodes}
    runs = os.listdir(holding[0] / "logs")
    assert len(runs) == 1 and runs[0].endswith("_tiny"), runs
    return holding[0] / "logs" / runs[0]


def test_two_torchrun_agents_end_with_identical_weights_and_codebooks(two_nodes):
    _, nodes, results = two_nodes
    assert [code for code, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out in results)
    # Only global rank 0 wrote: one run folder, under one node's working folder, named once
    # for both nodes (rank 0's timestamp), and printed by one process.
    run_dir = the_run_folder(nodes)
    printed = "".join(out for _, out in results)
    assert printed.count("run folder:") == 1 and printed.count("done: step 3") == 1
    assert "2 process(es)" in printed

    verdict = json.loads((run_dir / "ranks_in_sync.json").read_text())
    assert verdict["in_sync"] and verdict["world_size"] == 2 and verdict["step"] == 3
    # Node 1's process is RANK 1 with LOCAL_RANK 0 (its node's first, so its GPU 0) ...
    assert [(r["rank"], r["local_rank"]) for r in verdict["ranks"]] == [(0, 0), (1, 0)]
    # ... and each node's own final state (weights, discriminator, EMA codebooks) is the
    # state saved in the checkpoint.
    saved = checkpoint_digest(run_dir / "checkpoints" / "last.ckpt")
    assert [r["state_sha256"] for r in verdict["ranks"]] == [saved, saved]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert float(state["model"]["quantize.embedding.cluster_size"].sum()) > 0   # the codebook was trained
    assert any(k.startswith("discriminator.") for k in state["loss"])


def test_srun_tasks_continue_the_two_node_run(two_nodes):
    """Two tasks as srun starts them (SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS, the
    port derived from SLURM_JOB_ID) resume the torchrun run from its shared run folder."""
    base, nodes, results = two_nodes
    assert [code for code, _ in results] == [0, 0]
    run_dir = the_run_folder(nodes)
    port = free_port(range(15000 + 4321, 25000, 997))
    job_id = str(port - 15000 + 770000)           # 15000 + its last four digits = port
    commands = [([sys.executable, "-m", "train", "fit", "--resume", str(run_dir), "--max-steps", "5", "--no-bar"],
                 str(n), clean_env(SLURM_JOB_ID=job_id, SLURM_PROCID=str(i), SLURM_LOCALID="0",
                                   SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="127.0.0.1"))
                for i, n in enumerate(nodes)]
    results = run_nodes(commands)
    assert [code for code, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out in results)
    printed = results[0][1]
    assert "resumed from" in printed and "2 process(es)" in printed and "done: step 5" in printed
    # The same process count: every rank continues its own random stream, exactly.
    assert "not on exactly the batches" not in printed
    assert "run folder:" not in results[1][1]

    assert the_run_folder(nodes) == run_dir
    verdict = json.loads((run_dir / "ranks_in_sync.json").read_text())
    assert verdict["in_sync"] and verdict["step"] == 5
    assert [(r["rank"], r["local_rank"]) for r in verdict["ranks"]] == [(0, 0), (1, 0)]
    saved = checkpoint_digest(run_dir / "checkpoints" / "last.ckpt")
    assert [r["state_sha256"] for r in verdict["ranks"]] == [saved, saved]


def test_a_start_up_check_failing_on_one_node_stops_every_rank(torchrun_jobs):
    """Run in the suite's torchrun launch (``node_local`` job): each rank's outcome."""
    folder = torchrun_jobs / "node_local"
    outcomes = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    # --data that exists on rank 0's node only: rank 1 names its problem, rank 0 names rank 1.
    data0, data1 = (o["data"] for o in outcomes)
    assert data1.startswith("--data ") and "no such file or folder" in data1
    assert data0.startswith("rank 1 (on ") and data0.endswith(data1)
    # Other images on rank 1's node (3 files where rank 0 has 2): the same message on both.
    assert outcomes[0]["other_data"] == outcomes[1]["other_data"]
    assert "the ranks read different images" in outcomes[0]["other_data"]
    assert ": 2 files; rank 1 on " in outcomes[0]["other_data"] and ": 3)" in outcomes[0]["other_data"]
    assert not (folder / "run").exists()
    # A run folder that already holds a run on rank 0's node: rank 0 decides for everyone.
    assert outcomes[0]["out"] == outcomes[1]["out"] and "already holds a run" in outcomes[0]["out"]
    assert not (folder / "empty").exists()      # rank 1's own --out was never used


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("a[1-3]", "a1"), ("gpu[007-010,12],cpu3", "gpu007"), ("x,y[1-2]", "x"),
    ("rack[2-3]-n[08,10]", "rack2-n08"), ("10.0.0.5", "10.0.0.5"),
])
def test_first_host_of_a_slurm_host_list(nodelist, first):
    assert first_host(nodelist) == first


def test_slurm_variables_map_srun_tasks_only():
    step = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_JOB_ID": "4123456"}
    assert slurm_variables(step) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                     "MASTER_ADDR": "gpu007", "MASTER_PORT": str(15000 + 3456)}
    # Given addresses win; torchrun's variables win (srun starting one torchrun per node).
    assert slurm_variables({**step, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}) == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert slurm_variables({**step, "WORLD_SIZE": "2", "RANK": "0"}) == {}
    # The sbatch script's own shell (no step) and a one-task step are single processes.
    assert slurm_variables({k: v for k, v in step.items() if k != "SLURM_STEP_NUM_TASKS"}) == {}
    assert slurm_variables({**step, "SLURM_STEP_NUM_TASKS": "1"}) == {}
    with pytest.raises(UserError, match="MASTER_ADDR"):
        slurm_variables({k: v for k, v in step.items() if k != "SLURM_STEP_NODELIST"})


def test_local_rank_not_rank_picks_the_gpu():
    assert cuda_index({"RANK": "9", "LOCAL_RANK": "1"}, 8) == 1
    assert cuda_index({"RANK": "8", "LOCAL_RANK": "0"}, 8) == 0
    assert cuda_index({"LOCAL_RANK": "3"}, 1) == 0          # the launcher gave each process one GPU
    with pytest.raises(UserError, match="LOCAL_RANK 5 but this node shows 4 GPU"):
        cuda_index({"LOCAL_RANK": "5"}, 4)
