"""Benchmarks measured side by side in one run (``stepdistill bench``): they train recipes and evaluate what they
train, so they sit above the loop and the evaluation harness. Import as ``stepdistill.bench``."""

from __future__ import annotations

from .agd import run_agd_bench
from .memory import run_memory_bench
from .msd import run_msd_bench
from .report import (
    run_distillation_report,
    run_real_floor,
    run_teacher_baseline,
    run_training_curve,
    teacher_step_counts,
)

__all__ = ["run_agd_bench", "run_distillation_report", "run_memory_bench", "run_msd_bench", "run_real_floor",
           "run_teacher_baseline", "run_training_curve", "teacher_step_counts"]
