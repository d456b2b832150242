"""Shared test set-up: tiny models, one CPU thread, repo root on sys.path."""
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
