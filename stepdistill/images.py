"""Images as the toolkit hands them around: uint8 NHWC arrays (what files, grids and metrics take), made from
tensors in [-1, 1] or from pipeline outputs in [0, 1] by one rounding rule, and grids of them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 NHWC, rounding as image files do."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def float_to_uint8(images) -> np.ndarray:
    """Float NHWC in [0, 1] (a diffusers pipeline's ``output_type="np"``) -> uint8 NHWC, rounded and clipped."""
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """uint8 NHWC images -> one uint8 HWC grid image (grayscale is replicated to RGB)."""
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top: top + h, left: left + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> None:
    """Save uint8 NHWC images as a PNG grid (small images are upscaled so they can be seen)."""
    upscale = max(1, 64 // images.shape[1])
    Image.fromarray(make_grid(images, nrow=nrow, upscale=upscale)).save(path)
