"""Variational score distillation into a one-step student: SwiftBrush (Nguyen & Tran, 2024) with SNOOPI's
random guidance scale (PG-SB, Nguyen et al., 2024).

Data-free: the student G (initialised from the teacher) maps pure noise at t = T to x0 for a condition (a prompt
or a class label; nothing else of the data is read). A fake score, LoRA adapters on the teacher network by default
(adapters off = the teacher, so no second copy of the network exists), is fitted online to G's samples by ordinary
denoising with conditioning dropout. G follows w(t) (eps_teacher - eps_fake) at its re-noised samples, both scores
with classifier-free guidance at one scale drawn per step (PG-SB: the same draw for both).

Everything but the two losses comes from :mod:`.score_distillation`, shared with DMD2.

Phases: ``student`` (every ``fake_updates_per_student`` steps; 1:1 by default) and ``fake_score``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepdistill.batch import Batch
from stepdistill.conditioning import Cond
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError
from stepdistill.pipelines.export import StudentSpec

from .base import Method, Phase, Setup
from .dmd2 import StudentNets
from .score_distillation import (
    ScoreContext,
    ScoreDistillationConfig,
    build_fake_score,
    build_student,
    check_config,
    fake_denoising_loss,
    loss_from_grad,
    score_difference_grad,
    score_student_spec,
)

WEIGHTINGS = ("sigma2", "dm_norm")


@dataclass
class VSDConfig(ScoreDistillationConfig):
    """VSD's method_args: the keys every score-distillation method has, and these."""

    # Fake-score updates per student update; SwiftBrush alternates 1:1.
    fake_updates_per_student: int = 1
    # Fake score as a LoRA of this rank on the teacher network (SwiftBrush: 64); 0 = a full trainable copy.
    fake_score_lora_rank: int = 64
    # LoRA alpha (scale alpha / rank; SwiftBrush: 108); 0 = the rank (scale 1).
    fake_score_lora_alpha: float = 108.0
    # Guidance scale of both scores, drawn uniformly from [guidance_min, guidance_max] once per step (SNOOPI's PG-SB;
    # equal values = a fixed scale, SwiftBrush's SD setting is 4.5). Standard convention uncond + w (cond - uncond).
    guidance_min: float = 4.5
    # Upper end of the per-step guidance draw.
    guidance_max: float = 4.5
    # Apply the drawn guidance to the fake score too (SNOOPI); false = the fake score unguided.
    fake_guidance: bool = True
    # Probability that a fake-score training sample sees the unconditional input (so CFG applies to the fake score).
    fake_cond_dropout: float = 0.1
    # Weight of the gradient: "sigma2" = SwiftBrush's w(t) = sigma_t^2 on the eps difference, i.e.
    # alpha_t sigma_t (x0_fake - x0_real); "dm_norm" = DMD2's per-sample 1 / mean |x0 - x0_real|.
    weighting: str = "sigma2"


def drop_conditioning(cond: Cond, uncond: Cond, p: float) -> Cond:
    """``cond`` with each sample replaced by its unconditional input with probability ``p``."""
    if p <= 0:
        return cond
    n = next(t for t in (cond.class_labels, cond.encoder_hidden_states) if t is not None).shape[0]
    drop = torch.rand(n) < p
    rows = torch.arange(n) + drop.long() * n
    both = Cond.cat(cond, uncond)
    device = next(t for t in (both.class_labels, both.encoder_hidden_states) if t is not None).device
    return both.index(rows.to(device))


def check_vsd_config(c: VSDConfig, T: int, flow: bool) -> None:
    """ConfigError naming the first VSD key out of its range (the shared keys included)."""
    check_config(c, T, flow)
    if not 1.0 <= c.guidance_min <= c.guidance_max:
        raise ConfigError(f"method_args.guidance_min / guidance_max must satisfy 1 <= min <= max (1 = no CFG), "
                          f"got {c.guidance_min} / {c.guidance_max}")
    if not 0.0 <= c.fake_cond_dropout < 1.0:
        raise ConfigError(f"method_args.fake_cond_dropout must be in [0, 1), got {c.fake_cond_dropout}")
    if c.weighting not in WEIGHTINGS:
        raise ConfigError(f"method_args.weighting must be one of {', '.join(WEIGHTINGS)}, got {c.weighting!r}")
    if c.fake_guidance and c.guidance_max > 1 and c.fake_cond_dropout == 0:
        raise ConfigError("method_args.fake_guidance needs method_args.fake_cond_dropout > 0 (the fake score must "
                          "learn the unconditional input CFG uses)")


def draw_guidance(c: VSDConfig) -> float | None:
    """This step's guidance scale (PG-SB), one draw for both scores; None when it is 1 (no CFG pass)."""
    w = c.guidance_min if c.guidance_min == c.guidance_max else float(
        c.guidance_min + (c.guidance_max - c.guidance_min) * torch.rand(()))
    return None if w == 1.0 else w


def vsd_grad(c: VSDConfig, ctx: ScoreContext, fake: Denoiser, x0_g: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor, cond: Cond, uncond: Cond, w: float | None) -> torch.Tensor:
    """The gradient for the student's samples ``x0_g`` from their re-noised ``x_t`` at ``t`` (no graph)."""
    # The teacher first: with a LoRA fake score its adapters are switched off for it.
    x0_real = ctx.real_score(x_t, t, cond, uncond, w)
    with torch.no_grad():
        x0_fake = fake(x_t, t, cond, "x0", guidance_scale=w if c.fake_guidance else None, uncond=uncond)
    if c.weighting == "dm_norm":
        return score_difference_grad(x0_g, x0_real, x0_fake, normalise=True)
    # sigma_t^2 (eps_real - eps_fake) with eps = (x_t - alpha x0) / sigma: alpha sigma (x0_fake - x0_real).
    alpha, sigma = ctx.teacher.alpha_sigma(t)
    return score_difference_grad(x0_g, x0_real, x0_fake, weight=alpha * sigma)


def student_loss(c: VSDConfig, ctx: ScoreContext, nets: StudentNets, cond: Cond, uncond: Cond,
                 n: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The VSD loss of ``nets.student``."""
    w = draw_guidance(c)
    # 1. One-step samples from pure noise at the first student timestep (t = T).
    x0_g = ctx.generate(nets.student, cond, n, grad=True)
    # 2. Re-noised to t ~ U[min_t T, max_t T].
    t = ctx.draw_timesteps(n, c.min_t, c.max_t, x0_g.device)
    x_t = ctx.teacher.add_noise(x0_g.detach(), torch.randn_like(x0_g), t)
    # 3. The score difference, as a loss whose gradient w.r.t. x0_g is grad / numel.
    grad = vsd_grad(c, ctx, nets.fake, x0_g, x_t, t, cond, uncond, w)
    loss = loss_from_grad(x0_g, grad)
    return loss, {"vsd_loss": loss.item(), "grad_norm": grad.flatten(1).norm(dim=1).mean().item(),
                  "guidance": w or 1.0}


def fake_score_loss(c: VSDConfig, ctx: ScoreContext, nets: StudentNets, cond: Cond, uncond: Cond,
                    n: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The fake score's denoising loss on the student's samples, with conditioning dropout (so CFG applies to it)."""
    # 1. Fresh student samples, without gradient.
    with torch.no_grad():
        x0_s = ctx.generate(nets.student, cond, n)
    # 2. Denoising at any noise level, each sample's condition dropped with probability fake_cond_dropout.
    t = ctx.draw_timesteps(n, 0.0, 1.0, x0_s.device)
    loss = fake_denoising_loss(nets.fake, x0_s, t, drop_conditioning(cond, uncond, c.fake_cond_dropout))
    return loss, {"denoise_loss": loss.item()}


class VSDMethod(Method):
    """SwiftBrush / SNOOPI variational score distillation (see the module docstring).

    Args:
        setup: the teacher's family and Denoiser, the world, the data (only its labels or prompts are used).
        cfg: the method's :class:`VSDConfig`.
    """

    name = "vsd"
    Config = VSDConfig
    phase_names = ("student", "fake_score")
    shardable = True
    stage_changes = ("guidance_min", "guidance_max", "fake_guidance", "min_t", "max_t", "weighting")

    def __init__(self, setup: Setup, cfg: VSDConfig):
        super().__init__(setup, cfg)
        self.teacher = setup.teacher
        check_vsd_config(cfg, self.teacher.num_train_timesteps, self.teacher.is_flow)
        self.register_buffer("_t_grid", torch.arange(self.teacher.num_train_timesteps), persistent=False)
        self.lora = cfg.fake_score_lora_rank > 0
        self.student = build_student(self.family, self.teacher.model, cfg)
        self.fake_score = build_fake_score(self.family, self.teacher, cfg)

    def fake(self) -> Denoiser:
        """The fake score as a Denoiser (with a LoRA fake score: the teacher network, adapters on)."""
        return self.teacher if self.lora else self.fake_score

    def context(self) -> ScoreContext:
        return ScoreContext(self.teacher, self.lora, self._t_grid, list(self.cfg.student_timesteps),
                            self.family.noise_shape)

    def phases(self) -> list[Phase]:
        return [Phase("student", [p for p in self.student.parameters() if p.requires_grad],
                      every=self.cfg.fake_updates_per_student),
                Phase("fake_score", [p for p in self.fake().parameters() if p.requires_grad])]

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        nets = StudentNets(self.student, self.fake())
        if phase == "student":
            return student_loss(self.cfg, self.context(), nets, batch.cond, batch.uncond, batch.size)
        if phase == "fake_score":
            return fake_score_loss(self.cfg, self.context(), nets, batch.cond, batch.uncond, batch.size)
        raise ValueError(f"unknown phase {phase!r}")

    def ema_network(self) -> torch.nn.Module:
        return self.student.model

    def export_spec(self) -> StudentSpec:
        c: VSDConfig = self.cfg
        w = (f"w = {c.guidance_min}" if c.guidance_min == c.guidance_max
             else f"w ~ U[{c.guidance_min}, {c.guidance_max}] per step (PG-SB)")
        fake = f"LoRA rank {c.fake_score_lora_rank}" if c.fake_score_lora_rank else "a full copy"
        return score_student_spec(self.name, "VSD", f"variational score distillation (SwiftBrush; fake score: {fake}; "
                                  f"{c.weighting} weighting)", f"the teacher's guidance {w}", self.family,
                                  self.teacher, self.teacher_name, [self.student.model], c.student_timesteps,
                                  c.sample_prompts)
