"""Output folders: checked before long work, written beside and swapped in so a kill never leaves half a folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def replace_dir(final: str | Path, write) -> Path:
    """Write a folder through ``write(folder)`` beside ``final``, then swap it in: a process killed at any moment
    leaves the previous ``final`` whole (between the two renames, as ``.old-NAME``, which the next call restores).

    ``write`` gets a folder with ``final``'s own name (inside a ``.tmp-NAME`` staging folder), so files that quote
    their folder's name (model cards) name the final one.
    """
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
    blocked = next((a for a in p.absolute().parents if a.exists() and not a.is_dir()), None)
    if blocked is not None:
        raise UserError(f"output folder '{p}' cannot be created: '{blocked}' is a file")
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
