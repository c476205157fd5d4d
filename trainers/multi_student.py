"""Multi-student distillation (MSD; Song et al., "Multi-student Diffusion Distillation for Better One-step
Generators", 2024).

K one-step (or few-step) students, each owning a part of the conditioning, are each distilled from the same teacher
with DMD2's losses (imported from :mod:`.dmd2` and the shared score-distillation core, not re-written here); at
inference a router sends each condition to its student (:class:`~stepdistill.pipelines.MultiStudentPipeline`).

Partition: class labels in contiguous ranges (or ``class_partition`` / a ``partition_file``); prompts by k-means on
the teacher's L2-normalised pooled text embeddings (mean token embedding for SD 1.5 / 2.x), fitted when the run is
built (deterministic in ``kmeans_seed``; stored in the checkpoints and the export's router.json), or a user's file.

Stages (``stage``, changed with ``train --allow-changes``): ``score_matching`` (a student of another architecture,
``student_config``, regresses the teacher's denoiser outputs on noised real data of its partition), then
``distribution_matching`` (DMD2), then ``adversarial`` (DMD2's GAN term, with the DM term weighted by ``dm_weight``;
0 = the GAN term alone). During score matching the fake scores already follow the students' samples, so the DM
stage starts with fitted fake scores.

Which student trains when: one process trains its students in turn, in blocks of one student update and its
``fake_updates_per_student`` fake-score updates. With W processes the students are dealt out to the ranks (rank r
trains ``train_students[r::W]``; with more ranks than students, W/K ranks train each student as a data-parallel
group), so ``accelerate launch --num_processes K`` trains K students at once: each student (and its own fake score)
is a part of its phase that only the ranks training it synchronise (``Phase.parts``), so ranks training different
students never wait for each other's gradients. Fake scores: one per student (each
student is distilled on its own, as in the paper) or one ``shared`` network conditioned as the teacher is: since
every condition has one owner, a conditional fake score models each student's distribution at its own conditions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.batch import Batch
from stepdistill.conditioning import Cond
from stepdistill.errors import ConfigError, UserError, first_line
from stepdistill.inputs import read_json
from stepdistill.pipelines.export import StudentSpec
from stepdistill.pipelines.folders import resolve_pipeline_path
from stepdistill.pipelines.multi_student import (
    ROUTER_FILE,
    Router,
    check_class_partition,
    contiguous_partition,
    kmeans_partition,
    prompt_features,
    read_router,
)

from . import dmd2
from .base import Method, Phase, Setup
from .dmd2 import DMD2Config, GANHead, StudentNets
from .score_distillation import ScoreContext, build_fake_score, build_student, score_student_spec

STAGES = ("score_matching", "distribution_matching", "adversarial")
FAKE_SCORES = ("per_student", "shared")


@dataclass
class MultiStudentConfig(DMD2Config):
    """The multi-student method's method_args: DMD2's keys (each student is trained with them), and these."""

    # Number of students K.
    num_students: int = 4
    # Classes of each student, e.g. [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]; [] = contiguous ranges of (nearly) equal
    # size. Class-conditional teachers only.
    class_partition: list[list[int]] = field(default_factory=list)
    # A JSON file with the partition: {"classes": [[0, 1, 2], ...]} or, for prompts, {"prompts": {"a prompt": 0,
    # ...}} giving every prompt of the data source its student (a new prompt is routed to the student whose
    # prompts' mean feature is nearest). "" = class ranges / k-means.
    partition_file: str = ""
    # Seed of the k-means clustering of the prompts (10 restarts).
    kmeans_seed: int = 0
    # "per_student": one fake score per student (each distilled on its own, as the paper); "shared": one fake score
    # for all, conditioned as the teacher (a LoRA fake score, fake_score_lora_rank > 0, is always shared).
    fake_score: str = "per_student"
    # Training stage: score_matching (students regress the teacher's outputs on noised real data of their part;
    # for students of another architecture), distribution_matching (DMD2) or adversarial (DMD2's GAN term, which
    # needs gan_weight_student / gan_weight_critic > 0 from the run's start so that the heads exist).
    stage: str = "distribution_matching"
    # The students this run (stage) trains, e.g. [2] to add training to one; [] = all.
    train_students: list[int] = field(default_factory=list)


def check_msd_config(c: MultiStudentConfig, T: int, flow: bool) -> None:
    """ConfigError naming the first key out of its range (DMD2's included)."""
    dmd2.check_dmd2_config(c, T, flow)
    if c.num_students < 1:
        raise ConfigError("method_args.num_students must be >= 1")
    if c.fake_score not in FAKE_SCORES:
        raise ConfigError(f"method_args.fake_score must be one of {', '.join(FAKE_SCORES)}, got {c.fake_score!r}")
    if c.fake_score == "per_student" and c.fake_score_lora_rank > 0:
        raise ConfigError("method_args.fake_score=per_student needs full fake scores; a LoRA fake score "
                          "(fake_score_lora_rank > 0) is one network: set fake_score=shared")
    if c.stage not in STAGES:
        raise ConfigError(f"method_args.stage must be one of {', '.join(STAGES)}, got {c.stage!r}")
    if c.stage == "adversarial" and not dmd2.uses_gan(c):
        raise ConfigError("method_args.stage=adversarial needs gan_weight_student / gan_weight_critic > 0 (set "
                          "from the run's start, so that the GAN heads exist)")
    bad = [k for k in c.train_students if not 0 <= k < c.num_students]
    if bad or len(set(c.train_students)) != len(c.train_students):
        raise ConfigError(f"method_args.train_students must be distinct students in [0, {c.num_students - 1}], "
                          f"got {list(c.train_students)}")
    if c.class_partition and c.partition_file:
        raise ConfigError("set method_args.class_partition or partition_file, not both")


def owners(trained: list[int], world: int) -> dict[int, list[int]]:
    """The ranks that train each of the ``trained`` students: dealt out in turn (rank r trains ``trained[r::world]``),
    or with more ranks than students, ``world / len(trained)`` ranks each."""
    if world <= len(trained):
        return {k: [i % world] for i, k in enumerate(trained)}
    if world % len(trained):
        raise ConfigError(f"{world} processes cannot share {len(trained)} trained students evenly: launch a "
                          f"number of processes that divides {len(trained)} or is a multiple of it")
    return {k: [r for r in range(world) if r % len(trained) == i] for i, k in enumerate(trained)}


class MultiStudentMethod(Method):
    """Multi-student distillation (see the module docstring): K students with explicit handles, each trained with
    DMD2's losses (:func:`stepdistill.trainers.dmd2.student_loss` / ``fake_score_loss`` called for student k)."""

    name = "msd"
    Config = MultiStudentConfig
    phase_names = ("student", "fake_score")
    # Its students live in ModuleLists that the sharding does not unit-wrap yet.
    shardable = False
    images_needed_for = dmd2.DMD2Method.images_needed_for
    stage_changes = dmd2.DMD2Method.stage_changes + ("stage", "train_students")

    @classmethod
    def check_stage_change(cls, saved: dict[str, Any], cfg: MultiStudentConfig, lr_schedules: dict[str, str]) -> None:
        dmd2.check_stage_change(saved, cfg, lr_schedules)
        for key in ("num_students", "fake_score", "kmeans_seed", "partition_file"):
            if saved.get(key, getattr(cfg, key)) != getattr(cfg, key):
                raise ConfigError(f"method_args.{key} cannot change when continuing a run; start a new run")

    def __init__(self, setup: Setup, cfg: MultiStudentConfig):
        super().__init__(setup, cfg)
        c = cfg
        self.teacher = setup.teacher
        self.classes = self.family.classes
        self.data = setup.data
        check_msd_config(c, self.teacher.num_train_timesteps, self.teacher.is_flow)
        self.register_buffer("_t_grid", dmd2.timestep_grid(c, self.teacher), persistent=False)
        self.lora = c.fake_score_lora_rank > 0
        # 1. The students (copies of the teacher network, or of another size), then the fake scores: one per
        # student, one shared, or LoRA adapters on the teacher network.
        subfolders = self._init_subfolders(c)
        self.students = nn.ModuleList(build_student(self.family, self.teacher.model, c, subfolders[k])
                                      for k in range(c.num_students))
        self.fake_scores = nn.ModuleList()
        if build_fake_score(self.family, self.teacher, c) is not None:  # (with LoRA: the adapters, added once)
            n = c.num_students if c.fake_score == "per_student" else 1
            self.fake_scores.extend(self.family.denoiser(copy.deepcopy(self.teacher.model).requires_grad_(True))
                                    for _ in range(n))
        # 2. A GAN head on each fake score's features.
        if dmd2.uses_gan(c):
            nets = [self.teacher.model] if self.lora else [f.model for f in self.fake_scores]
            self.gan_heads = nn.ModuleList(GANHead(self.family.feature_channels(net), c.gan_head_channels)
                                           for net in nets)
        else:
            self.gan_heads = None
        # 3. Who owns which condition; stored with the run, so a resumed run routes as the one it continues.
        self.router, self._pool, self._prompt_owner = self._make_partition()
        if self.classes is not None:
            self.register_buffer("_class_owner", torch.as_tensor(self.router.class_to_student), persistent=False)
        else:
            self.register_buffer("router_centroids", torch.as_tensor(self.router.centroids, dtype=torch.float64))
        # 4. Which students this rank trains, and with which ranks.
        self._ranks = owners(list(c.train_students) or list(range(c.num_students)), self.world.size)
        self._owned = [k for k, ranks in self._ranks.items() if self.world.rank in ranks]

    # --- construction -----------------------------------------------------------------------------------------------
    def _init_subfolders(self, c: MultiStudentConfig) -> list[str | None]:
        """The folder of each student's initial network in ``student_init``: a multi-student export gives each
        student its own (same K), any other pipeline the same network to all."""
        if not c.student_init:
            return [None] * c.num_students
        try:
            path = Path(resolve_pipeline_path(c.student_init))
        except Exception:  # noqa: BLE001 - reported by the loader with its own message
            return [None] * c.num_students
        if not (path / ROUTER_FILE).is_file():
            return [None] * c.num_students
        try:
            _, subs = read_router(path)
        except UserError as e:
            raise ConfigError(f"method_args.student_init: {e}") from None
        if len(subs) != c.num_students:
            raise ConfigError(f"method_args.student_init: '{c.student_init}' holds {len(subs)} students, this run "
                              f"has num_students={c.num_students}")
        return subs

    def _make_partition(self) -> tuple[Router, list[list[str]] | None, dict[str, int] | None]:
        """(router, prompts of each student, owner of each data prompt); the prompt parts are None for classes."""
        c: MultiStudentConfig = self.cfg
        K = c.num_students
        given = None
        if c.partition_file:
            try:
                given = read_json(c.partition_file, "partition file")
            except UserError as e:
                raise ConfigError(f"method_args.partition_file: {e}") from None
            if not {"classes", "prompts"} & set(given):
                raise ConfigError(f"method_args.partition_file '{c.partition_file}': expected "
                                  '{"classes": [[...], ...]} or {"prompts": {"text": student, ...}}')
            if self.classes is not None and "classes" not in given:
                raise ConfigError(f"method_args.partition_file '{c.partition_file}' gives prompts, but this teacher "
                                  'is class-conditional: {"classes": [[0, 1, 2], ...]}')
        if self.classes is not None:
            C = self.classes.num_classes
            if K > C:
                raise ConfigError(f"method_args.num_students={K} exceeds the teacher's {C} classes; use at most {C}")
            parts = (given or {}).get("classes") or list(c.class_partition) or contiguous_partition(C, K)
            if len(parts) != K:
                raise ConfigError(f"the class partition has {len(parts)} parts for num_students={K}")
            try:
                owner = check_class_partition([list(map(int, p)) for p in parts], C, "the class partition")
            except (ValueError, TypeError) as e:
                raise ConfigError(first_line(e)) from None
            return Router(K, class_to_student=owner), None, None

        prompts = self.data.prompts
        if not prompts:
            raise ConfigError(f"the multi-student method partitions prompts, and data source '{self.data.source}' "
                              "has none: use a prompt file or captioned images")
        unique = list(dict.fromkeys(prompts))
        feats = self._prompt_features(unique)
        if given is not None:
            mapping = given.get("prompts")
            if not isinstance(mapping, dict):
                raise ConfigError(f"method_args.partition_file '{c.partition_file}' gives classes, but this teacher "
                                  'takes prompts: {"prompts": {"a prompt": 0, ...}}')
            missing = [p for p in unique if p not in mapping]
            if missing:
                raise ConfigError(f"method_args.partition_file: prompt {missing[0]!r} of the data source has no "
                                  "student; give every prompt one")
            owner = np.asarray([int(mapping[p]) for p in unique])
        else:
            if K > len(unique):
                raise ConfigError(f"method_args.num_students={K} exceeds the {len(unique)} distinct prompts of the "
                                  "data source; use fewer students")
            owner, _ = kmeans_partition(feats, K, c.kmeans_seed)
        empty = [k for k in range(K) if not (owner == k).any()]
        bad = [int(k) for k in owner if not 0 <= k < K]
        if bad or empty:
            raise ConfigError(f"the prompt partition gives student {(bad or empty)[0]}, but students are "
                              f"0-{K - 1} and each needs at least one prompt")
        centroids = np.stack([feats[owner == k].mean(axis=0) for k in range(K)])
        pool = [[p for p, o in zip(unique, owner) if o == k] for k in range(K)]
        return Router(K, centroids=centroids), pool, {p: int(o) for p, o in zip(unique, owner)}

    @torch.no_grad()
    def _prompt_features(self, prompts: list[str], chunk: int = 64) -> np.ndarray:
        feats = [prompt_features(self.family.prompt_cond(prompts[i: i + chunk])[0]).cpu()
                 for i in range(0, len(prompts), chunk)]
        return torch.cat(feats).double().numpy()

    # --- one student's handles --------------------------------------------------------------------------------------
    def student_at(self, step: int) -> int:
        """The student this rank trains at loop step ``step``: its students in turn, a block of
        ``fake_updates_per_student`` steps (one student update and its fake-score updates) each."""
        return self._owned[(step // self.cfg.fake_updates_per_student) % len(self._owned)]

    def nets(self, k: int, gan: bool) -> StudentNets:
        """Student ``k``'s networks: its student, its fake score (or the shared one) and, with ``gan``, its head."""
        j = k if len(self.fake_scores) > 1 else 0
        fake = self.fake_scores[j] if len(self.fake_scores) else self.teacher
        head = self.gan_heads[j] if gan and self.gan_heads is not None else None
        return StudentNets(self.students[k], fake, head)

    def context(self) -> ScoreContext:
        return ScoreContext(self.teacher, self.lora, self._t_grid, list(self.cfg.student_timesteps),
                            self.family.noise_shape)

    def _owns(self, batch: Batch, k: int) -> torch.Tensor:
        """Which items of the batch belong to student ``k``'s part (bool, per item)."""
        device = self._t_grid.device
        if self.classes is not None:
            if batch.labels is None:
                return torch.zeros(batch.size, dtype=torch.bool, device=device)
            return self._class_owner[batch.labels.to(device).clamp(0, len(self._class_owner) - 1)] == k
        return torch.tensor([self._prompt_owner.get(p, -1) == k for p in batch.prompts], device=device)

    def _conditioning(self, batch: Batch, k: int, own: torch.Tensor | None) -> tuple[Cond, Cond, int]:
        """Conditions of student ``k``'s part, as many as the batch holds: those of its own items (``own``) first,
        when real data is used (the GAN term, score matching), the rest drawn uniformly from its part."""
        n, device = batch.size, self._t_grid.device
        if self.classes is not None:
            part = torch.as_tensor(self.router.classes_of(k), device=device)
            first = batch.labels.to(device)[own] if own is not None and batch.labels is not None else part[:0]
            drawn = part[torch.randint(0, len(part), (n - len(first),), device=device)]
            labels = torch.cat([first, drawn])
            return self.classes.cond(labels), self.classes.uncond(n, device), n
        pool = self._pool[k]
        first = [p for p, o in zip(batch.prompts, own.tolist()) if o] if own is not None else []
        drawn = [pool[i] for i in torch.randint(0, len(pool), (n - len(first),)).tolist()]
        cond, uncond = self.family.prompt_cond(first + drawn, device)
        return cond, uncond, n

    # --- the losses --------------------------------------------------------------------------------------------------
    def score_matching_loss(self, nets: StudentNets, batch: Batch, own: torch.Tensor,
                            cond: Cond) -> tuple[torch.Tensor, dict[str, float]]:
        """Teacher score matching: the student, as a denoiser, regresses the teacher's raw outputs (no CFG) on real
        data of its part noised to any level."""
        ctx = self.context()
        # 1. Real data of the student's part with its conditions (the whole batch, with conditions of the part, on
        # the rare steps where it holds none).
        m = int(own.sum())
        x0 = batch.real[own] if m else batch.real
        cond = cond.index(slice(0, len(x0)))
        # 2. Noised to t ~ U[0, T).
        t = ctx.draw_timesteps(len(x0), 0.0, 1.0, x0.device)
        x_t = self.teacher.add_noise(x0, torch.randn_like(x0), t)
        # 3. The teacher's raw output is the target.
        with torch.no_grad(), ctx.teacher_only():
            target = self.teacher.raw(x_t, t, cond)
        loss = F.mse_loss(nets.student.raw(x_t, t, cond).float(), target.float())
        return loss, {"score_matching_loss": loss.item(), "part_items": float(m)}

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c: MultiStudentConfig = self.cfg
        k = self.student_at(step)
        # The GAN term needs real images of the part in this batch; without any it waits for one.
        gan = c.stage == "adversarial" and self.data.has_images and bool(self._owns(batch, k).any())
        matching = phase == "student" and c.stage == "score_matching"
        own = self._owns(batch, k) if gan or c.stage == "score_matching" else None
        cond, uncond, n = self._conditioning(batch, k, own)
        nets = self.nets(k, gan)
        if matching:
            return self.score_matching_loss(nets, batch, own, cond)
        if phase == "student":
            return dmd2.student_loss(c, self.context(), nets, cond, uncond, n)
        if phase == "fake_score":
            return dmd2.fake_score_loss(c, self.context(), nets, cond, n, batch.real[own] if gan else None)
        raise ValueError(f"unknown phase {phase!r}")

    # --- the Method contract -----------------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        c: MultiStudentConfig = self.cfg
        fakes = self.teacher.model if self.lora else self.fake_scores
        heads = list(self.gan_heads.parameters()) if self.gan_heads is not None else []

        def trainable(m: nn.Module) -> list[nn.Parameter]:
            return [p for p in m.parameters() if p.requires_grad]

        student_parts = [(trainable(self.students[k]), ranks) for k, ranks in self._ranks.items()]
        fake_parts = None
        if len(self.fake_scores) > 1:  # one fake score (and head) per student, trained where the student is
            fake_parts = [(trainable(self.fake_scores[k]) + (trainable(self.gan_heads[k]) if heads else []), ranks)
                          for k, ranks in self._ranks.items()]
        return [
            Phase("student", trainable(self.students), every=c.fake_updates_per_student, cond=False,
                  real=c.stage == "score_matching", parts=student_parts),
            Phase("fake_score", trainable(fakes) + heads, cond=False, real=self.gan_heads is not None,
                  parts=fake_parts),
        ]

    def ema_network(self) -> nn.Module:
        return self.students

    def export_spec(self) -> StudentSpec:
        c: MultiStudentConfig = self.cfg
        trained, guidance = dmd2.card_facts(c)
        parts = ([f"student {k}: classes {self.router.classes_of(k)}" for k in range(c.num_students)]
                 if self.classes is not None else
                 [f"student {k}: {len(p)} prompts, e.g. {p[0]!r}" for k, p in enumerate(self._pool)])
        spec = score_student_spec(self.name, "", f"multi-student distillation, {c.num_students} students each "
                                  f"trained with {trained}", guidance, self.family, self.teacher, self.teacher_name,
                                  [s.model for s in self.students], c.student_timesteps, c.sample_prompts,
                                  router=self.router)
        spec.title = f"Multi-student distillation: {c.num_students} students ({len(c.student_timesteps)}-step)"
        arg = "class_labels=[0, 1, 2]" if self.classes is not None else '["a photo of a cat"]'
        when = ", ".join(f"{k}={v}" for k, v in spec.sampling.items())
        spec.usage = ("from stepdistill.pipelines import load_pipeline\npipe = load_pipeline(\"{folder}\")\n"
                      f"images = pipe({arg}, {when}).images")
        spec.card_lines = ["Each condition goes to the student that owns it (router.json):", "",
                           *[f"- {p}" for p in parts]]
        return spec
