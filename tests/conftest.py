"""Shared test set-up: tiny models, one CPU thread, repo root on sys.path."""
import os
import signal
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# ROOT first: ``tests`` is this folder (tests/__init__.py), not torch-fidelity's package.

torch.set_num_threads(1)


@pytest.fixture
def tiny_ddconfig():
    """A taming ddconfig small enough for CPU tests (32 px in, 8x8 latent).

    ch is 32 because taming's GroupNorm uses 32 groups: every width must be a multiple of 32.
    """
    return dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def import_upstream_vqgan():
    """The real ``taming.models.vqgan`` module, for comparisons in tests only.

    ``taming.main`` (imported by it) needs ``pytorch_lightning.utilities.distributed``, gone in
    pytorch_lightning 2.x; a shim module providing ``rank_zero_only`` makes it importable.
    Library code never does this: it uses ``taming.modules`` only.
    """
    import pytorch_lightning.utilities as plu

    if "pytorch_lightning.utilities.distributed" not in sys.modules:
        shim = types.ModuleType("pytorch_lightning.utilities.distributed")
        shim.rank_zero_only = plu.rank_zero_only
        sys.modules["pytorch_lightning.utilities.distributed"] = shim
    import taming.models.vqgan as vqgan

    return vqgan


@pytest.fixture(scope="session")
def upstream_vqgan():
    return import_upstream_vqgan()


@pytest.fixture(scope="session")
def torchrun_jobs(tmp_path_factory):
    """The suite's one torchrun launch (2 gloo processes, ``tests/dist_worker.py``): every
    distributed check runs in it; tests read ``<folder>/<job>/`` (see the worker)."""
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    # --standalone: torchrun picks a free port itself (parallel test runs do not collide).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "dist_worker.py"), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both workers
        output, _ = proc.communicate()
        pytest.fail("the torchrun jobs timed out:\n" + output[-4000:])
    if proc.returncode != 0:
        pytest.fail("the torchrun jobs failed:\n" + output[-6000:])
    return out
