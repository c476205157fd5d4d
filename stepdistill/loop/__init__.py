"""The training loop and what it owns: the run folder, checkpoints and exact resume, the data stream, per-phase data
parallelism and sharding, building a method over its setup. Import as ``stepdistill.loop``."""

from __future__ import annotations

from .loop import train
from .setup import build_method, open_dataset

__all__ = ["build_method", "open_dataset", "train"]
