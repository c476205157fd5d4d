"""Sample generation for evaluation: every sample from its own seeded generator, so results do not depend on
the batch size; class labels balanced (sample i gets class i mod num_classes)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from tqdm.auto import tqdm

from stepdistill.data import PromptFile
from stepdistill.errors import UserError, first_line
from stepdistill.images import float_to_uint8
from stepdistill.pipelines import accepts_timesteps, family_of, recorded_schedule
from stepdistill.pipelines.diversity import hybrid_sample, hybrid_timesteps


def swap_scheduler(pipe, name: str | None):
    """Replace the pipeline's scheduler by diffusers scheduler class ``name`` built from the same config."""
    if not name:
        return pipe
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise UserError(f"unknown scheduler '{name}' (use a diffusers class name such as DDIMScheduler, "
                        "EulerDiscreteScheduler, DPMSolverMultistepScheduler, LCMScheduler)")
    # A student's recorded schedules (student_timesteps, sample_timesteps) belong to the sampler it was exported with;
    # a scheduler the user swaps in samples by its own rule (or by --timesteps).
    config = {k: v for k, v in pipe.scheduler.config.items() if k not in ("student_timesteps", "sample_timesteps")}
    pipe.scheduler = cls.from_config(config)
    return pipe


def read_prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    return PromptFile(path).prompts


def parse_timesteps(text: str | None, pipe) -> list[int] | None:
    """``--timesteps 999,699,399,19`` -> a validated list for ``pipe``'s scheduler (None if not given).

    LCM-type students sample at any subset of their training grid, so the timesteps are a sampling choice the
    user may make; they must be distinct integers, descending, inside the scheduler's range, and the scheduler
    must accept explicit timesteps (LCMScheduler, DDPMScheduler, ... do; DDIMScheduler does not).
    """
    if text is None:
        return None
    try:
        ts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--timesteps must be a comma list of integers, e.g. 999,699,399,19; got {text!r}") from None
    n_train = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= n_train or ts[-1] < 0:
        raise UserError(f"--timesteps must be distinct and descending in [0, {n_train - 1}], got {text!r}")
    if not accepts_timesteps(pipe):
        raise UserError(f"{type(pipe).__name__} with {type(pipe.scheduler).__name__} does not accept explicit "
                        "timesteps; drop --timesteps or pass --scheduler LCMScheduler (or another scheduler that "
                        "takes them)")
    try:  # the scheduler's own checks (e.g. Karras sigmas refuse custom timesteps), on a copy
        copy.deepcopy(pipe.scheduler).set_timesteps(timesteps=ts)
    except (ValueError, TypeError) as e:
        raise UserError(f"{type(pipe.scheduler).__name__} refuses --timesteps {text}: {first_line(e)}") from None
    return ts


@torch.inference_mode()
def generate(pipe, num_samples: int, steps: int, guidance: float = 1.0, seed: int = 0, batch_size: int = 100,
             prompts: list[str] | None = None, timesteps: list[int] | None = None,
             progress: bool = True, teacher=None, teacher_steps: int = 0, teacher_guidance: float = 2.0) -> dict:
    """Generate ``num_samples`` images; returns ``images`` (uint8 NHWC), ``labels`` or ``prompts``, ``seconds`` and
    ``timesteps`` (the explicit schedule used: ``timesteps``, else the pipeline's recorded one for ``steps``, else
    None for the scheduler's own rule) or ``sigmas`` (a flow-matching student's recorded noise levels, for the stock
    pipelines that take them).

    ``seconds`` is the wall time of all network work (first batch included), so samples/second is honest
    end-to-end throughput at this batch size.

    ``teacher_steps > 0`` (with ``teacher``): diversity distillation, the teacher's first steps then the student
    (:func:`stepdistill.pipelines.diversity.hybrid_sample`); ``timesteps`` then holds the whole hybrid schedule.
    """
    if num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    if steps < 1 and timesteps is None:
        raise UserError("--steps must be at least 1")
    sigmas = None
    if teacher_steps:
        timesteps = hybrid_timesteps(pipe, teacher_steps)
    elif timesteps is None:  # a student's recorded schedule for this step count, if it has one
        recorded = recorded_schedule(pipe, steps)
        timesteps, sigmas = recorded.get("timesteps"), recorded.get("sigmas")
    family = family_of(pipe)
    if family.kind == "class":
        conditions = list(np.arange(num_samples) % family.classes.num_classes)
    elif family.kind == "text":
        if not prompts:
            raise UserError("this pipeline is text-conditioned: pass --prompts FILE (one prompt per line)")
        conditions = [prompts[i % len(prompts)] for i in range(num_samples)]
    else:
        conditions = [None] * num_samples
    out = []
    t0 = time.perf_counter()
    n_steps = len(timesteps) if timesteps else steps
    for start in tqdm(range(0, num_samples, batch_size), desc=f"sampling {n_steps} steps", disable=not progress,
                      unit="batch"):
        idx = range(start, min(start + batch_size, num_samples))
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in idx]
        chosen = conditions[start: start + len(idx)]
        if teacher_steps:
            res = hybrid_sample(pipe, teacher, teacher_steps, teacher_guidance, gens,
                                labels=torch.as_tensor(chosen) if family.kind == "class" else None,
                                prompts=chosen if family.kind == "text" else None, resolution=family.resolution,
                                output_type="np")
            out.append(float_to_uint8(res.images))
            continue
        schedule = ({"timesteps": list(timesteps)} if timesteps is not None else
                    {"sigmas": list(sigmas)} if sigmas is not None else {"num_inference_steps": steps})
        out.append(family.sample(pipe, chosen, gens, guidance, **schedule))
    seconds = time.perf_counter() - t0
    images = np.concatenate(out)
    if images.ndim == 3:
        images = images[..., None]
    labels = np.asarray(conditions, dtype=np.int64) if family.kind == "class" else None
    return {"images": images, "labels": labels, "prompts": conditions if family.kind == "text" else None,
            "seconds": seconds, "timesteps": list(timesteps) if timesteps is not None else None,
            "sigmas": list(sigmas) if sigmas is not None else None}


def save_samples(path: str | Path, result: dict, **meta) -> None:
    """Write samples.npz: ``images`` uint8 NHWC, ``labels`` or ``prompts``, plus scalar metadata."""
    arrays = {"images": result["images"]}
    if result.get("labels") is not None:
        arrays["labels"] = np.asarray(result["labels"], dtype=np.int64)
    if result.get("prompts") is not None:
        arrays["prompts"] = np.asarray(result["prompts"], dtype=str)
    for k, v in meta.items():
        arrays[f"meta_{k}"] = np.asarray(v)
    np.savez_compressed(path, **arrays)


def load_samples(path: str | Path) -> dict:
    """Read a samples.npz written by :func:`save_samples`; a bad file is a UserError naming it."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "images" not in z:
                raise UserError(f"samples file '{p}' has no 'images' array")
            images = z["images"]
            labels = z["labels"] if "labels" in z else None
            prompts = [str(s) for s in z["prompts"]] if "prompts" in z else None
    except (OSError, ValueError) as e:
        raise UserError(f"samples file '{p}' is unreadable ({type(e).__name__})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"samples file '{p}': 'images' must be uint8 NHWC, got {images.dtype} {images.shape}")
    return {"images": images, "labels": labels, "prompts": prompts}
