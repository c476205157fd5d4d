"""Small shared helpers: image grids, output folders, seeds."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from .errors import UserError


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
    from PIL import Image

    upscale = max(1, 64 // images.shape[1])
    Image.fromarray(make_grid(images, nrow=nrow, upscale=upscale)).save(path)


def replace_dir(final: str | Path, write) -> Path:
    """Write a folder through ``write(folder)`` beside ``final``, then swap it in: a process killed at any moment
    leaves the previous ``final`` whole (between the two renames, as ``.old-NAME``, which the next call restores).

    ``write`` gets a folder with ``final``'s own name (inside a ``.tmp-NAME`` staging folder), so files that quote
    their folder's name (model cards) name the final one.
    """
    import os

    final = Path(final)
    staging, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
    if old.exists() and not final.exists():  # killed between the renames last time: the old folder is whole
        os.rename(old, final)
    for stale in (staging, old):
        if stale.exists():
            shutil.rmtree(stale)
    target = staging / final.name
    target.mkdir(parents=True)
    write(target)
    if final.exists():
        os.rename(final, old)
    os.rename(target, final)
    shutil.rmtree(staging)
    if old.exists():
        shutil.rmtree(old)
    return final


def check_out_dir(path: str | Path, overwrite: bool) -> None:
    """Raise UserError unless :func:`prepare_out_dir` may use ``path`` (read-only: call it before long work)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output path '{p}' exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise UserError(f"output folder '{p}' already exists and is not empty; pass --overwrite to replace it "
                        "or choose another --out")


def prepare_out_dir(path: str | Path, overwrite: bool) -> Path:
    """An empty output folder: an existing non-empty one is an error unless ``overwrite`` (then it is emptied)."""
    check_out_dir(path, overwrite)
    p = Path(path)
    if p.is_dir() and any(p.iterdir()):
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p
