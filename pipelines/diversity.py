"""Diversity distillation at inference (Gandikota & Bau 2025, "Distilling Diversity and Control in Diffusion
Models"): the teacher takes the first step(s), which decide the composition, and the distilled student the rest.

One-step students lose diversity (recall) first; letting the teacher (with CFG) make the first ``K`` steps of a
trailing schedule and handing its intermediate sample to the student brings it back at ``2 K`` extra network calls
per sample. A K-step student trained at t_1 > ... > t_S keeps its schedule: the teacher goes from t_1 to t_(K+1)
(DDIM, or Euler for flow teachers), the student does the rest (the paper's setting). A one-step student gets a
trailing schedule of K + 1 points, e.g. the teacher from t = 999 to 499 and the student from 499, a timestep it was
not trained at (measured on digits16 in docs/results/vsd_digits16.md: more recall, worse FID).
The student is run by its own pipeline (``latents=`` and ``timesteps=`` / ``sigmas=``), so any exported student
works: our class-conditional pipeline, SD / SDXL (``timesteps``), SD3 / Flux (``sigmas``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stepdistill.errors import UserError

from .export import recorded_student_timesteps
from .families import family_of
from .loading import load_pipeline


def teacher_of(student: Any) -> str:
    """Where an exported student's teacher is (recorded at export as ``distilled_from`` in its scheduler config);
    a UserError if the export does not say."""
    ref = getattr(student.scheduler, "config", {}).get("distilled_from")
    if ref is not None and not isinstance(ref, str):
        raise UserError(f"this pipeline's scheduler config records its teacher as {ref!r}, not a pipeline name: pass "
                        "--teacher PIPELINE")
    if not ref:
        raise UserError("this pipeline does not record its teacher (exported by an older stepdistill, or not a "
                        "distilled student): pass the teacher with --teacher PIPELINE")
    return str(ref)


def hybrid_schedule(num_train_timesteps: int, teacher_steps: int, student_timesteps: list[int],
                    flow: bool) -> list[int]:
    """The hybrid schedule, descending: a student with more trained timesteps than ``teacher_steps`` keeps its own
    (the teacher takes the first ``teacher_steps`` of them, as in the paper); otherwise (a one-step student) the
    ``teacher_steps + len(student_timesteps)`` trailing timesteps (flow: in [1, T], from T), so the student starts
    at a timestep it was not trained at."""
    if len(student_timesteps) > teacher_steps:
        return [int(t) for t in student_timesteps]
    n = teacher_steps + len(student_timesteps)
    if flow:
        ts = [num_train_timesteps - j * num_train_timesteps // n for j in range(n)]
    else:
        ts = [num_train_timesteps - 1 - j * (num_train_timesteps // n) for j in range(n)]
    if len(set(ts)) != n:
        raise UserError(f"--teacher-steps {teacher_steps}: {n} distinct timesteps do not fit the schedule's "
                        f"{num_train_timesteps}; use fewer teacher steps")
    return ts


def hybrid_timesteps(student: Any, teacher_steps: int) -> list[int]:
    """The hybrid schedule of an exported ``student`` (its trained timesteps, its schedule's length and kind)."""
    family = family_of(student, "student")
    den = family.denoiser(family.network)
    return hybrid_schedule(den.num_train_timesteps, teacher_steps, student_timesteps_of(student), den.is_flow)


def student_timesteps_of(student: Any) -> list[int]:
    """The trained timesteps an exported student records; a UserError for a pipeline that records none."""
    recorded = recorded_student_timesteps(student)
    if not recorded:
        raise UserError("diversity distillation needs a distilled student (its scheduler records "
                        "student_timesteps); this pipeline has none")
    return recorded


@torch.no_grad()
def hybrid_sample(student: Any, teacher: Any, teacher_steps: int, teacher_guidance: float,
                  generators: list[torch.Generator], labels: torch.Tensor | None = None,
                  prompts: list[str] | None = None, resolution: int | None = None,
                  student_guidance: float | None = None, output_type: str = "np") -> Any:
    """Samples of ``student`` whose first ``teacher_steps`` steps are the teacher's (CFG ``teacher_guidance``).

    Args:
        student, teacher: loaded pipelines of the same family (the student exported by stepdistill).
        generators: one per sample; the initial noise and the student's re-noising draw from them.
        labels / prompts: the conditions (class pipelines / text pipelines).
        resolution: image side for text pipelines (default: the pipeline's; class pipelines use their network's).
        student_guidance: ``guidance_scale`` for the student pipeline (default: 1, or Flux-dev's guidance input).
    Returns: the student pipeline's output (``.images``).
    """
    if teacher_steps < 1:
        raise UserError(f"--teacher-steps must be at least 1, got {teacher_steps}")
    n = len(generators)
    family = family_of(teacher, "teacher", resolution=resolution)
    den = family.denoiser(family.network)
    device = next(family.network.parameters()).device
    if family.classes is not None:
        cond, uncond = family.classes.cond(labels.to(device)), family.classes.uncond(n, device)
    else:
        cond, uncond = family.prompt_cond(list(prompts), device)
    shape = family.noise_shape(n)
    x = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators]).to(device)
    ts = hybrid_schedule(den.num_train_timesteps, teacher_steps, student_timesteps_of(student), den.is_flow)
    w = None if teacher_guidance == 1.0 else teacher_guidance
    for t, t_next in zip(ts[:teacher_steps], ts[1: teacher_steps + 1]):
        x = den.solver_step(x, torch.full((n,), t, device=device), t_next, cond, guidance_scale=w, uncond=uncond)
    when = family.schedule_kwargs(ts[teacher_steps:], den.num_train_timesteps)
    if family.classes is not None:
        return student(labels, generator=generators, latents=x, output_type=output_type, **when)
    if student_guidance is None:
        student_guidance = family.distilled_guidance_scale
    return student(list(prompts), generator=generators, latents=x, output_type=output_type, height=family.resolution,
                   width=family.resolution, guidance_scale=student_guidance, **when)


def load_teacher_for(student: Any, teacher: str | None, device: Any = None) -> Any:
    """The teacher pipeline to pair with ``student``: ``teacher`` if given, else the one its export records."""
    ref = teacher or teacher_of(student)
    if not teacher and Path(ref).is_absolute() and not Path(ref).exists():
        raise UserError(f"the teacher this student records ('{ref}') is not on this machine: pass --teacher")
    pipe = load_pipeline(ref, device=device)
    check_pair(student, pipe, ref)
    return pipe


def check_pair(student: Any, teacher: Any, name: str) -> None:
    """A UserError unless ``teacher`` can take the student's first steps: the same family, noise and schedule."""
    fs, ft = family_of(student, "student"), family_of(teacher, name)
    ds, dt = fs.denoiser(fs.network), ft.denoiser(ft.network)
    same = (type(fs) is type(ft) and fs.noise_shape(1) == ft.noise_shape(1) and ds.is_flow == dt.is_flow
            and ds.num_train_timesteps == dt.num_train_timesteps)
    if not same:
        def what(f, d) -> str:
            return (f"{type(f.pipe).__name__} ({'flow matching' if d.is_flow else 'DDPM-type'}, "
                    f"{d.num_train_timesteps} timesteps, noise {list(f.noise_shape(1))})")

        raise UserError(f"teacher '{name}' cannot take this student's first steps: it is a {what(ft, dt)}, the "
                        f"student a {what(fs, ds)}; pass the teacher the student was distilled from")
