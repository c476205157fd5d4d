"""CFG-guided sampling trajectories of a teacher, the training data of adapter guidance distillation (AGD): the
folder format and its reader (the writer, which samples a teacher, is :mod:`stepdistill.pipelines.trajectories`).

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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from .conditioning import Cond
from .errors import DataError

HEADER_FILE = "trajectories.json"


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
    """Whether ``path`` holds a trajectory folder's header."""
    return (Path(path) / HEADER_FILE).is_file()


def cond_tensors(cond: Cond) -> dict[str, torch.Tensor]:
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
    """The inverse of :func:`cond_tensors` (on a batch of items from :class:`TrajectoryDataset`)."""
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


def _shard_meta(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is a bad shard
        return None


def shard_ok(folder: Path, spec: TrajectorySpec, k: int) -> bool:
    """Whether shard ``k`` of ``folder`` is finished and belongs to ``spec``."""
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
            if not shard_ok(self.folder, self.spec, k):
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
