"""Seeds: a seed derived as a pure function of integer keys (rank, step, trajectory index, ...), and seeding every
global random number generator at once."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (non-negative ints), well mixed by numpy's SeedSequence."""
    lo, hi = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(hi) << 32 | int(lo)) & ((1 << 63) - 1))


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and python's global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)
