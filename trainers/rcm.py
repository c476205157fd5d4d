r"""rCM: score-regularised continuous-time consistency (Zheng et al. 2025, arXiv 2510.08431; NVlabs/rcm).

sCM's loss (:mod:`.scm`) plus DMD's reverse-divergence term (:mod:`.dmd2`, over the score-distillation core): the
student's own samples (one step, or a backward-simulated multistep prefix at its sampling schedule) are re-noised,
and the difference of the teacher's (CFG) and an online fake score's x0 predictions pulls them towards the teacher's
distribution. The fake score is fitted by denoising to the student's samples, a full copy or LoRA adapters on the
teacher network, updated ``fake_updates_per_student`` times per student update (two time-scale update rule). sCM's
forward-divergence term keeps the student's samples diverse; the DMD term sharpens them. ``dmd_weight = 0`` is pure
sCM (without a fake score); ``scm_weight = 0`` is DMD2 on a TrigFlow-consistency student.

What the reference does differently (NVlabs/rcm, Wan2.1): sigma_d = 1, no adaptive weighting, sCM's loss summed over
elements (x100) against a DMD weight of 1, the DMD term only after the tangent warm-up, the backward-simulation step
count cycling 1-4 with times drawn from the DMD proposal. Here the student phase's loss is sCM's (normalised per
element, with the adaptive weighting) plus ``dmd_weight`` times DMD2's, and the DMD term starts at ``dmd_start``.

Phases: ``student`` (every ``fake_updates_per_student`` steps: both terms) and ``fake_score`` (every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stepdistill.batch import Batch
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError
from stepdistill.pipelines.export import StudentSpec

from .base import Method, Phase, Setup
from .dmd2 import DMD2Config, StudentNets, check_dmd2_config, fake_score_loss, student_loss, timestep_grid
from .scm import SCMConfig, SCMMethod, TrigFlowStudent, check_scm_config, scm_loss
from .score_distillation import ScoreContext, build_fake_score


@dataclass
class RCMConfig(SCMConfig, DMD2Config):
    """rCM's method_args: sCM's keys, DMD2's (for the DMD term and its fake score), and these. DMD2's
    ``student_timesteps`` is not used: the DMD term's student samples follow ``sample_times`` at ``sample_steps``."""

    # Weight of the DMD (reverse-divergence) term in the student loss; 0 = pure sCM.
    dmd_weight: float = 0.1
    # Weight of sCM's term; 0 = DMD alone on a TrigFlow student.
    scm_weight: float = 1.0
    # Loop step from which the DMD term is on (the fake score trains from the start); the reference starts it after
    # the tangent warm-up.
    dmd_start: int = 0


def check_rcm_config(c: RCMConfig, T: int, flow: bool) -> None:
    check_scm_config(c)
    check_dmd2_config(c, T, flow)
    if c.dmd_weight < 0 or c.scm_weight < 0 or c.dmd_weight + c.scm_weight == 0 or c.dmd_start < 0:
        raise ConfigError("method_args.dmd_weight and scm_weight must be >= 0 and not both 0, dmd_start >= 0")
    if c.gan_weight_student or c.gan_weight_critic or c.regression_weight:
        raise ConfigError("rcm has no GAN or regression term: set method_args.gan_weight_student, gan_weight_critic "
                          "and regression_weight to 0 (or use dmd2)")
    if c.lora_rank > 0 and c.fake_score_lora_rank > 0:
        raise ConfigError("rcm: a LoRA student and a LoRA fake score would share the teacher network's adapters; "
                          "set method_args.lora_rank=0 or fake_score_lora_rank=0")


class RCMMethod(Method):
    r"""rCM: sCM plus a DMD term with an online fake score.

    Networks: the frozen teacher, a :class:`~.scm.TrigFlowStudent` (student and log-variance head) and the fake score
    (a trainable copy, or LoRA adapters on the teacher network).

    Args:
        setup: the teacher's family and Denoiser, the world, the data.
        cfg: the method's :class:`RCMConfig`.
    """

    name = "rcm"
    Config = RCMConfig
    phase_names = ("student", "fake_score")
    images_needed_for = SCMMethod.images_needed_for
    not_shardable_because = SCMMethod.not_shardable_because
    shardable = SCMMethod.shardable
    stage_changes = SCMMethod.stage_changes + ("dmd_weight", "scm_weight", "dmd_start", "real_guidance",
                                               "real_guidance_interval", "min_t", "max_t", "timestep_sampling")

    def __init__(self, setup: Setup, cfg: RCMConfig):
        super().__init__(setup, cfg)
        check_rcm_config(cfg, setup.teacher.num_train_timesteps, setup.teacher.is_flow)
        self.scm = TrigFlowStudent(self.family, setup.teacher, cfg)
        # With a LoRA student (or fake score) the teacher is that network with its adapters off: registered once.
        self.frozen_teacher = None if self.scm.lora else setup.teacher
        self.register_buffer("_t_grid", timestep_grid(cfg, self.teacher), persistent=False)
        self.lora_fake = cfg.fake_score_lora_rank > 0
        self.fake_score = build_fake_score(self.family, self.teacher, cfg)

    @property
    def teacher(self) -> Denoiser:
        """The teacher Denoiser (with a LoRA student: the same network, called with adapters off)."""
        return self.scm.student if self.scm.lora else self.frozen_teacher

    def fake(self) -> Denoiser:
        """The fake score as a Denoiser (a LoRA fake score: the teacher network, adapters on)."""
        return self.teacher if self.lora_fake else self.fake_score

    def context(self) -> ScoreContext:
        """The DMD term's frozen side: its student samples follow the default sampler's timesteps."""
        # The teacher's own predictions need the adapters off whether they are the fake score's or the student's.
        adapters_on_teacher = self.lora_fake or self.scm.lora
        return ScoreContext(self.teacher, adapters_on_teacher, self._t_grid, self.scm.timesteps(),
                            self.family.noise_shape)

    def phases(self) -> list[Phase]:
        fake = [p for p in self.fake().parameters() if p.requires_grad]
        return [Phase("student", self.scm.params(), every=self.cfg.fake_updates_per_student, real=True),
                Phase("fake_score", fake)]

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c: RCMConfig = self.cfg
        nets = StudentNets(self.scm.student, self.fake())
        if phase == "fake_score":
            return fake_score_loss(c, self.context(), nets, batch.cond, batch.size, None)
        if phase != "student":
            raise ValueError(f"unknown phase {phase!r}")
        loss, logs = scm_loss(c, self.scm.nets(self.teacher), batch.real, batch.cond, batch.uncond, step)
        loss = c.scm_weight * loss
        if c.dmd_weight > 0 and step >= c.dmd_start:
            # DMD2's student term (its own dm_weight, 1 by default, times dmd_weight).
            dmd, dmd_logs = student_loss(c, self.context(), nets, batch.cond, batch.uncond, batch.size)
            loss = loss + c.dmd_weight * dmd
            logs.update(dmd_logs)
        return loss, logs

    def ema_network(self) -> nn.Module | None:
        return self.scm.ema_network()

    def export_spec(self) -> StudentSpec:
        c = self.cfg
        trained = (f"rCM (sCM x{c.scm_weight} + DMD x{c.dmd_weight}, {'LoRA' if self.lora_fake else 'full'} fake "
                   "score)")
        guidance = f"the teacher's guidance w={c.teacher_guidance} (sCM) / {c.real_guidance} (DMD)"
        return self.scm.spec(self.name, "rCM", trained, guidance, self.teacher, self.teacher_name)
