"""The model families, one file each; :func:`family_of` picks the one a loaded pipeline belongs to."""

from __future__ import annotations

from typing import Any

from stepdistill.errors import ConfigError

from .base import Family, LatentFamily
from .class_conditional import ClassFamily, UnconditionalFamily
from .flux import FluxFamily
from .sd import SDFamily
from .sd3 import SD3Family
from .sdxl import SDXLFamily

# The families in the order they are tried (the more specific first). A new family: its file and one entry here.
FAMILIES: tuple[type[Family], ...] = (ClassFamily, UnconditionalFamily, SDXLFamily, SDFamily, SD3Family, FluxFamily)


def family_of(pipe: Any, source: str = "pipeline", resolution: int | None = None,
              prompt_cache_bytes: int = 1 << 30) -> Family:
    """The family adapter of a loaded pipeline (of one of our wrappers: of the pipeline it wraps, its
    ``base_pipeline``); a ConfigError naming the supported families otherwise."""
    inner = getattr(pipe, "base_pipeline", pipe)
    for fam in FAMILIES:
        if fam.accepts(inner):
            return fam(inner, source, prompt_cache_bytes, resolution)
    names = "; ".join(f.name for f in FAMILIES)
    raise ConfigError(f"'{source}' is a {type(inner).__name__}, which no supported family matches (supported: "
                      f"{names})")


__all__ = ["FAMILIES", "Family", "LatentFamily", "family_of"]
