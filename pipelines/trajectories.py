"""Writing CFG-guided sampling trajectories of a teacher (``stepdistill trajectories``), the training data of
adapter guidance distillation; the folder format and its reader are :mod:`stepdistill.trajectories`.

Each trajectory starts from its own seeded noise, with its own guidance scale w drawn uniformly from
[w_min, w_max], and follows the teacher's deterministic sampler (DDIM for DDPM-type schedules, Euler for flow
matching) on the teacher scheduler's ``steps``-step grid under CFG at w, as its pipeline sets the grid. Shards are
written whole (a temporary file renamed into place), so a killed writer leaves only finished shards and a rerun with
the same arguments continues with the missing ones.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from stepdistill import schedules as S
from stepdistill.conditioning import Cond
from stepdistill.data import PromptFile
from stepdistill.errors import UserError
from stepdistill.files import check_out_dir
from stepdistill.seeding import derive_seed
from stepdistill.trajectories import (
    HEADER_FILE,
    TrajectorySpec,
    cond_tensors,
    is_trajectory_folder,
    read_spec,
    shard_name,
    shard_ok,
)

from .families import Family, family_of
from .folders import load_diffusers_pipeline
from .lora import base_fingerprint


def _conditions(family, spec: TrajectorySpec, idx: list[int], prompts: list[str] | None,
                device: torch.device) -> tuple[Cond, Cond]:
    """(cond, uncond) of trajectories ``idx``: class i % num_classes, or prompt i % len(prompts)."""
    if family.classes is not None:
        labels = torch.tensor([i % family.classes.num_classes for i in idx], device=device)
        return family.classes.cond(labels), family.classes.uncond(len(idx), device)
    return family.prompt_cond([prompts[i % len(prompts)] for i in idx], device)


def _timesteps(family: Family, teacher, steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler grid (network timesteps) as the pipeline sets it, and each step's next point (-1 for DDPM-type
    schedules, 0 for flow matching: the clean end)."""
    ts = family.sampler_timesteps(steps).to(device).float()
    end = torch.zeros(1, device=device) if teacher.is_flow else torch.full((1,), -1.0, device=device)
    return ts, torch.cat([ts[1:], end])


@torch.no_grad()
def _sample_shard(family, teacher, spec: TrajectorySpec, k: int, prompts: list[str] | None, batch_size: int,
                  device: torch.device, bar) -> dict[str, torch.Tensor]:
    """The tensors of shard ``k`` (see the module docstring of :mod:`stepdistill.trajectories`)."""
    dtype = getattr(torch, spec.dtype)
    ts, ts_next = _timesteps(family, teacher, spec.steps, device)
    idx_all = list(spec.shard_range(k))
    parts: dict[str, list[torch.Tensor]] = {}
    for b0 in range(0, len(idx_all), batch_size):
        idx = idx_all[b0:b0 + batch_size]
        noise, ws = [], []
        for i in idx:  # each trajectory from its own generator: independent of batch size, rank and shard size
            g = torch.Generator().manual_seed(derive_seed(spec.seed, i))
            noise.append(torch.randn(family.noise_shape(1, spec.resolution)[1:], generator=g))
            ws.append(spec.w_min + (spec.w_max - spec.w_min) * torch.rand((), generator=g).item())
        x = torch.stack(noise).to(device)
        w = torch.tensor(ws, device=device)
        cond, uncond = _conditions(family, spec, idx, prompts, device)
        states, targets = [], []
        for t, t_next in zip(ts, ts_next):
            tt = t.expand(len(idx))
            raw = teacher.raw(x, tt, cond, guidance_scale=w, uncond=uncond)
            states.append(x.to(dtype).cpu())
            targets.append(raw.to(dtype).cpu())
            a, s = teacher.alpha_sigma(tt, like=x)
            x0, eps = S.to_x0_eps(raw, x, a, s, teacher.prediction_type)
            a_n, s_n = teacher.alpha_sigma(t_next.expand(len(idx)), like=x)
            x = S.ddim_step(x0, eps, a_n, s_n)
        n, steps = len(idx), len(ts)
        # State order: trajectory-major (all states of a trajectory, then the next).
        parts.setdefault("x_t", []).append(torch.stack(states, 1).flatten(0, 1))
        parts.setdefault("target", []).append(torch.stack(targets, 1).flatten(0, 1))
        parts.setdefault("t", []).append(ts.cpu().float().repeat(n))
        parts.setdefault("w", []).append(w.cpu().float().repeat_interleave(steps))
        parts.setdefault("row", []).append((torch.arange(n) + b0).repeat_interleave(steps))
        for key, v in cond_tensors(cond).items():
            parts.setdefault(key, []).append(v.cpu())
        bar.update(n)
    return {key: torch.cat(v).contiguous() for key, v in parts.items()}


def _estimate_bytes(family, spec: TrajectorySpec, prompts: list[str] | None, device) -> int:
    """Bytes of the whole folder: two tensors of the noise shape per state, the scalars, the conditioning."""
    numel = 1
    for d in family.noise_shape(1, spec.resolution)[1:]:
        numel *= d
    per_state = 2 * numel * torch.empty((), dtype=getattr(torch, spec.dtype)).element_size() + 4 + 4 + 8
    cond, _ = _conditions(family, spec, [0], prompts, device)
    return spec.num_trajectories * (spec.steps * per_state + cond.nbytes())


def write_trajectories(teacher_name: str, out: str | Path, num_trajectories: int, steps: int = 50,
                       w_min: float = 1.0, w_max: float = 4.0, shard_size: int = 64, batch_size: int = 64,
                       seed: int = 0, prompts_file: str | None = None, resolution: int | None = None,
                       dtype: str = "float32", overwrite: bool = False, device=None, progress: bool = True,
                       rank: int = 0, world: int = 1) -> Path:
    """Write (or complete) a trajectory folder; see the module docstring. Returns the folder.

    An existing folder of the same settings is completed (finished shards are kept); one of other settings, or any
    other non-empty folder, is refused unless ``overwrite``. Process ``rank`` of ``world`` writes the shards k with
    k % world == rank.
    """
    if num_trajectories < 1 or steps < 1 or shard_size < 1 or batch_size < 1:
        raise UserError("--num, --steps, --shard-size and --batch-size must be at least 1")
    if not (math.isfinite(w_min) and math.isfinite(w_max) and 0 < w_min <= w_max):
        raise UserError(f"the guidance range must satisfy 0 < w_min <= w_max, both finite, got [{w_min}, {w_max}]")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UserError(f"--dtype must be float32, float16 or bfloat16, got '{dtype}'")
    out = Path(out)
    device = device or torch.device("cpu")
    check_out_dir(out, overwrite=True)  # (a file in the way) before the teacher is loaded
    pipe = load_diffusers_pipeline(teacher_name)
    family = family_of(pipe, teacher_name)
    if resolution is not None:
        family.check_resolution(resolution)
        family = family_of(pipe, teacher_name, resolution=resolution)
    if family.guidance_input is not None:
        raise UserError(f"teacher '{teacher_name}' is guidance-distilled (its CFG is an input of one pass already); "
                        "adapter guidance distillation is for teachers whose CFG takes two passes")
    prompts = None
    if family.classes is None:
        if not prompts_file:
            raise UserError(f"teacher '{teacher_name}' takes prompts: pass --prompts FILE (one prompt per line)")
        prompts = PromptFile(prompts_file).prompts
    elif prompts_file:
        raise UserError(f"teacher '{teacher_name}' is class-conditional: drop --prompts")
    net = family.network
    resolution = family.resolution
    spec = TrajectorySpec(teacher=teacher_name, fingerprint=base_fingerprint(net), network_class=type(net).__name__,
                          num_trajectories=num_trajectories, steps=steps, w_min=float(w_min), w_max=float(w_max),
                          shard_size=shard_size, seed=seed, dtype=dtype, resolution=int(resolution),
                          prompts=str(prompts_file or ""))
    if is_trajectory_folder(out) and not overwrite:
        old = read_spec(out)
        if old != spec:
            diff = [f"{f.name} {getattr(old, f.name)!r} -> {getattr(spec, f.name)!r}" for f in fields(spec)
                    if getattr(old, f.name) != getattr(spec, f.name)]
            raise UserError(f"'{out}' holds trajectories of other settings ({'; '.join(diff)}); rerun with the "
                            "same arguments to complete it, or choose another --out (or --overwrite)")
    else:
        check_out_dir(out, overwrite)
        if rank == 0 and overwrite and out.is_dir():
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    header = out / HEADER_FILE
    if not header.is_file():  # every rank writes the same header atomically: no rank waits for another
        tmp = out / f".{HEADER_FILE}.{rank}.tmp"
        tmp.write_text(json.dumps(asdict(spec), indent=2) + "\n")
        os.replace(tmp, header)
    pipe.to(device)
    teacher = family.denoiser(net.requires_grad_(False).eval())
    mine = [k for k in range(spec.num_shards) if k % world == rank]
    todo = [k for k in mine if not shard_ok(out, spec, k)]
    mine_count, todo_count = (sum(len(spec.shard_range(k)) for k in ks) for ks in (mine, todo))
    if rank == 0:
        size = _estimate_bytes(family, spec, prompts, device)
        print(f"{spec.num_trajectories} trajectories x {steps} states in {spec.num_shards} shards, about "
              f"{size / 2**20:.1f} MiB; {todo_count} trajectories to write on this "
              f"process ({world} process(es))", file=sys.stderr)
    bar = tqdm(total=mine_count, initial=mine_count - todo_count, disable=not progress, desc=f"trajectories r{rank}",
               dynamic_ncols=True)
    for k in todo:
        tmp = out / f".{shard_name(k)}.tmp"
        tensors = _sample_shard(family, teacher, spec, k, prompts, batch_size, device, bar)
        save_file(tensors, str(tmp), metadata={"shard": str(k), "trajectories": str(len(spec.shard_range(k))),
                                               "spec": spec.digest()})
        os.replace(tmp, out / shard_name(k))
    bar.close()
    return out


