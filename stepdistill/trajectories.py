"""CFG-guided sampling trajectories of a teacher, the training data of adapter guidance distillation (AGD).

Each trajectory starts from its own seeded noise, with its own guidance scale w drawn uniformly from
[w_min, w_max], and follows the teacher's deterministic sampler (DDIM for DDPM-type schedules, Euler for flow
matching) on the teacher scheduler's ``steps``-step grid under CFG at w. Every state on the way is stored with what
the guided teacher predicted there: AGD then trains on the states the guided sampler really visits, not on
forward-noised data.

Folder layout::

    out/trajectories.json          the header: teacher + weight fingerprint, grid, w range, count, shapes
    out/shard_00000.safetensors    trajectories [0, shard_size), then shard_00001, ...

A shard holds, for its n trajectories of S states each, ``x_t`` (n*S, ...), ``t`` (n*S,), ``w`` (n*S,), ``target``
(n*S, ...: the guided raw network output, the teacher's own parameterisation), ``row`` (n*S,: the state's
trajectory within the shard) and ``cond.<field>`` (n, ...: the conditioning, one row per trajectory). Shards are
written whole (a temporary file renamed into place), so a killed writer leaves only finished shards and a rerun with
the same arguments continues with the missing ones. Under ``accelerate launch`` (or torchrun) rank r writes the
shards k with k % world_size == r.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import schedules as S
from .conditioning import Cond
from .errors import DataError, UserError

HEADER_FILE = "trajectories.json"
# Tests only: the writer dies (as if killed) when it starts its N-th shard (0-based) of this process.
_TEST_DIE_ENV = "STEPDISTILL_TEST_TRAJECTORIES_DIE_AT"


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


@dataclass
class TrajectorySpec:
    """What a trajectory folder holds (its header). Two runs with equal specs write identical shards."""

    teacher: str
    fingerprint: str  # of the teacher network's weights (stepdistill.pipelines.lora.base_fingerprint)
    network_class: str
    num_trajectories: int
    steps: int
    w_min: float
    w_max: float
    shard_size: int
    seed: int
    dtype: str
    resolution: int
    prompts: str = ""  # the prompt file of a text teacher ("" for class labels)

    @property
    def num_shards(self) -> int:
        return -(-self.num_trajectories // self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_trajectories))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def read_spec(folder: str | Path) -> TrajectorySpec:
    """The header of a trajectory folder; DataError if there is none."""
    path = Path(folder) / HEADER_FILE
    try:
        data = json.loads(path.read_text())
        return TrajectorySpec(**{f.name: data[f.name] for f in fields(TrajectorySpec) if f.name in data})
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"'{folder}' is not a trajectory folder ({HEADER_FILE} unreadable: {e}); write one with "
                        "`stepdistill trajectories`") from None


def is_trajectory_folder(path: str | Path) -> bool:
    return (Path(path) / HEADER_FILE).is_file()


# --- writing ---------------------------------------------------------------------------------------------------------
def _conditions(family, spec: TrajectorySpec, idx: list[int], prompts: list[str] | None,
                device: torch.device) -> tuple[Cond, Cond]:
    """(cond, uncond) of trajectories ``idx``: class i % num_classes, or prompt i % len(prompts)."""
    if family.classes is not None:
        labels = torch.tensor([i % family.classes.num_classes for i in idx], device=device)
        return family.classes.cond(labels), family.classes.uncond(len(idx), device)
    return family.prompt_cond([prompts[i % len(prompts)] for i in idx], device)


def _timesteps(family, teacher, steps: int, resolution: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler grid (network timesteps) as the pipeline sets it, and each step's next point (-1 for DDPM-type
    schedules, 0 for flow matching: the clean end)."""
    scheduler = family.pipe.scheduler
    if scheduler.config.get("use_dynamic_shifting", False):  # Flux-type: the shift depends on the token count
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h, w = family.noise_shape(1, resolution)[2:]
        c = scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
    else:
        scheduler.set_timesteps(steps, device="cpu")
    ts = scheduler.timesteps.to(device).float()
    end = torch.zeros(1, device=device) if teacher.is_flow else torch.full((1,), -1.0, device=device)
    return ts, torch.cat([ts[1:], end])


def _cond_tensors(cond: Cond) -> dict[str, torch.Tensor]:
    """A Cond's tensors as flat ``cond.<field>`` / ``cond.<field>.<key>`` entries."""
    out = {}
    for f in fields(Cond):
        v = getattr(cond, f.name)
        if isinstance(v, dict):
            out.update({f"cond.{f.name}.{k}": t for k, t in v.items()})
        elif v is not None:
            out[f"cond.{f.name}"] = v
    return out


def cond_from_tensors(batch: dict[str, Any]) -> Cond:
    """The inverse of :func:`_cond_tensors` (on a batch of items from :class:`TrajectoryDataset`)."""
    kwargs: dict[str, Any] = {}
    for key, v in batch.items():
        if not key.startswith("cond."):
            continue
        parts = key.split(".")
        if len(parts) == 3:
            kwargs.setdefault(parts[1], {})[parts[2]] = v
        else:
            kwargs[parts[1]] = v
    return Cond(**kwargs)


@torch.no_grad()
def _sample_shard(family, teacher, spec: TrajectorySpec, k: int, prompts: list[str] | None, batch_size: int,
                  device: torch.device, bar) -> dict[str, torch.Tensor]:
    """The tensors of shard ``k`` (see the module docstring)."""
    from stepdistill.trainers.data_stream import derive_seed

    dtype = getattr(torch, spec.dtype)
    ts, ts_next = _timesteps(family, teacher, spec.steps, spec.resolution, device)
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
        for key, v in _cond_tensors(cond).items():
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


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def write_trajectories(teacher_name: str, out: str | Path, num_trajectories: int, steps: int = 50,
                       w_min: float = 1.0, w_max: float = 4.0, shard_size: int = 64, batch_size: int = 64,
                       seed: int = 0, prompts_file: str | None = None, resolution: int | None = None,
                       dtype: str = "float32", overwrite: bool = False, device=None, progress: bool = True) -> Path:
    """Write (or complete) a trajectory folder; see the module docstring. Returns the folder.

    An existing folder of the same settings is completed (finished shards are kept); one of other settings, or any
    other non-empty folder, is refused unless ``overwrite``.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from stepdistill.families import family_of
    from stepdistill.pipelines import load_pipeline
    from stepdistill.pipelines.lora import base_fingerprint
    from stepdistill.utils import check_out_dir

    if num_trajectories < 1 or steps < 1 or shard_size < 1 or batch_size < 1:
        raise UserError("--num, --steps, --shard-size and --batch-size must be at least 1")
    if not 0 < w_min <= w_max:
        raise UserError(f"the guidance range must satisfy 0 < w_min <= w_max, got [{w_min}, {w_max}]")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UserError(f"--dtype must be float32, float16 or bfloat16, got '{dtype}'")
    out = Path(out)
    rank, world = _rank_world()
    if device is None:
        local = os.environ.get("LOCAL_RANK")
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() and local else
                              "cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(teacher_name)
    family = family_of(pipe, teacher_name, resolution=resolution)
    if family.guidance_input is not None:
        raise UserError(f"teacher '{teacher_name}' is guidance-distilled (its CFG is an input of one pass already); "
                        "adapter guidance distillation is for teachers whose CFG takes two passes")
    prompts = None
    if family.classes is None:
        if not prompts_file:
            raise UserError(f"teacher '{teacher_name}' takes prompts: pass --prompts FILE (one prompt per line)")
        from stepdistill.data import PromptFile

        prompts = PromptFile(prompts_file).prompts
    elif prompts_file:
        raise UserError(f"teacher '{teacher_name}' is class-conditional: drop --prompts")
    net = family.network
    if resolution is None:
        size = getattr(net.config, "sample_size", None)
        size = size if isinstance(size, int) else (size[0] if size else 64)
        resolution = size * getattr(pipe, "vae_scale_factor", 1)
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
            import shutil

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
    todo = [k for k in mine if not _shard_ok(out, spec, k)]
    mine_count, todo_count = (sum(len(spec.shard_range(k)) for k in ks) for ks in (mine, todo))
    if rank == 0:
        size = _estimate_bytes(family, spec, prompts, device)
        print(f"{spec.num_trajectories} trajectories x {steps} states in {spec.num_shards} shards, about "
              f"{size / 2**20:.1f} MiB; {todo_count} trajectories to write on this "
              f"process ({world} process(es))", file=sys.stderr)
    bar = tqdm(total=mine_count, initial=mine_count - todo_count, disable=not progress, desc=f"trajectories r{rank}",
               dynamic_ncols=True)
    die_after = int(os.environ.get(_TEST_DIE_ENV, "-1"))
    for n_done, k in enumerate(todo):
        tmp = out / f".{shard_name(k)}.tmp"
        if n_done == die_after:  # tests: a process killed while writing this shard (a half-written temporary file)
            tmp.write_bytes(b"\0" * 100)
            os._exit(137)
        tensors = _sample_shard(family, teacher, spec, k, prompts, batch_size, device, bar)
        save_file(tensors, str(tmp), metadata={"shard": str(k), "trajectories": str(len(spec.shard_range(k))),
                                               "spec": spec.digest()})
        os.replace(tmp, out / shard_name(k))
    bar.close()
    return out


def _shard_meta(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is a bad shard
        return None


def _shard_ok(folder: Path, spec: TrajectorySpec, k: int) -> bool:
    meta = _shard_meta(folder / shard_name(k))
    return bool(meta) and meta.get("spec") == spec.digest() and meta.get("shard") == str(k) and \
        meta.get("trajectories") == str(len(spec.shard_range(k)))


# --- reading ---------------------------------------------------------------------------------------------------------
class TrajectoryDataset(Dataset):
    """The states of a trajectory folder as items ``{"x_t", "t", "w", "target", "cond.<field>"...}``.

    Every shard is checked when the dataset is built (a missing, unfinished or foreign shard is a DataError naming
    the first bad one); items are read from the shard files on demand (safetensors slices), never all at once.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        self.counts = []
        for k in range(self.spec.num_shards):
            if not _shard_ok(self.folder, self.spec, k):
                what = "is missing" if not (self.folder / shard_name(k)).is_file() else \
                    "does not belong to this folder's header (another run, or a damaged file)"
                raise DataError(f"trajectory folder '{folder}': {shard_name(k)} {what}; rerun `stepdistill "
                                "trajectories` with the arguments of its header to complete it")
            self.counts.append(len(self.spec.shard_range(k)) * self.spec.steps)
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return sum(self.counts)

    def __getstate__(self) -> dict:  # open file handles do not cross into DataLoader workers
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def _file(self, k: int):
        if k not in self._files:
            from safetensors import safe_open

            self._files[k] = safe_open(str(self.folder / shard_name(k)), framework="pt")
        return self._files[k]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, j = divmod(int(i), self.spec.shard_size * self.spec.steps)
        f = self._file(k)
        item = {key: f.get_slice(key)[j:j + 1][0] for key in ("x_t", "t", "w", "target")}
        row = int(f.get_slice("row")[j:j + 1][0])
        for key in f.keys():
            if key.startswith("cond."):
                item[key] = f.get_slice(key)[row:row + 1][0]
        return {key: v.float() if v.is_floating_point() else v for key, v in item.items()}
