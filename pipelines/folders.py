"""Pipeline folders: the shipped aliases, a name -> folder or hub id, loading a diffusers pipeline folder (stock
classes, or our ``ClassConditionalPipeline`` named in its model_index.json), and rebuilding a pipeline around new
components."""

from __future__ import annotations

import importlib.resources
import inspect
import json
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from stepdistill.errors import UserError, first_line

from .class_conditional import ClassConditionalPipeline

# Aliases for pipelines shipped inside the package.
ALIASES = {"digits16": "digits16_teacher", "digits16-flow": "digits16_flow_teacher"}
OUR_PIPELINES = {"ClassConditionalPipeline": ClassConditionalPipeline}


def assets_dir() -> Path:
    """The package's shipped assets (installed wheel and editable checkout alike)."""
    return Path(str(importlib.resources.files("stepdistill") / "assets"))


def resolve_pipeline_path(name: str) -> str:
    """A shipped alias ("digits16") -> its folder; a local folder as is; anything else is treated as a hub id."""
    if name in ALIASES:
        path = assets_dir() / ALIASES[name]
        if not (path / "model_index.json").is_file():
            raise UserError(f"the shipped pipeline '{name}' is missing from {path}; reinstall stepdistill")
        return str(path)
    p = Path(name)
    if p.exists():
        if not p.is_dir() or not (p / "model_index.json").is_file():
            raise UserError(f"'{name}' is not a diffusers pipeline folder (no model_index.json)")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"pipeline folder '{name}' does not exist (pass a pipeline folder, 'digits16' or a hub id)")
    return name


def rebuild_pipeline(base: Any, **replacements: Any) -> Any:
    """A pipeline of ``base``'s class with the same components but ``replacements`` (e.g. ``unet=...``,
    ``scheduler=...``), keeping the constructor flags ``base`` holds in its config (requires_safety_checker, ...)."""
    components = {**base.components, **replacements}
    params = inspect.signature(type(base).__init__).parameters
    flags = {k: v for k, v in base.config.items() if k in params and k not in components}
    pipe = type(base)(**components, **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_diffusers_pipeline(name: str, device=None, dtype=None) -> Any:
    """The diffusers pipeline folder ``name`` (alias, folder or hub id) as its own class, ours picked by
    model_index.json; any wrapper files beside it (router, guidance adapters, LoRA) are ignored."""
    path = resolve_pipeline_path(name)
    cls = DiffusionPipeline
    index = Path(path) / "model_index.json"
    if index.is_file():
        try:
            cls_name = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError:
            raise UserError(f"'{index}' is not valid JSON") from None
        cls = OUR_PIPELINES.get(cls_name, DiffusionPipeline)
    # diffusers' "Loading pipeline components" bar is noise in our commands (and would turn a one-line error into
    # several lines); switched off for this call only, since the setting is process-wide.
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        # Components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None to load again.
        if index.is_file():
            kwargs.update({k: None for k, v in json.loads(index.read_text()).items()
                           if isinstance(v, list) and v == [None, None]})
        pipe = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load pipeline '{name}': {first_line(e)}") from None
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
