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
group), so ``accelerate launch --num_processes K`` trains K students at once. Fake scores: one per student (each
student is distilled on its own, as in the paper) or one ``shared`` network conditioned as the teacher is: since
every condition has one owner, a conditional fake score models each student's distribution at its own conditions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.conditioning import Cond
from stepdistill.errors import ConfigError, first_line
from stepdistill.pipelines.multi_student import (
    ROUTER_FILE,
    MultiStudentPipeline,
    Router,
    check_class_partition,
    contiguous_partition,
    kmeans_partition,
    prompt_features,
)

from .base import Phase
from .dmd2 import GAN_IMAGES_MSG, DMD2Config, DMD2Method

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


class MultiStudentMethod(DMD2Method):
    """Multi-student distillation (see the module docstring).

    The shared core and DMD2 work on ``self.student`` / ``self.fake_score`` / ``self.gan_head``; here those names
    are aliases of the active student's networks (plain attributes, not registered twice), switched before each
    loss, while the networks themselves live in ``students`` / ``fake_scores`` / ``gan_heads``.
    """

    name = "msd"
    Config = MultiStudentConfig
    title = "Multi-student DMD2"
    # Its students live in ModuleLists that trainers/sharding.py does not unit-wrap yet.
    shardable = False
    stage_changes = DMD2Method.stage_changes + ("stage", "train_students")

    @classmethod
    def check_stage_change(cls, saved: dict, cfg) -> None:
        super().check_stage_change(saved, cfg)
        for key in ("num_students", "fake_score", "kmeans_seed", "partition_file"):
            if saved.get(f"method_args.{key}", getattr(cfg.method_args, key)) != getattr(cfg.method_args, key):
                raise ConfigError(f"method_args.{key} cannot change when continuing a run; start a new run")

    def __init__(self, run_config):
        super().__init__(run_config)
        c: MultiStudentConfig = self.cfg
        self.router, self._pool, self._prompt_owner = self._make_partition(run_config)
        if self.classes is not None:
            self.register_buffer("_class_owner", torch.as_tensor(self.router.class_to_student), persistent=False)
        else:  # stored with the run: a resumed run routes as the one it continues
            self.register_buffer("router_centroids", torch.as_tensor(self.router.centroids, dtype=torch.float64))
        self._owned, group = self._ownership(c)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # DDP averages gradients over all W ranks, but a student's come only from the `group` ranks that train it.
        self._student_scale = world / group
        self._fake_scale = 1.0 if len(self.fake_scores) <= 1 else world / group
        self._activate(self._owned[0])

    # --- construction -----------------------------------------------------------------------------------------------
    def _validate(self, c: MultiStudentConfig, T: int, flow: bool) -> None:
        super()._validate(c, T, flow)
        if c.num_students < 1:
            raise ConfigError("method_args.num_students must be >= 1")
        if c.fake_score not in FAKE_SCORES:
            raise ConfigError(f"method_args.fake_score must be one of {', '.join(FAKE_SCORES)}, got {c.fake_score!r}")
        if c.fake_score == "per_student" and c.fake_score_lora_rank > 0:
            raise ConfigError("method_args.fake_score=per_student needs full fake scores; a LoRA fake score "
                              "(fake_score_lora_rank > 0) is one network: set fake_score=shared")
        if c.stage not in STAGES:
            raise ConfigError(f"method_args.stage must be one of {', '.join(STAGES)}, got {c.stage!r}")
        if c.stage == "adversarial" and not (c.gan_weight_student > 0 or c.gan_weight_critic > 0):
            raise ConfigError("method_args.stage=adversarial needs gan_weight_student / gan_weight_critic > 0 (set "
                              "from the run's start, so that the GAN heads exist)")
        bad = [k for k in c.train_students if not 0 <= k < c.num_students]
        if bad or len(set(c.train_students)) != len(c.train_students):
            raise ConfigError(f"method_args.train_students must be distinct students in [0, {c.num_students - 1}], "
                              f"got {list(c.train_students)}")
        if c.class_partition and c.partition_file:
            raise ConfigError("set method_args.class_partition or partition_file, not both")

    def _build_networks(self, teacher_network: nn.Module) -> None:
        c: MultiStudentConfig = self.cfg
        subfolders = self._init_subfolders(c)
        self.students = nn.ModuleList(self.make_student(teacher_network, subfolders[k])
                                      for k in range(c.num_students))
        self.fake_scores = nn.ModuleList()
        if self.lora:
            from .common import add_lora
            from .score_distillation import LORA_TARGETS

            add_lora(teacher_network, c.fake_score_lora_rank, c.fake_score_lora_alpha, LORA_TARGETS,
                     "method_args.fake_score_lora_rank")
        else:
            import copy

            n = c.num_students if c.fake_score == "per_student" else 1
            self.fake_scores.extend(self.family.denoiser(copy.deepcopy(teacher_network).requires_grad_(True))
                                    for _ in range(n))
        self._active = -1
        self._gan_on = False

    def _init_subfolders(self, c: MultiStudentConfig) -> list[str | None]:
        """The folder of each student's initial network in ``student_init``: a multi-student export gives each
        student its own (same K), any other pipeline the same network to all."""
        if not c.student_init:
            return [None] * c.num_students
        from stepdistill.pipelines import resolve_pipeline_path

        try:
            path = Path(resolve_pipeline_path(c.student_init))
        except Exception:  # noqa: BLE001 - reported by the loader with its own message
            return [None] * c.num_students
        if not (path / ROUTER_FILE).is_file():
            return [None] * c.num_students
        subs = json.loads((path / ROUTER_FILE).read_text()).get("subfolders", [])
        if len(subs) != c.num_students:
            raise ConfigError(f"method_args.student_init: '{c.student_init}' holds {len(subs)} students, this run "
                              f"has num_students={c.num_students}")
        return list(subs)

    def _build_gan(self, c: MultiStudentConfig) -> None:
        nets = [self.teacher.model] if self.lora else [f.model for f in self.fake_scores]
        self.gan_heads = nn.ModuleList(self._gan_head_for(net, c) for net in nets)

    def _make_partition(self, run_config) -> tuple[Router, list[list[str]] | None, dict[str, int] | None]:
        """(router, prompts of each student, owner of each data prompt); the prompt parts are None for classes."""
        c: MultiStudentConfig = self.cfg
        K = c.num_students
        given = None
        if c.partition_file:
            try:
                given = json.loads(Path(c.partition_file).read_text())
                if not isinstance(given, dict) or not ({"classes", "prompts"} & set(given)):
                    raise ValueError('expected {"classes": [[...], ...]} or {"prompts": {"text": student, ...}}')
            except (OSError, ValueError) as e:
                raise ConfigError(f"method_args.partition_file '{c.partition_file}' is unreadable: "
                                  f"{first_line(e)}") from None
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

        from stepdistill.data import build_dataset, dataset_prompts

        dc = run_config.data
        prompts = dataset_prompts(build_dataset(dc.source, dc.resolution, dc.center_crop, dc.random_flip,
                                                dc.image_column, dc.caption_column))
        if not prompts:
            raise ConfigError(f"the multi-student method partitions prompts, and data source '{dc.source}' has none: "
                              "use a prompt file or captioned images")
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

    def _ownership(self, c: MultiStudentConfig) -> tuple[list[int], int]:
        """(the students this rank trains, how many ranks train each), from the launcher's WORLD_SIZE / RANK."""
        trained = list(c.train_students) or list(range(c.num_students))
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world <= len(trained):
            return trained[rank::world], 1
        if world % len(trained):
            raise ConfigError(f"{world} processes cannot share {len(trained)} trained students evenly: launch a "
                              f"number of processes that divides {len(trained)} or is a multiple of it")
        return [trained[rank % len(trained)]], world // len(trained)

    # --- the active student ---------------------------------------------------------------------------------------
    def _activate(self, k: int, gan: bool = False) -> None:
        """Point ``student`` / ``fake_score`` / ``gan_head`` (what DMD2's losses use) at student ``k``'s networks."""
        j = k if len(self.fake_scores) > 1 else 0
        object.__setattr__(self, "student", self.students[k])
        object.__setattr__(self, "fake_score", self.fake_scores[j] if len(self.fake_scores) else None)
        heads = getattr(self, "gan_heads", None)
        object.__setattr__(self, "gan_head", heads[j] if gan and heads is not None else None)
        self._active, self._gan_on = k, gan

    def student_at(self, step: int) -> int:
        """The student this rank trains at loop step ``step``: its students in turn, a block of
        ``fake_updates_per_student`` steps (one student update and its fake-score updates) each."""
        return self._owned[(step // self.cfg.fake_updates_per_student) % len(self._owned)]

    def _owns(self, batch: dict) -> torch.Tensor:
        """Which items of the batch belong to the active student's part (bool, per item)."""
        k = self._active
        if self.classes is not None:
            if "label" not in batch:
                n = len(batch["image"]) if "image" in batch else len(batch["prompt"])
                return torch.zeros(n, dtype=torch.bool, device=self.device)
            labels = torch.as_tensor(batch["label"], device=self.device).long()
            return self._class_owner[labels.clamp(0, len(self._class_owner) - 1)] == k
        return torch.tensor([self._prompt_owner.get(p, -1) == k for p in batch["prompt"]], device=self.device)

    def _conditioning(self, batch: dict) -> tuple[Cond, Cond, int]:
        """Conditions of the active student's part, as many as the batch holds: those of its own real items first
        when real data is used (the GAN term, score matching), the rest drawn uniformly from its part."""
        k, device = self._active, self.device
        n = len(batch["image"]) if "image" in batch else len(batch.get("prompt", batch.get("label", [])))
        own = self._owns(batch) if (self._gan_on or self.cfg.stage == "score_matching") else None
        if self.classes is not None:
            part = torch.as_tensor(self.router.classes_of(k), device=device)
            mine = own is not None and "label" in batch
            first = torch.as_tensor(batch["label"], device=device).long()[own] if mine else part[:0]
            drawn = part[torch.randint(0, len(part), (n - len(first),), device=device)]
            labels = torch.cat([first, drawn])
            return self.classes.cond(labels), self.classes.uncond(n, device), n
        pool = self._pool[k]
        first = [p for p, o in zip(batch["prompt"], own.tolist()) if o] if own is not None else []
        drawn = [pool[i] for i in torch.randint(0, len(pool), (n - len(first),)).tolist()]
        cond, uncond = self.family.prompt_cond(first + drawn, device)
        return cond, uncond, n

    @torch.no_grad()
    def _real_latents(self, batch: dict) -> torch.Tensor:
        """The batch's real images of the active student's part, in the networks' space."""
        if "image" not in batch:
            raise ConfigError(GAN_IMAGES_MSG)
        return self.family.to_latents(batch["image"].to(self.device)[self._owns(batch)])

    # --- the losses --------------------------------------------------------------------------------------------------
    def score_matching_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Teacher score matching: the student, as a denoiser, regresses the teacher's raw outputs (no CFG) on real
        data of its part noised to any level."""
        if "image" not in batch:
            raise ConfigError("method_args.stage=score_matching needs real images: set data.source to an image "
                              "dataset (or captioned images)")
        # 1. Real data of the student's part with its conditions (the whole batch, with conditions of the part, on
        # the rare steps where it holds none).
        own = self._owns(batch)
        cond, _, n = self._conditioning(batch)
        m = int(own.sum())
        x0 = self.family.to_latents(batch["image"].to(self.device)[own] if m else batch["image"].to(self.device))
        cond = cond.index(slice(0, len(x0)))
        # 2. Noised to t ~ U[0, T).
        t = self.draw_timesteps(len(x0), 0.0, 1.0, x0.device)
        x_t = self.teacher.add_noise(x0, torch.randn_like(x0), t)
        # 3. The teacher's raw output is the target.
        with torch.no_grad(), self._adapters(False):
            target = self.teacher.raw(x_t, t, cond)
        loss = F.mse_loss(self.student.raw(x_t, t, cond).float(), target.float())
        return loss, {"score_matching_loss": loss.item(), "part_items": float(m)}

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        k = self.student_at(step)
        gan = self.cfg.stage == "adversarial" and "image" in batch
        self._activate(k, gan=False)
        if gan:  # the GAN term needs real images of the part in this batch; without any it waits for one
            gan = bool(self._owns(batch).any())
        self._activate(k, gan=gan)
        if phase == "student" and self.cfg.stage == "score_matching":
            loss, logs = self.score_matching_loss(batch)
        else:
            loss, logs = super().loss(phase, batch, step)
        scale = self._student_scale if phase == "student" else self._fake_scale
        if scale != 1:
            # Gradient x scale at an unchanged value (so the logged loss is the loss): DDP's mean over all ranks
            # then gives the mean over the ranks that train this student.
            loss = loss * scale - (scale - 1) * loss.detach()
        return loss, logs

    # --- the Method contract -----------------------------------------------------------------------------------------
    def critic_params(self) -> list[nn.Parameter]:
        heads = getattr(self, "gan_heads", None)
        return list(heads.parameters()) if heads is not None else []

    def phases(self) -> list[Phase]:
        fakes = self.teacher.model if self.lora else self.fake_scores
        return [
            Phase("student", [p for p in self.students.parameters() if p.requires_grad],
                  every=self.cfg.fake_updates_per_student),
            Phase("fake_score", [p for p in fakes.parameters() if p.requires_grad] + self.critic_params(), every=1),
        ]

    def ema_network(self) -> nn.Module:
        return self.students

    # --- outputs -----------------------------------------------------------------------------------------------------
    def pipeline(self, originals: bool = False) -> MultiStudentPipeline:
        sched = self.export_scheduler()
        first = self.family.export_pipeline(self.students[0].model, sched, originals)
        from stepdistill.pipelines import rebuild_pipeline

        attr = self.family.network_attr
        rest = [rebuild_pipeline(first, **{attr: s.model}) for s in self.students[1:]]
        return MultiStudentPipeline([first, *rest], self.router)

    def card_summary(self) -> tuple[str, str]:
        trained, guidance = super().card_summary()
        return f"multi-student distillation, {self.cfg.num_students} students each trained with {trained}", guidance

    def export(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        pipe = self.pipeline(originals=self.run_config.train.teacher_dtype != "float32")
        pipe.save_pretrained(out_dir)
        when = ", ".join(f"{k}={v}" for k, v in self.sampling_kwargs().items())
        parts = ([f"student {k}: classes {self.router.classes_of(k)}" for k in range(self.cfg.num_students)]
                 if self.classes is not None else
                 [f"student {k}: {len(p)} prompts, e.g. {p[0]!r}" for k, p in enumerate(self._pool)])
        arg = "class_labels=[0, 1, 2]" if self.classes is not None else '["a photo of a cat"]'
        trained, guidance = self.card_summary()
        (out_dir / "README.md").write_text(
            f"# Multi-student distillation: {self.cfg.num_students} students "
            f"({len(self.cfg.student_timesteps)}-step)\n\n"
            f"Distilled from `{self.run_config.teacher}` with {trained} by stepdistill. Each condition goes to the "
            f"student that owns it (router.json):\n\n" + "".join(f"- {p}\n" for p in parts) +
            f"\nThis folder is student 0 as a stock pipeline (`DiffusionPipeline.from_pretrained` loads it alone); "
            f"the others' networks are in `student_k/`. All of them, routed:\n\n"
            f"```python\nfrom stepdistill.pipelines import load_pipeline\npipe = load_pipeline(\"{out_dir.name}\")\n"
            f"images = pipe({arg}, {when}).images\n```\n\nNo CFG ({guidance} is distilled in).\n")
