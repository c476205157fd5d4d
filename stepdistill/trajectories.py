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
from .errors import DataError, UserError
from .inputs import Fields, check_tensors, read_json, safetensors_header

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


STATE_DTYPES = ("float32", "float16", "bfloat16")


def read_spec(folder: str | Path) -> TrajectorySpec:
    """The header of a trajectory folder, every field typed and in range; DataError if it is missing or bad."""
    path = Path(folder) / HEADER_FILE
    try:
        f = Fields(read_json(path, "trajectory header"), path)
        w_min = f.number("w_min", 0.0)
        return TrajectorySpec(teacher=f.str("teacher"), fingerprint=f.str("fingerprint"),
                              network_class=f.str("network_class"), num_trajectories=f.int("num_trajectories", 1),
                              steps=f.int("steps", 1, 10_000), w_min=w_min, w_max=f.number("w_max", w_min),
                              shard_size=f.int("shard_size", 1), seed=f.int("seed", 0),
                              dtype=f.str("dtype", STATE_DTYPES), resolution=f.int("resolution", 1),
                              prompts=f.str("prompts", default=""))
    except UserError as e:
        raise DataError(f"'{folder}' is not a readable trajectory folder ({e}); write one with `stepdistill "
                        "trajectories`") from None


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

    Every shard is checked when the dataset is built: a missing, unfinished or foreign shard, or one whose tensors
    (from its header: names, dtypes, shapes) do not fit the folder's header, is a DataError naming it. Items are read
    from the shard files on demand (safetensors slices), never all at once, and a state or target that is not finite
    is a DataError naming its shard when it is read.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        self.counts = []
        self.state_shape: tuple[int, ...] | None = None
        self.cond_specs: dict[str, tuple[str, tuple[int, ...]]] | None = None
        for k in range(self.spec.num_shards):
            if not shard_ok(self.folder, self.spec, k):
                what = "is missing" if not (self.folder / shard_name(k)).is_file() else \
                    "does not belong to this folder's header (another run, or a damaged file)"
                raise DataError(f"trajectory folder '{folder}': {shard_name(k)} {what}; rerun `stepdistill "
                                "trajectories` with the arguments of its header to complete it")
            self._check_shard(k)
            self.counts.append(len(self.spec.shard_range(k)) * self.spec.steps)
        self._files: dict[int, Any] = {}

    def _check_shard(self, k: int) -> None:
        """The shard's tensors against the header: its trajectories x steps states of one shape and dtype, the
        per-trajectory conditioning of one layout (taken from the first shard)."""
        path = self.folder / shard_name(k)
        try:
            found = safetensors_header(path, "trajectory shard")
            n = len(self.spec.shard_range(k))
            states = n * self.spec.steps
            if "x_t" not in found or not found["x_t"][1] or found["x_t"][1][0] != states:
                raise UserError(f"'{path}' holds no 'x_t' of {states} states")
            if self.state_shape is None:
                self.state_shape = found["x_t"][1][1:]
                self.cond_specs = {key: (d, s[1:]) for key, (d, s) in found.items() if key.startswith("cond.")}
            want = {"x_t": (self.spec.dtype, (states, *self.state_shape)),
                    "target": (self.spec.dtype, (states, *self.state_shape)),
                    "t": ("float32", (states,)), "w": ("float32", (states,)), "row": ("int64", (states,)),
                    **{key: (d, (n, *s)) for key, (d, s) in self.cond_specs.items()}}
            check_tensors(found, want, f"trajectory shard '{path}'")
            labels = found.get("cond.class_labels")
            if labels is not None and labels[0] != "int64":
                raise UserError(f"'{path}': class labels must be int64, got {labels[0]}")
        except UserError as e:
            raise DataError(f"trajectory folder '{self.folder}': {e}; rerun `stepdistill trajectories` to rewrite "
                            "it") from None

    def max_class_label(self) -> int | None:
        """The largest class label the trajectories were sampled at (None for prompts): read from the shards'
        small per-trajectory label tensors, so a label beyond the teacher's classes is refused before training."""
        if "cond.class_labels" not in (self.cond_specs or {}):
            return None
        return max(int(self._file(k).get_tensor("cond.class_labels").max()) for k in range(self.spec.num_shards))

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
        if not 0 <= row < len(self.spec.shard_range(k)) or not all(torch.isfinite(v).all() for v in item.values()):
            raise DataError(f"trajectory folder '{self.folder}': state {j} of {shard_name(k)} is damaged (not finite, "
                            "or of no trajectory of the shard); rerun `stepdistill trajectories` to rewrite it")
        for key in f.keys():
            if key.startswith("cond."):
                item[key] = f.get_slice(key)[row:row + 1][0]
        return {key: v.float() if v.is_floating_point() else v for key, v in item.items()}
