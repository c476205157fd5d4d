"""The one export path of every method: what a method declares about its student (:class:`StudentSpec`) becomes an
in-memory pipeline (sample grids), a folder stock diffusers loads (or our pipeline classes, where diffusers has none)
and a model card; and what an export records (its trained schedule) is read back for sampling.

Exports record the teacher they were distilled from (``distilled_from``) and the exact schedule they were trained
for in their scheduler config: ``student_timesteps`` (trained), ``sample_timesteps`` (recommended, per step count),
and for the stock flow-matching pipelines (which take ``sigmas=``) the same as ``student_sigmas`` /
``sample_sigmas``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stepdistill.inputs import Fields

from .families import Family
from .folders import load_diffusers_pipeline, rebuild_pipeline
from .guidance import AdapterGuidancePipeline, GuidanceAdapters
from .multi_student import MultiStudentPipeline, Router


@dataclass
class LoraStudent:
    """A student that is LoRA adapters on the teacher network: the network carrying them, their peft config and the
    fingerprint of the base weights (taken before any cast for training)."""

    network: nn.Module
    config: Any
    fingerprint: str


@dataclass
class StudentSpec:
    """What a method declares about its trained student; :func:`export_student`, :func:`student_pipeline` and
    :func:`sample_grid` do the rest.

    Args:
        method: the method's registry name (the model card's command line).
        title: the model card's title.
        trained: how the student was trained, for the card ("DMD2 (distribution matching ...)").
        networks: the student network(s) as plain diffusers models: one, or one per student with ``router``.
        scheduler: the sampler, with the trained schedule recorded in its config.
        sampling: how the pipeline is asked for the trained sampler (``timesteps=``, ``sigmas=`` or
            ``num_inference_steps=``): sample grids pass it, the card shows it.
        guidance_scale: the ``guidance_scale`` the pipeline is sampled with (1 = the teacher's CFG distilled in).
        details: the card's sentences about the schedule and guidance.
        lora: a LoRA student (the export is its adapter file and scheduler; for class-conditional teachers also the
            pipeline with the adapters merged, ``networks``).
        router: several students and who owns which condition (the export is a ``MultiStudentPipeline``).
        adapters: guidance adapters on the unchanged teacher (AGD: the export is the teacher plus
            ``guidance_adapter/``); ``networks`` is then empty and ``scheduler`` the teacher's.
        card_lines: more lines for the card (settings, what each student owns).
        usage: the card's Python example (``{folder}`` stands for the export's folder name); "" = the family's.
        sample_prompts: the prompts of sample grids (text teachers; cycled).
        from_teacher: False for a network trained from scratch (the card then names no teacher).
    """

    method: str
    title: str
    trained: str
    networks: list[nn.Module]
    scheduler: Any
    sampling: dict
    guidance_scale: float = 1.0
    details: str = ""
    lora: LoraStudent | None = None
    router: Router | None = None
    adapters: GuidanceAdapters | None = None
    card_lines: list[str] = field(default_factory=list)
    usage: str = ""
    sample_prompts: list[str] = field(default_factory=list)
    from_teacher: bool = True


def teacher_reference(teacher: str) -> str:
    """How an export records its teacher (``distilled_from`` in its scheduler config, a LoRA file's base): a local
    folder as an absolute path (the export may be used from another working directory), an alias or hub id as
    given."""
    return str(Path(teacher).resolve()) if Path(teacher).is_dir() else teacher


def student_pipeline(family: Family, spec: StudentSpec, originals: bool = False) -> Any:
    """The student as an in-memory pipeline: the teacher's pipeline class around its network (our wrappers for
    several students or guidance adapters). With ``originals`` the frozen parts come from a fresh load of the teacher
    (as published, not the copies a run keeps in ``train.teacher_dtype``)."""
    if spec.adapters is not None:
        return AdapterGuidancePipeline(family.pipe, spec.adapters, attach=False)
    first = family.export_pipeline(spec.networks[0], spec.scheduler, originals)
    if spec.router is None:
        return first
    rest = [rebuild_pipeline(first, **{family.network_attr: net}) for net in spec.networks[1:]]
    return MultiStudentPipeline([first, *rest], spec.router)


@contextmanager
def _eval_mode(networks: list[nn.Module]) -> Iterator[None]:
    modes = [n.training for n in networks]
    for n in networks:
        n.eval()
    try:
        yield
    finally:
        for n, m in zip(networks, modes):
            n.train(m)


@torch.no_grad()
def sample_grid(family: Family, spec: StudentSpec, num: int, seed: int) -> np.ndarray:
    """``num`` uint8 NHWC samples of the student for the periodic sample grids: classes in turn (class teachers) or
    its sample prompts cycled, sample i from seed + i."""
    prompts = spec.sample_prompts or ["a photo"]
    pipe = student_pipeline(family, spec)
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num)]
    conditions = ([i % family.classes.num_classes for i in range(num)] if family.classes is not None
                  else [prompts[i % len(prompts)] for i in range(num)])
    # A student samples with the frozen parts in float32 (its own weights are float32); guidance adapters ride on
    # the frozen teacher itself, which samples in the dtype it is kept in.
    frozen = family.frozen_in(torch.float32) if spec.adapters is None else nullcontext()
    with _eval_mode(spec.networks), frozen:
        return family.sample(pipe, conditions, gens, spec.guidance_scale, **spec.sampling)


def model_card(family: Family, spec: StudentSpec, folder: str, teacher: str) -> str:
    """The export's README.md."""
    call = ", ".join(f"{k}={v}" for k, v in spec.sampling.items())
    if family.kind == "text":
        call += f", guidance_scale={spec.guidance_scale}"
    usage = (spec.usage.replace("{folder}", folder) if spec.usage
             else family.usage(folder, call, base=teacher, lora=spec.lora is not None))
    if spec.adapters is not None:
        contents = "the unchanged teacher pipeline plus `guidance_adapter/`"
    elif spec.router is not None:
        contents = (f"{len(spec.networks)} students: this folder is student 0 as a stock pipeline "
                    "(`DiffusionPipeline.from_pretrained` loads it alone), the others' networks are in `student_k/`, "
                    "and `router.json` says which student owns which condition")
    elif spec.lora is not None:
        c = spec.lora.config
        contents = (f"`pytorch_lora_weights.safetensors` (LoRA rank {c.r}, alpha {c.lora_alpha}; base model "
                    f"`{teacher_reference(teacher)}`, fingerprint `{spec.lora.fingerprint}`, also in the file's "
                    "`stepdistill_base` metadata)")
    else:
        contents = "a full pipeline"
    lines = "".join(f"\n{line}" for line in spec.card_lines)
    origin = f"Distilled from `{teacher}` with" if spec.from_teacher else "Trained with"
    command = f"stepdistill train {spec.method} --config <config.yaml>" + (
        f"   # teacher={teacher}" if spec.from_teacher else "")
    return (f"# {spec.title}\n\n{origin} {spec.trained} by stepdistill:\n\n    {command}\n\n"
            f"Contents: {contents}. {spec.details}\n\n```python\n{usage}\n```\n{lines}\n")


def export_student(family: Family, spec: StudentSpec, out_dir: Path, teacher: str, originals: bool = False) -> None:
    """Write the student into ``out_dir`` (see :class:`StudentSpec`) with its model card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.adapters is not None:  # the base pipeline as published (a run may hold its frozen parts in another dtype)
        spec.adapters.save(out_dir / "guidance_adapter")
        load_diffusers_pipeline(teacher).save_pretrained(str(out_dir), safe_serialization=True)
    elif spec.lora is not None:
        pipe = student_pipeline(family, spec, originals)
        if family.kind == "class":  # a few MB: the merged pipeline too, loadable on its own
            pipe.save_pretrained(str(out_dir), safe_serialization=True)
        else:
            pipe.scheduler.save_pretrained(str(out_dir / "scheduler"))
        family.save_lora(spec.lora.network, out_dir, spec.lora.config, teacher_reference(teacher),
                         spec.lora.fingerprint)
    else:
        student_pipeline(family, spec, originals).save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").write_text(model_card(family, spec, out_dir.name, teacher))


# --- what an export records ------------------------------------------------------------------------------------------
def accepts_timesteps(pipe: Any) -> bool:
    """Whether both the pipeline's ``__call__`` and its scheduler's ``set_timesteps`` take explicit ``timesteps``."""
    return all("timesteps" in inspect.signature(fn).parameters for fn in (pipe.__call__, pipe.scheduler.set_timesteps))


def _schedules(pipe: Any, many: str, one: str, numbers: bool) -> list[list]:
    """The recorded ``many`` (a list of schedules) and ``one`` (a schedule) of an export's scheduler config, every
    entry a timestep in [0, T] (or with ``numbers`` a noise level in [0, 1]); a UserError naming the key otherwise."""
    cfg = dict(pipe.scheduler.config)
    top = int(cfg.get("num_train_timesteps", 1000))
    named = [(f"{many}[{i}]", ts) for i, ts in enumerate(cfg.get(many) or [])]
    if cfg.get(one):
        named.append((one, cfg[one]))
    out = []
    for key, ts in named:
        f = Fields({key: ts}, "scheduler/scheduler_config.json")
        out.append(f.numbers(key, 0.0, 1.0) if numbers else f.ints(key, 0, top))
    return out


def recorded_student_timesteps(pipe: Any) -> list[int]:
    """The trained timesteps an export records (``student_timesteps``; [] for a pipeline that records none)."""
    return next(iter(_schedules(pipe, "", "student_timesteps", numbers=False)), [])


def recorded_timesteps(pipe: Any, steps: int) -> list[int] | None:
    """The schedule a distilled student records for ``steps``-step sampling, or None (the scheduler's own rule).

    LCM recipes may record ``sample_timesteps`` (recommended schedules, one per step count) and DMD2 students record
    ``student_timesteps`` (their trained schedule) in the scheduler config; the former are looked up first. None
    when the pipeline or its scheduler does not take explicit timesteps.
    """
    if not accepts_timesteps(pipe):
        return None
    for ts in _schedules(pipe, "sample_timesteps", "student_timesteps", numbers=False):
        if len(ts) == steps:
            return ts
    return None


def recorded_schedule(pipe: Any, steps: int) -> dict:
    """How to ask ``pipe`` for a distilled student's recorded ``steps``-step sampler: ``{"timesteps": [...]}`` where
    the pipeline takes explicit timesteps, ``{"sigmas": [...]}`` for the stock flow-matching pipelines (SD3, Flux:
    they take ``sigmas``, recorded as ``sample_sigmas`` / ``student_sigmas``), or ``{}`` (the scheduler's own rule)."""
    ts = recorded_timesteps(pipe, steps)
    if ts is not None:
        return {"timesteps": ts}
    if "sigmas" in inspect.signature(pipe.__call__).parameters:
        for sig in _schedules(pipe, "sample_sigmas", "student_sigmas", numbers=True):
            if len(sig) == steps:
                return {"sigmas": sig}
    return {}
