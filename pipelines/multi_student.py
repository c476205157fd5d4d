"""Multi-student pipelines: K students, each owning a part of the conditioning, and a router between them.

Folder layout written by :meth:`MultiStudentPipeline.save_pretrained`::

    out/
      model_index.json, unet/ (or transformer/), scheduler/, ...   student 0 as a stock pipeline folder
      student_1/ ... student_{K-1}/                                  the other students' networks (save_pretrained)
      router.json                                                    who owns what (see :class:`Router`)

So ``DiffusionPipeline.from_pretrained(out)`` loads student 0 alone, and ``load_pipeline(out)`` (or
:meth:`MultiStudentPipeline.from_pretrained`) loads all of them with the router.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from sklearn.cluster import KMeans

from stepdistill.errors import UserError, first_line
from stepdistill.inputs import Fields, inside, read_json

from .families import family_of
from .folders import load_diffusers_pipeline, rebuild_pipeline

ROUTER_FILE = "router.json"
# More students than this in a router file is taken for a damaged file.
MAX_STUDENTS = 1024


def prompt_features(cond) -> torch.Tensor:
    """(B, D) float32, L2-normalised features of prompt conditionings that prompts are clustered and routed by: the
    pooled text embedding where the family has one (SD3 / Flux ``pooled_projections``, SDXL ``text_embeds``), else
    the mean of the token embeddings (SD 1.5 / 2.x)."""
    if cond.pooled_projections is not None:
        f = cond.pooled_projections
    elif cond.added_cond_kwargs and "text_embeds" in cond.added_cond_kwargs:
        f = cond.added_cond_kwargs["text_embeds"]
    else:
        f = cond.encoder_hidden_states.mean(dim=1)
    f = f.float().flatten(1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class Router:
    """Which student owns a condition.

    Args:
        num_students: K.
        class_to_student: for class-conditional students, the owner of each class (every class has exactly one).
        centroids: for prompt-conditioned students, one (D,) centroid per student in :func:`prompt_features` space;
            a prompt goes to the nearest (Euclidean) centroid.
    """

    num_students: int
    class_to_student: list[int] | None = None
    centroids: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "classes" if self.class_to_student is not None else "prompts"

    def classes_of(self, k: int) -> list[int]:
        return [c for c, s in enumerate(self.class_to_student) if s == k]

    def route_labels(self, labels) -> np.ndarray:
        """The owner of each class label; ValueError for a label no student owns."""
        labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
        bad = [int(v) for v in labels if not 0 <= v < len(self.class_to_student)]
        if bad:
            raise ValueError(f"no student owns class {bad[0]} (the students own classes 0-"
                             f"{len(self.class_to_student) - 1})")
        return np.asarray(self.class_to_student, dtype=np.int64)[labels.astype(np.int64)]

    def route_features(self, feats: torch.Tensor) -> np.ndarray:
        """The owner of each row of :func:`prompt_features`: the nearest centroid."""
        c = torch.as_tensor(self.centroids, dtype=torch.float32, device=feats.device)
        return torch.cdist(feats.float(), c).argmin(dim=1).cpu().numpy()

    def to_json(self) -> dict:
        out: dict[str, Any] = {"num_students": self.num_students, "kind": self.kind}
        if self.class_to_student is not None:
            out["class_to_student"] = [int(s) for s in self.class_to_student]
        else:
            out["centroids"] = np.asarray(self.centroids, dtype=np.float64).tolist()
        return out

    @classmethod
    def from_json(cls, data: dict, path: str | Path = ROUTER_FILE) -> Router:
        """The router a router.json holds, every field checked (UserError naming the file and the field)."""
        f = Fields(data, path)
        k = f.int("num_students", 1, MAX_STUDENTS)
        if f.str("kind", ("classes", "prompts")) == "classes":
            owner = f.ints("class_to_student", 0, k - 1)
            empty = [j for j in range(k) if j not in owner]
            if empty:
                raise UserError(f"'{path}': student {empty[0]} owns no class of 'class_to_student'")
            return cls(k, class_to_student=owner)
        rows = data.get("centroids")
        if not isinstance(rows, list) or len(rows) != k or not rows:
            raise UserError(f"'{path}': field 'centroids' must hold {k} rows, one per student")
        centroids = [Fields({"row": r}, path).numbers("row") for r in rows]
        if len({len(r) for r in centroids}) != 1 or not centroids[0]:
            raise UserError(f"'{path}': the rows of 'centroids' must have one and the same non-zero length")
        return cls(k, centroids=np.asarray(centroids, dtype=np.float64))


def read_router(folder: str | Path) -> tuple[Router, list[str]]:
    """(router, the students' network folders) of a multi-student export, every field of its router.json checked and
    every folder inside the export (student 0's network is the export's own)."""
    folder = Path(folder)
    path = folder / ROUTER_FILE
    info = read_json(path, "router file")
    router = Router.from_json(info, path)
    subfolders = info.get("subfolders")
    if not isinstance(subfolders, list) or len(subfolders) != router.num_students:
        raise UserError(f"'{path}': field 'subfolders' must list one folder per student ({router.num_students})")
    for sub in subfolders:
        if not inside(folder, sub, f"'{path}': subfolder").is_dir():
            raise UserError(f"'{path}': student folder '{sub}' does not exist in '{folder}'")
    return router, list(subfolders)


def check_class_partition(parts: list[list[int]], num_classes: int, what: str) -> list[int]:
    """The owner of each class from ``parts`` (the classes of each student); ValueError naming the first class that
    no student or two students own, or an empty student."""
    owner = [-1] * num_classes
    for k, part in enumerate(parts):
        if not part:
            raise ValueError(f"{what}: student {k} owns no class")
        for c in part:
            if not 0 <= int(c) < num_classes:
                raise ValueError(f"{what}: class {c} of student {k} is not one of the teacher's classes "
                                 f"0-{num_classes - 1}")
            if owner[int(c)] != -1:
                raise ValueError(f"{what}: class {c} is given to students {owner[int(c)]} and {k}; give each class "
                                 "to exactly one student")
            owner[int(c)] = k
    missing = [c for c, s in enumerate(owner) if s == -1]
    if missing:
        raise ValueError(f"{what}: class {missing[0]} has no student; give every class to exactly one student")
    return owner


def contiguous_partition(num_classes: int, num_students: int) -> list[list[int]]:
    """Classes split into ``num_students`` contiguous ranges of (nearly) equal size, the larger ones first."""
    return [list(map(int, r)) for r in np.array_split(np.arange(num_classes), num_students)]


def kmeans_partition(features: np.ndarray, num_students: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(owner of each row, centroids) of k-means (scikit-learn, 10 restarts, ``seed``) on feature rows."""
    km = KMeans(n_clusters=num_students, n_init=10, random_state=seed).fit(np.asarray(features, dtype=np.float64))
    return km.labels_.astype(np.int64), km.cluster_centers_


def _gather(parts: list[tuple[np.ndarray, Any]], n: int) -> Any:
    """Per-student outputs (indices, images) back in the caller's order (tensor, array or list of images)."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        out = first.new_empty((n, *first.shape[1:]))
        for idx, imgs in parts:
            out[torch.as_tensor(idx, device=out.device)] = imgs
        return out
    if isinstance(first, np.ndarray):
        out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
        for idx, imgs in parts:
            out[idx] = imgs
        return out
    out = [None] * n
    for idx, imgs in parts:
        for i, im in zip(idx, imgs):
            out[int(i)] = im
    return out


class MultiStudentPipeline:
    """K student pipelines that share every component but their network, and a :class:`Router`.

    A call takes the conditions of a batch (class labels, or prompts), sends each to its student, runs every student
    once on all of its conditions (one network call per student per sampling step, not one per sample) and returns
    the images in the caller's order. Every other argument goes to each student's pipeline; pass one generator per
    sample (a list) for results that do not depend on how the batch is grouped.

    Args:
        students: one pipeline per student (same class, same components but the network).
        router: who owns which condition.
    """

    def __init__(self, students: list, router: Router):
        if len(students) != router.num_students:
            raise ValueError(f"{len(students)} student pipelines for a router of {router.num_students} students")
        self.students, self.router = list(students), router
        self._family = family_of(self.students[0], "multi-student pipeline")

    # --- what callers read from a pipeline --------------------------------------------------------------------------
    @property
    def scheduler(self):
        return self.students[0].scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        for p in self.students:
            p.scheduler = value

    @property
    def num_classes(self) -> int:
        return self.students[0].num_classes

    @property
    def network_attr(self) -> str:
        return self._family.network_attr

    @property
    def base_pipeline(self):
        """Student 0's pipeline (the others share its components but the network)."""
        return self.students[0]

    def __getattr__(self, name: str):
        # Components the students share (vae, text encoders, tokenizer, vae_scale_factor, ...) read from student 0.
        if name in ("students", "router", "_family"):
            raise AttributeError(name)
        return getattr(self.students[0], name)

    def to(self, *args, **kwargs) -> MultiStudentPipeline:
        for p in self.students:
            p.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        for p in self.students:
            p.set_progress_bar_config(**kwargs)

    # --- routing -----------------------------------------------------------------------------------------------------
    def route(self, conditions) -> np.ndarray:
        """The student of each condition (class labels or prompts)."""
        if self.router.kind == "classes":
            return self.router.route_labels(conditions)
        with torch.no_grad():
            cond, _ = self._family.prompt_cond(list(conditions))
        return self.router.route_features(prompt_features(cond))

    @torch.no_grad()
    def __call__(self, conditions=None, *, generator=None, latents=None, return_dict: bool = True, **kwargs):
        key = "class_labels" if self.router.kind == "classes" else "prompt"
        if conditions is None:
            conditions = kwargs.pop(key, None)
        if conditions is None:
            raise ValueError(f"pass the conditions to route ({key})")
        if isinstance(conditions, str):
            conditions = [conditions]
        items = list(torch.as_tensor(conditions).reshape(-1).tolist()) if key == "class_labels" else list(conditions)
        owners = self.route(items)
        if isinstance(generator, list) and len(generator) != len(items):
            raise ValueError(f"{len(generator)} generators for {len(items)} conditions")
        parts = []
        for k in sorted(set(owners.tolist())):
            idx = np.flatnonzero(owners == k)
            sub = dict(kwargs)
            sub["generator"] = [generator[i] for i in idx] if isinstance(generator, list) else generator
            if latents is not None:
                sub["latents"] = latents[torch.as_tensor(idx, device=latents.device)]
            chosen = [items[i] for i in idx]
            if key == "class_labels":
                res = self.students[k](torch.as_tensor(chosen, dtype=torch.long), **sub)
            else:
                res = self.students[k](prompt=chosen, **sub)
            parts.append((idx, res.images))
        images = _gather(parts, len(items))
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # --- files -------------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        out = Path(save_directory)
        self.students[0].save_pretrained(str(out), **kwargs)
        attr = self.network_attr
        subfolders = [attr]
        for k, pipe in enumerate(self.students[1:], start=1):
            getattr(pipe, attr).save_pretrained(str(out / f"student_{k}"), safe_serialization=True)
            subfolders.append(f"student_{k}")
        (out / ROUTER_FILE).write_text(json.dumps({**self.router.to_json(), "network_attr": attr,
                                                   "subfolders": subfolders}, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None) -> MultiStudentPipeline:
        path = Path(path)
        router, subfolders = read_router(path)
        base = load_diffusers_pipeline(str(path), device=device, dtype=dtype)
        family = family_of(base, str(path))
        if router.kind == "classes" and (family.classes is None
                                         or len(router.class_to_student) != family.classes.num_classes):
            have = "no classes" if family.classes is None else f"{family.classes.num_classes} classes"
            raise UserError(f"'{path / ROUTER_FILE}' routes {len(router.class_to_student)} classes, but the pipeline "
                            f"has {have}")
        attr = family.network_attr
        net_cls = type(getattr(base, attr))
        students = [base]
        arch = {k: v for k, v in getattr(base, attr).config.items() if not k.startswith("_")}
        for sub in subfolders[1:]:
            # Every student has student 0's architecture (the method builds them alike): a config that differs is
            # refused before a module is built from it.
            theirs = read_json(path / sub / "config.json", "student network config")
            if {k: v for k, v in theirs.items() if not k.startswith("_")} != arch:
                raise UserError(f"'{path / sub / 'config.json'}' describes another network than student 0's")
            try:
                net = net_cls.from_pretrained(str(path / sub), **({"torch_dtype": dtype} if dtype else {}))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load student '{sub}' of '{path}': {first_line(e)}") from None
            students.append(rebuild_pipeline(base, **{attr: net.to(base.device)}))
        return cls(students, router)

    @staticmethod
    def is_multi_student(path: str | Path) -> bool:
        return (Path(path) / ROUTER_FILE).is_file()
