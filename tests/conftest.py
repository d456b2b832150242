"""Shared test set-up: tiny models, one CPU thread, repo root on sys.path."""
import os
import sys

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
