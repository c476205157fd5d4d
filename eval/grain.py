"""``grain``: how much of a digits16 sample lies off the space real digits16 images live in.

Every real digits16 image is an 8x8 scikit-learn digit upsampled bilinearly to 16x16 (``stepdistill.data``), so the
real images span only a 64-dimensional linear subspace of the 256 pixel values. A generated sample's component
outside that subspace is fine high-frequency texture that no real digit has: the "grain" of one-step students. The
metric is its root mean square over all pixels and samples, in the [-1, 1] pixel units of training. Its floor is
uint8 rounding: a sample exactly on the subspace scores about 2.0e-3 once rounded to uint8 (real digits16 score
1.2e-3 only because their 17 gray levels round more coarsely); a sample that overshoots [-1, 1] and is clipped by the
uint8 rendering counts the clipping as grain. It needs no reference and no network and costs nothing; the Inception
features punish this grain (FID), while the digits classifier's features (fd_digits) barely see it, so it explains
a FID gap that fd_digits does not show.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from stepdistill.data import DIGITS16_SIZE
from stepdistill.errors import UserError

from .inception import check_uint8_nhwc


@lru_cache(maxsize=1)
def _off_subspace_projector() -> np.ndarray:
    """I - P, with P the orthogonal projector (256 x 256) onto the span of bilinearly upsampled 8x8 images."""
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    # The same upsampling as stepdistill.data builds digits16 with (each basis image's 16x16 rendering).
    up = F.interpolate(basis, size=(DIGITS16_SIZE, DIGITS16_SIZE), mode="bilinear", align_corners=False)
    u = up.reshape(64, -1).T  # (256, 64)
    p = u @ torch.linalg.pinv(u)
    off = (torch.eye(p.shape[0], dtype=torch.float64) - p).numpy()
    off.setflags(write=False)  # cached: shared by every call
    return off


def _check(images_uint8: np.ndarray, what: str) -> np.ndarray:
    images_uint8 = check_uint8_nhwc(images_uint8, "samples")
    if images_uint8.shape[1:3] != (16, 16):
        raise UserError(f"{what} is defined for 16x16 digits16 samples, got shape {images_uint8.shape}; "
                        f"drop it for other data")
    return images_uint8


def degrain(images_uint8: np.ndarray) -> np.ndarray:
    """The samples with their off-subspace part removed (projected onto the digits16 subspace, RGB averaged to gray,
    rounded back to uint8 with the input's channel count). A diagnostic, not a sampler setting: evaluating these
    says how much of a FID gap is grain (``stepdistill eval --degrain``)."""
    images_uint8 = _check(images_uint8, "--degrain")
    n, h, w, ch = images_uint8.shape
    x = images_uint8.astype(np.float64).mean(axis=3).reshape(n, -1) / 127.5 - 1.0
    on = x - x @ _off_subspace_projector().T
    out = np.clip(np.round((on + 1.0) * 127.5), 0, 255).astype(np.uint8).reshape(n, h, w, 1)
    return np.repeat(out, ch, axis=3)


def grain(images_uint8: np.ndarray) -> float:
    """RMS of the off-digits16-subspace part of uint8 NHWC 16x16 samples (RGB averaged to gray), in [-1, 1] units."""
    images_uint8 = _check(images_uint8, "metric 'grain'")
    x = images_uint8.astype(np.float64).mean(axis=3).reshape(len(images_uint8), -1) / 127.5 - 1.0
    off = x @ _off_subspace_projector().T
    return float(np.sqrt(np.mean(off ** 2)))
