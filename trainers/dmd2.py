"""DMD2: Improved Distribution Matching Distillation (Yin et al., 2024).

The student G is trained to match its output distribution to the teacher's by following the difference of two
scores: the frozen teacher's ("real", with CFG) and a "fake" score network that is fitted online, by ordinary
denoising, to the student's own samples. A two time-scale update rule keeps the fake score close to the current
student; an optional GAN term on the fake score's bottleneck features lets real data in, and multi-step students are
trained on their own intermediate samples ("backward simulation").

Phases: ``student`` (every ``fake_updates_per_student`` steps) and ``fake_score`` (every step, with the GAN head).
"""

from __future__ import annotations

import copy
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill import schedules as S
from stepdistill.conditioning import ClassConditioning, Cond
from stepdistill.config import OptimConfig
from stepdistill.data import to_uint8
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError

from .base import Method, Phase
from .common import (
    adapters,
    add_lora,
    cast_frozen,
    check_labels,
    init_student_weights,
    load_teacher,
)

# Guard for the per-sample normaliser mean|p_real| of the distribution-matching gradient.
_NORM_EPS = 1e-6
# LCMScheduler's boundary condition c_skip = 0.25 / ((t * timestep_scaling)^2 + 0.25) must vanish: a DMD2 student
# predicts x0 directly. With this scaling c_skip < 1e-12 and c_out rounds to exactly 1 for every t >= 1.
_LCM_TIMESTEP_SCALING = 1e6
# Modules the LoRA fake score adapts; those present in the teacher network are used (attention projections of
# UNet2DModel / UNet2DConditionModel blocks and the resnet convolutions).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
TIMESTEP_SAMPLING = ("uniform", "karras")
GAN_IMAGES_MSG = ("GAN term needs real images: set data.source to an image dataset or set "
                  "method_args.gan_weight_student=0")


@dataclass
class DMD2Config:
    # Timesteps the student is conditioned on, strictly decreasing in [0, T): [999] is a 1-step student,
    # [999, 749, 499, 249] a 4-step one (trained with backward simulation). The exported scheduler reproduces them.
    student_timesteps: list[int] = field(default_factory=lambda: [999])
    # CFG scale of the teacher ("real" score) in the standard convention uncond + w (cond - uncond); 1 = no CFG.
    real_guidance: float = 2.0
    # Noise levels at which the real score uses that CFG, [lo, hi] as fractions of the T training timesteps; outside
    # it the teacher is unguided (w = 1). [0, 1] = everywhere (DMD2). Guidance limited to the middle levels keeps
    # class identity at less cost to diversity and detail (Kynkaenniemi et al. 2024, "Applying guidance in a limited
    # interval"; their EDM2 interval, noise-to-signal 0.28-5.42, is t = 167-882 on the digits16 teacher; its
    # staged run in docs/results/dmd2_digits16.md used [0.17, 0.89]).
    real_guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # Lower end of the distribution-matching noise levels t ~ U[min_t T, max_t T] (a fraction of the T timesteps).
    min_t: float = 0.02
    # Upper end of the distribution-matching noise levels (a fraction of the T training timesteps).
    max_t: float = 0.98
    # How noise levels are drawn, for the DM gradient and the fake score's denoising loss: "uniform" draws the
    # timestep uniformly (DMD2's Stable Diffusion code); "karras" draws an index uniformly from T noise levels spaced
    # as in EDM (rho 7, noise-to-signal 0.002-80 within the teacher's range), each mapped to the nearest timestep
    # (DMD2's pixel-space EDM code). On the digits16 teacher that moves draws from the middle levels to both ends:
    # ~8% (uniform: ~0.7%) below noise-to-signal 0.03, where fine grain is told from noise, and ~34% (uniform: ~5%)
    # above 10 (DM draws, default min_t / max_t). min_t / max_t are then fractions of that grid.
    timestep_sampling: str = "uniform"
    # Two time-scale update rule: fake-score updates per student update (the student phase runs every k steps).
    fake_updates_per_student: int = 5
    # Weight of the GAN term in the student loss, softplus(-D(fake)) (0 = off; DMD2: 1e-3 to 5e-3).
    gan_weight_student: float = 0.0
    # Weight of the critic loss softplus(-D(real)) + softplus(D(fake)) in the fake-score phase (0 = off; DMD2: 1e-2).
    gan_weight_critic: float = 0.0
    # Width of the GAN head on the fake score's bottleneck (mid_block) features.
    gan_head_channels: int = 64
    # Regression warm-up: weight of MSE(student 1-step output, teacher ODE output from the same noise); 0 = off.
    regression_weight: float = 0.0
    # Teacher DDIM steps (with CFG real_guidance in real_guidance_interval) of the regression targets.
    regression_steps: int = 20
    # Initialise the student G from another pipeline's network (alias, local folder or hub id), e.g. an exported LCM
    # student of the same teacher; it must have the teacher network's architecture. "" = from the teacher (DMD2).
    student_init: str = ""
    # Fake score as a LoRA of this rank on the teacher network (adapters off = teacher); 0 = a full trainable copy.
    fake_score_lora_rank: int = 0
    # LoRA alpha (scale alpha / rank); 0 = the rank (scale 1).
    fake_score_lora_alpha: float = 0.0
    # Prompts of the periodic sample grids for text teachers (cycled).
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car", "a bowl of fruit",
                                                               "a mountain landscape"])


class GANHead(nn.Module):
    """Real-vs-generated classifier on bottleneck feature maps: GroupNorm-SiLU-conv-GroupNorm-SiLU-pool-linear."""

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


class DMD2Method(Method):
    r"""DMD2 distillation of a diffusers teacher into a 1- or few-step student.

    Networks: the frozen teacher (the real score), the student G (a trainable copy of the teacher network), the fake
    score (a trainable copy, or LoRA adapters on the teacher network itself so no second full copy exists) and,
    with the GAN term, a small head on the fake score's bottleneck.

    Supported teachers: every family of :mod:`stepdistill.families` (the class-conditional pixel pipelines, SD 1.5,
    SDXL, SD3 and Flux); the GAN term needs a UNet (it reads the fake score's mid block).

    Args:
        run_config: the resolved :class:`~stepdistill.config.RunConfig`; ``run_config.method_args`` is a
            :class:`DMD2Config`.
    """

    name = "dmd2"
    Config = DMD2Config
    phase_names = ("student", "fake_score")
    shardable = True
    # A run may continue with new loss weights, real-score guidance, noise ranges and TTUR ratio (train
    # --allow-changes), e.g. a larger GAN weight late in training. A new TTUR ratio needs a constant student LR
    # schedule: a decaying one counts student updates, and its length would no longer match its position.
    stage_changes = ("real_guidance", "real_guidance_interval", "min_t", "max_t", "timestep_sampling",
                     "gan_weight_student", "gan_weight_critic", "regression_weight", "regression_steps",
                     "fake_updates_per_student")

    @classmethod
    def check_stage_change(cls, saved: dict, cfg) -> None:
        # The GAN head exists (and is checkpointed) iff either GAN weight is > 0.
        had_gan = any(float(saved.get(f"method_args.gan_weight_{w}", 0) or 0) > 0 for w in ("student", "critic"))
        c = cfg.method_args
        has_gan = c.gan_weight_student > 0 or c.gan_weight_critic > 0
        if had_gan and not has_gan:
            raise ConfigError("the GAN term cannot be switched off when continuing a run (its head is part of the "
                              "checkpoints): keep method_args.gan_weight_student or gan_weight_critic > 0")
        ratio = saved.get("method_args.fake_updates_per_student")
        schedule = (cfg.optim["student"] if "student" in cfg.optim else OptimConfig()).lr_schedule
        # These two do not depend on the schedule's length (warm-up counts updates from the start).
        if ratio is not None and ratio != c.fake_updates_per_student and schedule not in ("constant",
                                                                                         "constant_with_warmup"):
            raise ConfigError(f"method_args.fake_updates_per_student can change when continuing a run only with a "
                              f"constant(_with_warmup) student LR schedule (optim.student.lr_schedule is "
                              f"{schedule!r}): keep it at {ratio} or start a new run")
        if has_gan and not had_gan:
            raise ConfigError("the GAN term cannot be switched on when continuing a run (its head would start "
                              "untrained): start a new run, e.g. with method_args.student_init")

    def __init__(self, run_config):
        super().__init__(run_config)
        c: DMD2Config = self.cfg
        self.family, self.teacher = load_teacher(run_config, "dmd2")
        unet, scheduler = self.family.network, self.family.pipe.scheduler
        self.scheduler = scheduler
        T = self.teacher.num_train_timesteps
        self._validate(c, T, self.teacher.is_flow)
        # Timestep drawn for grid index k (k uniform): the identity, or the Karras-spaced grid.
        all_t = torch.arange(T)
        self.register_buffer("_t_grid", all_t if c.timestep_sampling == "uniform" else
                             S.karras_timestep_grid(*self.teacher.alpha_sigma(all_t), T), persistent=False)

        # Conditioning: class labels or prompts (the family encodes them); latent teachers also bring their frozen
        # VAE and text encoders, registered here once so that they move with this Method to its device.
        self.classes: ClassConditioning | None = self.family.classes
        for name, module in self.family.frozen_modules().items():
            setattr(self, name, module)

        # 1. The student G: a trainable copy of the teacher network (or of another pipeline's, same architecture).
        self.student = self.family.denoiser(copy.deepcopy(unet).requires_grad_(True))
        if c.student_init:
            init_student_weights(self.student.model, c.student_init, "method_args.student_init",
                                 self.family.network_attr)

        # 7. The fake score: a full trainable copy, or LoRA adapters on the teacher network (toggled off for the
        # teacher's own predictions), which keeps a single copy of the big network in memory.
        self.lora = c.fake_score_lora_rank > 0
        if self.lora:
            add_lora(unet, c.fake_score_lora_rank, c.fake_score_lora_alpha, LORA_TARGETS,
                     "method_args.fake_score_lora_rank")
            self.fake_score: Denoiser | None = None
        else:
            self.fake_score = self.family.denoiser(copy.deepcopy(unet).requires_grad_(True))

        # The frozen teacher (and VAE, text encoders) in train.teacher_dtype, now that the trainable copies exist.
        cast_frozen(self.teacher, self.family, run_config.train.teacher_dtype)

        # 5. GAN head on the fake score's bottleneck features, captured by a forward hook on its mid_block.
        self.use_gan = c.gan_weight_student > 0 or c.gan_weight_critic > 0
        self.gan_head: GANHead | None = None
        self._captured: dict[str, torch.Tensor] = {}
        if self.use_gan:
            src = Path(run_config.data.source)
            if src.is_file() and src.suffix.lower() in (".txt", ".prompts"):
                raise ConfigError(GAN_IMAGES_MSG)
            mid = getattr(self._fake_net, "mid_block", None)
            if mid is None:
                raise ConfigError("the GAN term needs a teacher network with a mid_block (bottleneck features)")
            self.gan_head = GANHead(int(self._fake_net.config.block_out_channels[-1]), c.gan_head_channels)
            mid.register_forward_hook(self._capture_mid)

    # --- construction helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _validate(c: DMD2Config, T: int, flow: bool) -> None:
        ts = list(c.student_timesteps)
        # Flow-matching timesteps are sigma * T, and a student that starts from pure noise sits at sigma = 1 (t = T).
        lo, hi = (1, T) if flow else (0, T - 1)
        if not ts or any(not lo <= t <= hi for t in ts):
            raise ConfigError(f"method_args.student_timesteps must be non-empty integers in [{lo}, {hi}] for this "
                              f"{'flow-matching' if flow else 'DDPM-type'} teacher, got {ts}"
                              + (f" (a flow student starts from pure noise at t = {T})" if flow else ""))
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"method_args.student_timesteps must be strictly decreasing, got {ts}")
        if not (0.0 <= c.min_t < c.max_t <= 1.0):
            raise ConfigError(f"method_args.min_t / max_t must satisfy 0 <= min_t < max_t <= 1 (fractions of the "
                              f"{T} training timesteps), got {c.min_t} / {c.max_t}")
        if c.fake_updates_per_student < 1:
            raise ConfigError("method_args.fake_updates_per_student must be >= 1")
        if min(c.gan_weight_student, c.gan_weight_critic, c.regression_weight) < 0:
            raise ConfigError("method_args.gan_weight_student / gan_weight_critic / regression_weight must be >= 0")
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

    def _capture_mid(self, module: nn.Module, args, output) -> None:
        self._captured["mid"] = output[0] if isinstance(output, tuple) else output

    @property
    def _fake_net(self) -> nn.Module:
        return self.teacher.model if self.lora else self.fake_score.model

    def _adapters(self, enabled: bool) -> AbstractContextManager:
        """With a LoRA fake score, switch its adapters on (fake score) or off (teacher); a no-op otherwise."""
        return adapters(self.teacher.model, enabled) if self.lora else nullcontext()

    def guidance_at(self, t: torch.Tensor) -> torch.Tensor | float | None:
        """The real score's CFG scale at timesteps ``t``: ``real_guidance`` inside ``real_guidance_interval``, else
        none; a float when it is the same for all (``None`` = no CFG, which skips the unconditional pass)."""
        w = self.cfg.real_guidance
        lo, hi = (f * self.teacher.num_train_timesteps for f in self.cfg.real_guidance_interval)
        t = torch.as_tensor(t)
        inside = (t >= lo) & (t <= hi)
        if w == 1 or not bool(inside.any()):
            return None
        return w if bool(inside.all()) else torch.where(inside, w, 1.0).float()

    def real_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond) -> torch.Tensor:
        """The teacher's x0 prediction with CFG ``real_guidance`` in its interval (no gradient)."""
        with torch.no_grad(), self._adapters(False):
            return self.teacher(x_t, t, cond, "x0", guidance_scale=self.guidance_at(t), uncond=uncond)

    def fake_denoiser(self) -> Denoiser:
        """The fake score as a Denoiser (with a LoRA fake score: the teacher network, adapters on)."""
        return self.teacher if self.lora else self.fake_score

    # --- conditioning and sampling ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def _conditioning(self, batch: dict) -> tuple[Cond, Cond, int]:
        """(cond, uncond, batch size) from a batch: labels (sampled uniformly if absent) or prompts."""
        device = self.device
        if self.classes is not None:
            if "label" in batch:
                labels = torch.as_tensor(batch["label"], device=device).long()
                check_labels(labels, self.classes)
            else:
                n = len(batch["image"]) if "image" in batch else len(batch["prompt"])
                labels = torch.randint(0, self.classes.num_classes, (n,), device=device)
            n = labels.shape[0]
            return self.classes.cond(labels), self.classes.uncond(n, device), n
        if "prompt" not in batch:
            raise ConfigError("a text teacher needs prompts: set data.source to a prompt file or captioned images")
        cond, uncond = self.family.prompt_cond(list(batch["prompt"]), device)
        return cond, uncond, len(batch["prompt"])

    def _noise_shape(self, n: int) -> tuple[int, ...]:
        return self.family.noise_shape(n, self.run_config.data.resolution)

    def generate(self, cond: Cond, n: int, steps: int | None = None, grad: bool = False,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Student samples x0 (multi-step students: "backward simulation").

        Runs the student without gradient from pure noise through the first ``steps`` listed timesteps (each step
        predicts x0 and re-noises it with fresh noise to the next listed t, exactly as the exported LCMScheduler
        does), then predicts x0 once more at the reached timestep, with gradient if ``grad``. ``steps=None`` draws
        the number uniformly from {0, ..., K-1} so that training sees every input the K-step sampler produces.
        """
        ts = list(self.cfg.student_timesteps)
        if steps is None:
            steps = int(torch.randint(0, len(ts), ()).item()) if len(ts) > 1 else 0
        x = torch.randn(self._noise_shape(n), device=self.device) if noise is None else noise
        with torch.no_grad():
            for i in range(steps):
                x0 = self.student(x, ts[i], cond, "x0")
                t_next = torch.full((n,), ts[i + 1], device=x.device, dtype=torch.long)
                x = self.student.add_noise(x0, torch.randn_like(x0), t_next)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.student(x, ts[steps], cond, "x0")

    @torch.no_grad()
    def teacher_ode(self, noise: torch.Tensor, cond: Cond, uncond: Cond) -> torch.Tensor:
        """The teacher's deterministic DDIM solution (``regression_steps`` trailing steps, CFG in its interval) from
        ``noise``."""
        ts = S.ddim_timesteps(self.cfg.regression_steps, self.teacher.num_train_timesteps, "trailing").tolist()
        x = noise
        with self._adapters(False):
            for i, t in enumerate(ts):
                t_next = ts[i + 1] if i + 1 < len(ts) else -1  # -1: the clean end
                x = self.teacher.solver_step(x, t, t_next, cond, guidance_scale=self.guidance_at(t), uncond=uncond)
        return x

    @torch.no_grad()
    def _real_latents(self, batch: dict) -> torch.Tensor:
        """Real data in the networks' space (pixels, or VAE latents for text teachers) for the GAN term."""
        if "image" not in batch:
            raise ConfigError(GAN_IMAGES_MSG)
        x = batch["image"].to(self.device)
        return self.family.to_latents(x)

    def _fake_features(self) -> torch.Tensor:
        feats = self._captured.pop("mid", None)
        if feats is None:
            raise RuntimeError("the mid_block hook of the fake score captured nothing")
        return feats

    # --- the Method contract --------------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        # 4. Two time-scale update rule. The student is declared first: as in the DMD2 reference loop, one iteration
        # updates the generator against the current fake score, then fits the fake score to the updated generator,
        # so every student update sees a fake score that has just caught up with it.
        fake = [p for p in self.fake_denoiser().parameters() if p.requires_grad]
        if self.gan_head is not None:
            fake += list(self.gan_head.parameters())
        return [
            Phase("student", [p for p in self.student.parameters() if p.requires_grad],
                  every=self.cfg.fake_updates_per_student),
            Phase("fake_score", fake, every=1),
        ]

    def ema_network(self) -> nn.Module:
        # The exported student is the EMA of G when train.ema_decay > 0 (the EMA steps once per student update,
        # after it). The fake score keeps modelling the raw G.
        return self.student.model

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if phase == "student":
            return self.student_loss(batch)
        if phase == "fake_score":
            return self.fake_score_loss(batch)
        raise ValueError(f"unknown phase {phase!r}")

    def student_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Distribution matching (+ GAN, + regression) loss of the student."""
        c: DMD2Config = self.cfg
        cond, uncond, n = self._conditioning(batch)
        T = self.teacher.num_train_timesteps
        # 1. Student samples x0_g (1 step, or one grad step after a backward-simulated prefix).
        x0_g = self.generate(cond, n, grad=True)
        # 2. Re-noise to t ~ U[min_t T, max_t T] (indices into the timestep grid, see timestep_sampling).
        lo, hi = int(c.min_t * T), min(int(c.max_t * T) + 1, T)
        t = self._t_grid[torch.randint(lo, max(hi, lo + 1), (n,), device=self._t_grid.device)].to(x0_g.device)
        # The GAN term needs a path from x0_g through the fake score's features; the DM term does not.
        x_t = self.teacher.add_noise(x0_g if self.gan_head is not None else x0_g.detach(), torch.randn_like(x0_g), t)
        # 3. Real score (teacher with CFG) and fake score (no CFG). The teacher runs first: with a LoRA fake score
        # its adapters are switched off for it and must be on again before any graph through them is built.
        x0_real = self.real_score(x_t.detach(), t, cond, uncond)
        with torch.set_grad_enabled(self.gan_head is not None and c.gan_weight_student > 0):
            x0_fake = self.fake_denoiser()(x_t, t, cond, "x0")
        # 4. Distribution-matching gradient, normalised per sample by mean |p_real| over (C, H, W).
        x0_d = x0_g.detach().float()
        p_real = x0_d - x0_real.float()
        p_fake = x0_d - x0_fake.detach().float()
        norm = p_real.abs().mean(dim=tuple(range(1, p_real.ndim)), keepdim=True).clamp_min(_NORM_EPS)
        grad = torch.nan_to_num((p_real - p_fake) / norm)
        # 5. Its gradient w.r.t. x0_g is grad / numel: descending moves x0_g towards the teacher's prediction and
        # away from the fake score's.
        loss_dm = 0.5 * F.mse_loss(x0_g.float(), (x0_d - grad).detach(), reduction="mean")
        loss = loss_dm
        logs = {"dm_loss": loss_dm.item(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item()}
        # 6. GAN generator term on the fake score's bottleneck features of the re-noised samples.
        feats = self._captured.pop("mid", None)
        if self.gan_head is not None and c.gan_weight_student > 0:
            loss_g = F.softplus(-self.gan_head(feats)).mean()
            loss = loss + c.gan_weight_student * loss_g
            logs["gan_g_loss"] = loss_g.item()
        # 7. Regression warm-up towards the teacher's ODE output from the same noise (1-step output).
        if c.regression_weight > 0:
            z = torch.randn(self._noise_shape(n), device=x0_g.device)
            target = self.teacher_ode(z, cond, uncond)
            loss_reg = F.mse_loss(self.generate(cond, n, steps=0, grad=True, noise=z).float(), target.float())
            loss = loss + c.regression_weight * loss_reg
            logs["regression_loss"] = loss_reg.item()
        return loss, logs

    def fake_score_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Denoising loss of the fake score on detached student samples (+ the GAN critic loss)."""
        c: DMD2Config = self.cfg
        cond, _, n = self._conditioning(batch)
        T = self.teacher.num_train_timesteps
        real = self._real_latents(batch) if self.gan_head is not None else None  # checks images before the work
        # 1. Fresh student samples, without gradient (the fake score models the student, it does not train it).
        with torch.no_grad():
            x0_s = self.generate(cond, n)
        # 2. Ordinary denoising in the network's own parameterisation, at any noise level of the timestep grid.
        t = self._t_grid[torch.randint(0, T, (n,), device=self._t_grid.device)].to(x0_s.device)
        eps = torch.randn_like(x0_s)
        fake = self.fake_denoiser()
        pred = fake.raw(fake.add_noise(x0_s, eps, t), t, cond)
        loss_fake = F.mse_loss(pred.float(), fake.training_target(x0_s, eps, t).float())
        loss = loss_fake
        logs = {"denoise_loss": loss_fake.item()}
        feats_fake = self._captured.pop("mid", None)
        # 3. GAN critic: the same bottleneck features (of that denoising pass) for generated samples, and of real data
        # noised to the same levels; the head and the fake score's encoder learn to tell them apart.
        if self.gan_head is not None and c.gan_weight_critic > 0:
            real = real[:n].to(x0_s.dtype)
            fake(fake.add_noise(real, torch.randn_like(real), t[: real.shape[0]]), t[: real.shape[0]],
                 cond.index(slice(0, real.shape[0])), "x0")
            feats_real = self._fake_features()
            loss_d = F.softplus(-self.gan_head(feats_real)).mean() + F.softplus(self.gan_head(feats_fake)).mean()
            loss = loss + c.gan_weight_critic * loss_d
            logs["gan_d_loss"] = loss_d.item()
        return loss, logs

    # --- outputs --------------------------------------------------------------------------------------------------
    def export_scheduler(self):
        """A scheduler that reproduces the student's training-time sampler, with the timesteps recorded as
        ``student_timesteps`` in its config.

        DDPM-type teachers: an ``LCMScheduler``; ``timesteps=student_timesteps`` always reproduces the sampler, and
        ``original_inference_steps`` is chosen (largest first) so that ``num_inference_steps=len(student_timesteps)``
        gives the same list whenever the LCM spacing can express it. Flow-matching teachers: the teacher's
        ``FlowMatchEulerDiscreteScheduler`` without shifting (the trained noise levels are exact, recorded as
        ``student_sigmas``: pass them as ``sigmas=``), stochastic for several steps (each step predicts x0 and
        re-noises it with fresh noise, as backward simulation trained it).
        """
        ts = [int(t) for t in self.cfg.student_timesteps]
        if self.teacher.is_flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, shift=1.0,
                                                                use_dynamic_shifting=False,
                                                                stochastic_sampling=len(ts) > 1)
            sched.register_to_config(student_timesteps=ts,
                                     student_sigmas=[t / self.teacher.num_train_timesteps for t in ts])
            return sched
        from diffusers import LCMScheduler

        sched = LCMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                         thresholding=False, timestep_scaling=_LCM_TIMESTEP_SCALING)
        for n in range(50, len(ts) - 1, -1):
            try:
                sched.set_timesteps(len(ts), original_inference_steps=n)
            except ValueError:
                continue
            if sched.timesteps.tolist() == ts:
                sched.register_to_config(original_inference_steps=n)
                break
        sched.register_to_config(student_timesteps=ts)
        return sched

    def sampling_kwargs(self) -> dict:
        """How to ask the exported pipeline for the trained sampler: ``timesteps=`` (DDPM-type and our class
        pipeline) or ``sigmas=`` (the stock flow-matching pipelines)."""
        ts = [int(t) for t in self.cfg.student_timesteps]
        if self.teacher.is_flow and self.classes is None:
            return {"sigmas": [t / self.teacher.num_train_timesteps for t in ts]}
        return {"timesteps": ts}

    def pipeline(self, originals: bool = False):
        """The student as an in-memory pipeline of the teacher's own pipeline class (see Family.export_pipeline)."""
        return self.family.export_pipeline(self.student.model, self.export_scheduler(), originals)

    @torch.no_grad()
    def sample_grid(self, num: int, seed: int) -> np.ndarray:
        with self.family.frozen_in(torch.float32):
            return self._sample_grid(num, seed)

    def _sample_grid(self, num: int, seed: int) -> np.ndarray:
        pipe = self.pipeline()
        when = self.sampling_kwargs()
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num)]
        if self.classes is not None:
            labels = torch.arange(num) % self.classes.num_classes
            return to_uint8(pipe(labels, generator=gens, output_type="pt", **when).images)
        prompts = [self.cfg.sample_prompts[i % len(self.cfg.sample_prompts)] for i in range(num)]
        size = self.run_config.data.resolution
        images = pipe(prompts, guidance_scale=self.family.distilled_guidance_scale, generator=gens, output_type="np",
                      height=size, width=size,
                      **when).images
        return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)

    def export(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        pipe = self.pipeline(originals=self.run_config.train.teacher_dtype != "float32")
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
        ts = list(self.cfg.student_timesteps)
        when = ", ".join(f"{k}={v}" for k, v in self.sampling_kwargs().items())
        if self.classes is not None:
            use = (f"pipe = load_pipeline(\"{out_dir.name}\")  # from stepdistill.pipelines\n"
                   f"images = pipe(class_labels=[0, 1, 2], {when}).images")
        else:
            use = (f"pipe = {type(pipe).__name__}.from_pretrained(\"{out_dir.name}\")\n"
                   f"images = pipe([\"a photo of a cat\"], {when}, guidance_scale=1.0).images")
        if self.teacher.is_flow:
            how = (f"Sample with `{when}` (recorded as `student_sigmas`; the exported FlowMatchEulerDiscreteScheduler "
                   "does no shifting)")
        else:
            how = (f"Sample with `timesteps={ts}` (or `num_inference_steps={len(ts)}` with the saved "
                   f"`original_inference_steps={pipe.scheduler.config.original_inference_steps}`"
                   f"{'' if self._num_steps_reproduces(pipe.scheduler) else ', which does NOT reproduce them here'})")
        interval = [float(f) for f in self.cfg.real_guidance_interval]
        where = "" if interval == [0.0, 1.0] else f" at t/T in {interval}"
        (out_dir / "README.md").write_text(
            f"# DMD2 student ({len(ts)}-step)\n\n"
            f"Distilled from `{self.run_config.teacher}` with DMD2 (distribution matching + two time-scale updates"
            f"{', GAN term' if self.use_gan else ''}) by stepdistill:\n\n"
            f"    stepdistill train dmd2 --config <config.yaml>   # teacher={self.run_config.teacher}\n\n"
            f"Trained timesteps: `{ts}` (recorded as `student_timesteps` in scheduler/scheduler_config.json). "
            f"{how} and no CFG (the teacher's guidance w={self.cfg.real_guidance}{where} is distilled in).\n\n"
            f"```python\n{use}\n```\n")

    def _num_steps_reproduces(self, sched) -> bool:
        sched = copy.deepcopy(sched)
        try:
            sched.set_timesteps(len(self.cfg.student_timesteps))
        except ValueError:
            return False
        return sched.timesteps.tolist() == list(self.cfg.student_timesteps)
