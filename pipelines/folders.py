"""Pipeline folders: the shipped aliases, a name -> folder or hub id, loading a diffusers pipeline folder (stock
classes, or our ``ClassConditionalPipeline`` named in its model_index.json), and rebuilding a pipeline around new
components."""

from __future__ import annotations

import importlib.resources
import inspect
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from stepdistill.errors import UserError, first_line
from stepdistill.inputs import read_json

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


def read_model_index(path: Path) -> dict:
    """A pipeline folder's model_index.json, checked: its class a name, every component a [library, class] pair of
    names (or both null: an absent component)."""
    data = read_json(path, "pipeline index")
    if not isinstance(data.get("_class_name"), str):
        raise UserError(f"'{path}': field '_class_name' must be a pipeline class name, got "
                        f"{data.get('_class_name')!r}")
    for key, value in data.items():
        if isinstance(value, list) and not (len(value) == 2 and all(v is None or isinstance(v, str) for v in value)):
            raise UserError(f"'{path}': component '{key}' must be [library, class], got {value!r}")
    return data


def load_diffusers_pipeline(name: str, device=None, dtype=None) -> Any:
    """The diffusers pipeline folder ``name`` (alias, folder or hub id) as its own class, ours picked by
    model_index.json; any wrapper files beside it (router, guidance adapters, LoRA) are ignored."""
    path = resolve_pipeline_path(name)
    cls = DiffusionPipeline
    index = Path(path) / "model_index.json"
    absent: dict[str, None] = {}
    if index.is_file():
        data = read_model_index(index)
        cls = OUR_PIPELINES.get(data["_class_name"], DiffusionPipeline)
        # Components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None to load again.
        absent = {k: None for k, v in data.items() if isinstance(v, list) and v == [None, None]}
    # diffusers' "Loading pipeline components" and transformers' "Loading weights" bars are noise in our commands
    # (and would turn a one-line error into several lines); switched off for this call only, since the settings are
    # process-wide.
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    weight_bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        kwargs.update(absent)
        pipe = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load pipeline '{name}': {first_line(e)}") from None
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
        if weight_bars:
            transformers_logging.enable_progress_bar()
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
