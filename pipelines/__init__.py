"""The pipelines layer: the model families (one file each in ``families/``), loading, LoRA, the one export path,
and our pipeline classes where stock diffusers has none (class-conditional, multi-student router, guidance
adapters). Import as ``stepdistill.pipelines``."""

from __future__ import annotations

from .class_conditional import ClassConditionalPipeline
from .export import StudentSpec, accepts_timesteps, recorded_schedule, recorded_timesteps
from .families import FAMILIES, Family, family_of
from .folders import rebuild_pipeline, resolve_pipeline_path
from .guidance import AdapterGuidancePipeline
from .loading import load_pipeline
from .multi_student import MultiStudentPipeline

__all__ = ["FAMILIES", "AdapterGuidancePipeline", "ClassConditionalPipeline", "Family", "MultiStudentPipeline",
           "StudentSpec", "accepts_timesteps", "family_of", "load_pipeline", "rebuild_pipeline", "recorded_schedule",
           "recorded_timesteps", "resolve_pipeline_path"]
