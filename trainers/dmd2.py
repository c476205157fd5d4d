"""DMD2: Improved Distribution Matching Distillation (Yin et al., 2024, arXiv 2405.14867).

The student G is trained to match its output distribution to the teacher's by following the difference of two
scores: the frozen teacher's ("real", with CFG) and a "fake" score network that is fitted online, by ordinary
denoising, to the student's own samples. A two time-scale update rule keeps the fake score close to the current
student; an optional GAN term on the fake score's intermediate features lets real data in, and multi-step students
are trained on their own intermediate samples ("backward simulation").

The two losses are functions over explicit handles (:func:`student_loss`, :func:`fake_score_loss`): the DMD2 method
calls them for its student, the multi-student method for student k.

Phases: ``student`` (every ``fake_updates_per_student`` steps) and ``fake_score`` (every step, with the GAN head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stepdistill import schedules as S
from stepdistill.batch import Batch
from stepdistill.conditioning import Cond
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError
from stepdistill.pipelines.export import StudentSpec

from .base import Method, Phase, Setup
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

TIMESTEP_SAMPLING = ("uniform", "karras")


@dataclass
class DMD2Config(ScoreDistillationConfig):
    """DMD2's method_args: the keys every score-distillation method has, and these."""

    # CFG scale of the teacher ("real" score) in the standard convention uncond + w (cond - uncond); 1 = no CFG.
    real_guidance: float = 2.0
    # Noise levels at which the real score uses that CFG, [lo, hi] as fractions of the T training timesteps; outside
    # it the teacher is unguided (w = 1). [0, 1] = everywhere (DMD2). Guidance limited to the middle levels keeps
    # class identity at less cost to diversity and detail (Kynkaenniemi et al. 2024, "Applying guidance in a limited
    # interval"; their EDM2 interval, noise-to-signal 0.28-5.42, is t = 167-882 on the digits16 teacher; its
    # staged run in docs/results/dmd2_digits16.md used [0.17, 0.89]).
    real_guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # How noise levels are drawn, for the DM gradient and the fake score's denoising loss: "uniform" draws the
    # timestep uniformly (DMD2's Stable Diffusion code); "karras" draws an index uniformly from T noise levels spaced
    # as in EDM (rho 7, noise-to-signal 0.002-80 within the teacher's range), each mapped to the nearest timestep
    # (DMD2's pixel-space EDM code). On the digits16 teacher that moves draws from the middle levels to both ends:
    # ~8% (uniform: ~0.7%) below noise-to-signal 0.03, where fine grain is told from noise, and ~34% (uniform: ~5%)
    # above 10 (DM draws, default min_t / max_t). min_t / max_t are then fractions of that grid.
    timestep_sampling: str = "uniform"
    # Weight of the distribution-matching term in the student loss (0 = the GAN term alone, as the multi-student
    # method's adversarial stage may run).
    dm_weight: float = 1.0
    # Weight of the GAN term in the student loss, softplus(-D(fake)) (0 = off; DMD2: 1e-3 to 5e-3).
    gan_weight_student: float = 0.0
    # Weight of the critic loss softplus(-D(real)) + softplus(D(fake)) in the fake-score phase (0 = off; DMD2: 1e-2).
    gan_weight_critic: float = 0.0
    # Width of the GAN head on the fake score's intermediate features (a UNet's bottleneck, a middle transformer
    # block's image tokens: the family's feature block).
    gan_head_channels: int = 64
    # Regression warm-up: weight of MSE(student 1-step output, teacher ODE output from the same noise); 0 = off.
    regression_weight: float = 0.0
    # Teacher DDIM steps (with CFG real_guidance in real_guidance_interval) of the regression targets.
    regression_steps: int = 20


class GANHead(nn.Module):
    """Real-vs-generated classifier on (B, C, h, w) feature maps: GroupNorm-SiLU-conv-GroupNorm-SiLU-pool-linear."""

    def __init__(self, in_channels: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(math.gcd(32, in_channels), in_channels), nn.SiLU(),
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.GroupNorm(math.gcd(32, hidden), hidden), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B,) logits (positive = real)."""
        # sum over the one logit column, not squeeze: a new tensor rather than a view, which FSDP2 warns about.
        return self.net(features.float()).sum(dim=1)



@dataclass
class StudentNets:
    """One student's trainable networks, handed explicitly to the losses: the student, its fake score (a full copy,
    or the teacher network whose LoRA adapters are on) and the GAN head on the fake score's features (None: no GAN
    term this step)."""

    student: Denoiser
    fake: Denoiser
    gan_head: GANHead | None = None


def check_dmd2_config(c: DMD2Config, T: int, flow: bool) -> None:
    """ConfigError naming the first DMD2 key out of its range (the shared keys included)."""
    check_config(c, T, flow)
    if min(c.gan_weight_student, c.gan_weight_critic, c.regression_weight, c.dm_weight) < 0:
        raise ConfigError("method_args.dm_weight / gan_weight_student / gan_weight_critic / regression_weight "
                          "must be >= 0")
    if c.regression_steps < 1 or c.gan_head_channels < 1:
        raise ConfigError("method_args.regression_steps and gan_head_channels must be >= 1")
    if c.real_guidance <= 0:
        raise ConfigError("method_args.real_guidance must be > 0 (1 = no CFG)")
    gi = list(c.real_guidance_interval)
    if len(gi) != 2 or not 0.0 <= gi[0] <= gi[1] <= 1.0:
        raise ConfigError(f"method_args.real_guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1 "
                          f"(fractions of the {T} training timesteps), got {gi}")
    if c.timestep_sampling not in TIMESTEP_SAMPLING:
        raise ConfigError(f"method_args.timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, got "
                          f"{c.timestep_sampling!r}")


def uses_gan(c: DMD2Config) -> bool:
    return c.gan_weight_student > 0 or c.gan_weight_critic > 0


def timestep_grid(c: DMD2Config, teacher: Denoiser) -> torch.Tensor:
    """The timestep drawn for grid index k (k uniform): the identity, or the Karras-spaced grid."""
    all_t = torch.arange(teacher.num_train_timesteps)
    if c.timestep_sampling == "uniform":
        return all_t
    return S.karras_timestep_grid(*teacher.alpha_sigma(all_t), teacher.num_train_timesteps)


def guidance_at(c: DMD2Config, t: torch.Tensor, T: int) -> torch.Tensor | float | None:
    """The real score's CFG scale at timesteps ``t``: ``real_guidance`` inside ``real_guidance_interval``, else none;
    a float when it is the same for all (``None`` = no CFG, which skips the unconditional pass)."""
    lo, hi = (f * T for f in c.real_guidance_interval)
    t = torch.as_tensor(t)
    inside = (t >= lo) & (t <= hi)
    if c.real_guidance == 1 or not bool(inside.any()):
        return None
    return c.real_guidance if bool(inside.all()) else torch.where(inside, c.real_guidance, 1.0).float()


@torch.no_grad()
def teacher_ode(c: DMD2Config, ctx: ScoreContext, noise: torch.Tensor, cond: Cond, uncond: Cond) -> torch.Tensor:
    """The teacher's deterministic DDIM solution (``regression_steps`` trailing steps, CFG in its interval) from
    ``noise``."""
    T = ctx.teacher.num_train_timesteps
    ts = S.ddim_timesteps(c.regression_steps, T, "trailing").tolist()
    x = noise
    with ctx.teacher_only():
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else -1  # -1: the clean end
            x = ctx.teacher.solver_step(x, t, t_next, cond, guidance_scale=guidance_at(c, t, T), uncond=uncond)
    return x


def student_loss(c: DMD2Config, ctx: ScoreContext, nets: StudentNets, cond: Cond, uncond: Cond,
                 n: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Distribution matching (+ GAN, + regression) loss of ``nets.student`` for ``n`` samples at ``cond``."""
    gan = nets.gan_head is not None and c.gan_weight_student > 0
    # 1. Student samples x0_g (1 step, or one grad step after a backward-simulated prefix).
    x0_g = ctx.generate(nets.student, cond, n, grad=True)
    # 2. Re-noise to t ~ U[min_t T, max_t T] (indices into the timestep grid, see timestep_sampling).
    t = ctx.draw_timesteps(n, c.min_t, c.max_t, x0_g.device)
    # The GAN term needs a path from x0_g through the fake score's features; the DM term does not.
    x_t = ctx.teacher.add_noise(x0_g if nets.gan_head is not None else x0_g.detach(), torch.randn_like(x0_g), t)
    # 3. Real score (teacher with CFG) and fake score (no CFG). The teacher runs first: with a LoRA fake score its
    # adapters are switched off for it and must be on again before any graph through them is built.
    x0_real = ctx.real_score(x_t.detach(), t, cond, uncond, guidance_at(c, t, ctx.teacher.num_train_timesteps))
    with torch.set_grad_enabled(gan):
        out = nets.fake(x_t, t, cond, "x0", features=gan)
    x0_fake, feats = out if gan else (out, None)
    # 4. Distribution-matching gradient, normalised per sample by mean |x0_g - x0_real| over (C, H, W); its loss has
    # gradient grad / numel w.r.t. x0_g.
    grad = score_difference_grad(x0_g, x0_real, x0_fake, normalise=True)
    loss_dm = loss_from_grad(x0_g, grad)
    loss = loss_dm if c.dm_weight == 1 else c.dm_weight * loss_dm
    logs = {"dm_loss": loss_dm.item(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item()}
    # 5. GAN generator term on the fake score's features of the re-noised samples.
    if gan:
        loss_g = F.softplus(-nets.gan_head(feats)).mean()
        loss = loss + c.gan_weight_student * loss_g
        logs["gan_g_loss"] = loss_g.item()
    # 6. Regression warm-up towards the teacher's ODE output from the same noise (1-step output).
    if c.regression_weight > 0:
        z = torch.randn(ctx.noise_shape(n), device=x0_g.device)
        target = teacher_ode(c, ctx, z, cond, uncond)
        loss_reg = F.mse_loss(ctx.generate(nets.student, cond, n, steps=0, grad=True, noise=z).float(),
                              target.float())
        loss = loss + c.regression_weight * loss_reg
        logs["regression_loss"] = loss_reg.item()
    return loss, logs


def fake_score_loss(c: DMD2Config, ctx: ScoreContext, nets: StudentNets, cond: Cond, n: int,
                    real: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Denoising loss of ``nets.fake`` on detached student samples (+ the GAN critic loss on ``real``, real data in
    the networks' space, with ``nets.gan_head``)."""
    critic = nets.gan_head is not None and c.gan_weight_critic > 0
    # 1. Fresh student samples, without gradient (the fake score models the student, it does not train it).
    with torch.no_grad():
        x0_s = ctx.generate(nets.student, cond, n)
    # 2. Ordinary denoising in the network's own parameterisation, at any noise level of the timestep grid.
    t = ctx.draw_timesteps(n, 0.0, 1.0, x0_s.device)
    out = fake_denoising_loss(nets.fake, x0_s, t, cond, features=critic)
    loss_fake, feats_fake = out if critic else (out, None)
    loss = loss_fake
    logs = {"denoise_loss": loss_fake.item()}
    # 3. GAN critic: the fake score's features (of that denoising pass) for generated samples, and of real data noised
    # to the same levels; the head and the fake score's encoder learn to tell them apart.
    if critic:
        real = real[:n].to(x0_s.dtype)
        m = real.shape[0]
        _, feats_real = nets.fake(nets.fake.add_noise(real, torch.randn_like(real), t[:m]), t[:m],
                                  cond.index(slice(0, m)), "x0", features=True)
        loss_d = F.softplus(-nets.gan_head(feats_real)).mean() + F.softplus(nets.gan_head(feats_fake)).mean()
        loss = loss + c.gan_weight_critic * loss_d
        logs["gan_d_loss"] = loss_d.item()
    return loss, logs


def check_stage_change(saved: dict[str, Any], c: DMD2Config, lr_schedules: dict[str, str]) -> None:
    """The GAN head exists (and is checkpointed) iff a GAN weight is > 0, so it cannot be switched on or off in a
    continued run; a new TTUR ratio needs a constant student LR schedule (a decaying one counts student updates, and
    its length would no longer match its position)."""
    had_gan = any(float(saved.get(f"gan_weight_{w}", 0) or 0) > 0 for w in ("student", "critic"))
    if had_gan and not uses_gan(c):
        raise ConfigError("the GAN term cannot be switched off when continuing a run (its head is part of the "
                          "checkpoints): keep method_args.gan_weight_student or gan_weight_critic > 0")
    ratio = saved.get("fake_updates_per_student")
    schedule = lr_schedules.get("student", "constant_with_warmup")
    # These two do not depend on the schedule's length (warm-up counts updates from the start).
    if ratio is not None and ratio != c.fake_updates_per_student and schedule not in ("constant",
                                                                                     "constant_with_warmup"):
        raise ConfigError(f"method_args.fake_updates_per_student can change when continuing a run only with a "
                          f"constant(_with_warmup) student LR schedule (optim.student.lr_schedule is "
                          f"{schedule!r}): keep it at {ratio} or start a new run")
    if uses_gan(c) and not had_gan:
        raise ConfigError("the GAN term cannot be switched on when continuing a run (its head would start "
                          "untrained): start a new run, e.g. with method_args.student_init")


def card_facts(c: DMD2Config) -> tuple[str, str]:
    """(how the student was trained, what guidance is distilled in) for the model card."""
    interval = [float(f) for f in c.real_guidance_interval]
    where = "" if interval == [0.0, 1.0] else f" at t/T in {interval}"
    return (f"DMD2 (distribution matching + two time-scale updates{', GAN term' if uses_gan(c) else ''})",
            f"the teacher's guidance w={c.real_guidance}{where}")


class DMD2Method(Method):
    r"""DMD2 distillation of a diffusers teacher into a 1- or few-step student.

    Networks: the frozen teacher (the real score), the student G (a trainable copy of the teacher network), the fake
    score (a trainable copy, or LoRA adapters on the teacher network itself so no second full copy exists) and,
    with the GAN term, a small head on the fake score's intermediate features (every family returns them).

    Args:
        setup: the teacher's family and Denoiser, the world, the data.
        cfg: the method's :class:`DMD2Config`.
    """

    name = "dmd2"
    Config = DMD2Config
    phase_names = ("student", "fake_score")
    shardable = True
    images_needed_for = "the GAN term (set method_args.gan_weight_student=0 and gan_weight_critic=0 to train without)"
    # A run may continue with new loss weights, real-score guidance, noise ranges and TTUR ratio (train
    # --allow-changes), e.g. a larger GAN weight late in training.
    stage_changes = ("dm_weight", "real_guidance", "real_guidance_interval", "min_t", "max_t", "timestep_sampling",
                     "gan_weight_student", "gan_weight_critic", "regression_weight", "regression_steps",
                     "fake_updates_per_student")

    def __init__(self, setup: Setup, cfg: DMD2Config):
        super().__init__(setup, cfg)
        self.teacher = setup.teacher
        check_dmd2_config(cfg, self.teacher.num_train_timesteps, self.teacher.is_flow)
        # Noise levels are drawn as indices into this grid (the identity, or spaced as Karras).
        self.register_buffer("_t_grid", timestep_grid(cfg, self.teacher), persistent=False)
        self.lora = cfg.fake_score_lora_rank > 0
        self.student = build_student(self.family, self.teacher.model, cfg)
        self.fake_score = build_fake_score(self.family, self.teacher, cfg)
        self.gan_head = (GANHead(self.family.feature_channels(self.fake().model), cfg.gan_head_channels)
                         if uses_gan(cfg) else None)

    @classmethod
    def check_stage_change(cls, saved: dict[str, Any], cfg: DMD2Config, lr_schedules: dict[str, str]) -> None:
        check_stage_change(saved, cfg, lr_schedules)

    def fake(self) -> Denoiser:
        """The fake score as a Denoiser (with a LoRA fake score: the teacher network, adapters on)."""
        return self.teacher if self.lora else self.fake_score

    def context(self) -> ScoreContext:
        return ScoreContext(self.teacher, self.lora, self._t_grid, list(self.cfg.student_timesteps),
                            self.family.noise_shape)

    def phases(self) -> list[Phase]:
        fake = [p for p in self.fake().parameters() if p.requires_grad]
        head = list(self.gan_head.parameters()) if self.gan_head is not None else []
        return [Phase("student", [p for p in self.student.parameters() if p.requires_grad],
                      every=self.cfg.fake_updates_per_student),
                Phase("fake_score", fake + head, real=self.gan_head is not None)]

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        nets = StudentNets(self.student, self.fake(), self.gan_head)
        if phase == "student":
            return student_loss(self.cfg, self.context(), nets, batch.cond, batch.uncond, batch.size)
        if phase == "fake_score":
            return fake_score_loss(self.cfg, self.context(), nets, batch.cond, batch.size, batch.real)
        raise ValueError(f"unknown phase {phase!r}")

    def ema_network(self) -> nn.Module:
        # The exported student is the EMA of G when train.ema_decay > 0 (the EMA steps once per student update,
        # after it). The fake score keeps modelling the raw G.
        return self.student.model

    def export_spec(self) -> StudentSpec:
        trained, guidance = card_facts(self.cfg)
        return score_student_spec(self.name, "DMD2", trained, guidance, self.family, self.teacher, self.teacher_name,
                            [self.student.model], self.cfg.student_timesteps, self.cfg.sample_prompts)
