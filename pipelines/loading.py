"""Loading any pipeline stepdistill writes or reads: stock diffusers folders and hub ids, our class-conditional
pipeline, LoRA exports (onto their base), multi-student exports (with their router) and AGD exports (with their
guidance adapters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers

from stepdistill.errors import UserError
from stepdistill.inputs import read_json

from .families import family_of
from .folders import load_diffusers_pipeline, resolve_pipeline_path
from .guidance import AdapterGuidancePipeline
from .lora import LORA_FILE, lora_base
from .multi_student import MultiStudentPipeline


def is_lora_export(name: str) -> bool:
    """A local folder holding a LoRA export without a pipeline of its own (text-teacher LCM-LoRA students)."""
    p = Path(name)
    return p.is_dir() and (p / LORA_FILE).is_file() and not (p / "model_index.json").is_file()


def load_lora_export(path: str, base: str | None = None, device=None, dtype=None) -> Any:
    """The base pipeline with a LoRA export applied (by the base's family) and the export's scheduler swapped in.

    ``base`` defaults to the base model the export records; loading onto a base whose weights differ from the
    recorded fingerprint warns (:class:`~stepdistill.pipelines.lora.BaseMismatchWarning`).
    """
    info = lora_base(path) or {}
    base = base or info.get("base")
    if not base:
        raise UserError(f"'{path}' is a LoRA export that does not record its base model; pass --base with the "
                        "pipeline it was trained on")
    pipe = family_of(load_diffusers_pipeline(base, dtype=dtype), base).load_lora(path)
    sched = Path(path) / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        cls_name = read_json(sched, "scheduler config").get("_class_name", "")
        cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) and cls_name.endswith("Scheduler") \
            else None
        if cls is None:
            raise UserError(f"'{sched}' names an unknown scheduler class {cls_name!r}")
        pipe.scheduler = cls.from_pretrained(path, subfolder="scheduler")
    return pipe.to(device) if device is not None else pipe


def load_pipeline(name: str, device=None, dtype=None, base: str | None = None, single: bool = False) -> Any:
    """Load a pipeline by alias, local folder or hub id; our own pipeline classes are picked by model_index.json.

    A LoRA export folder (``pytorch_lora_weights.safetensors`` without a pipeline) loads as its base pipeline
    (``base``, or the one it records) with the adapters applied. ``base`` is refused for anything else. A
    multi-student export (with ``router.json``) loads as a :class:`MultiStudentPipeline`, or with ``single`` as its
    student 0 alone; an AGD export (with ``guidance_adapter/``) as an :class:`AdapterGuidancePipeline`, or with
    ``single`` as its base pipeline without the adapters.
    """
    if is_lora_export(name):
        return load_lora_export(name, base, device, dtype)
    if base is not None:
        raise UserError(f"--base applies to LoRA exports (a folder with pytorch_lora_weights.safetensors and no "
                        f"model_index.json); '{name}' is a full pipeline")
    path = resolve_pipeline_path(name)
    if not single and MultiStudentPipeline.is_multi_student(path):
        return MultiStudentPipeline.from_pretrained(path, device=device, dtype=dtype)
    if not single and AdapterGuidancePipeline.is_guided(path):
        return AdapterGuidancePipeline.from_pretrained(path, device=device, dtype=dtype)
    return load_diffusers_pipeline(name, device=device, dtype=dtype)
