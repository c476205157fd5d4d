"""DMD2: Improved Distribution Matching Distillation (Yin et al., 2024).

The student G is trained to match its output distribution to the teacher's by following the difference of two
scores: the frozen teacher's ("real", with CFG) and a "fake" score network that is fitted online, by ordinary
denoising, to the student's own samples. A two time-scale update rule keeps the fake score close to the current
student; an optional GAN term on the fake score's bottleneck features lets real data in, and multi-step students are
trained on their own intermediate samples ("backward simulation").

Phases: ``student`` (every ``fake_updates_per_student`` steps) and ``fake_score`` (every step, with the GAN head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stepdistill import schedules as S
from stepdistill.config import OptimConfig
from stepdistill.errors import ConfigError

from .score_distillation import ScoreDistillationConfig, ScoreDistillationMethod, loss_from_grad, score_difference_grad

TIMESTEP_SAMPLING = ("uniform", "karras")
GAN_IMAGES_MSG = ("GAN term needs real images: set data.source to an image dataset or set "
                  "method_args.gan_weight_student=0")


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
    # Width of the GAN head on the fake score's bottleneck (mid_block) features.
    gan_head_channels: int = 64
    # Regression warm-up: weight of MSE(student 1-step output, teacher ODE output from the same noise); 0 = off.
    regression_weight: float = 0.0
    # Teacher DDIM steps (with CFG real_guidance in real_guidance_interval) of the regression targets.
    regression_steps: int = 20


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


class DMD2Method(ScoreDistillationMethod):
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
    title = "DMD2"
    # A run may continue with new loss weights, real-score guidance, noise ranges and TTUR ratio (train
    # --allow-changes), e.g. a larger GAN weight late in training. A new TTUR ratio needs a constant student LR
    # schedule: a decaying one counts student updates, and its length would no longer match its position.
    stage_changes = ("dm_weight", "real_guidance", "real_guidance_interval", "min_t", "max_t", "timestep_sampling",
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
        # GAN head on the fake score's bottleneck features, captured by a forward hook on its mid_block.
        self.use_gan = c.gan_weight_student > 0 or c.gan_weight_critic > 0
        self.gan_head: GANHead | None = None
        self._captured: dict[str, torch.Tensor] = {}
        if self.use_gan:
            src = Path(run_config.data.source)
            if src.is_file() and src.suffix.lower() in (".txt", ".prompts"):
                raise ConfigError(GAN_IMAGES_MSG)
            self._build_gan(c)

    # --- construction helpers -----------------------------------------------------------------------------------
    def _gan_head_for(self, fake_net: nn.Module, c: DMD2Config) -> GANHead:
        """A GAN head for ``fake_net``'s bottleneck, whose features a forward hook on its mid_block captures."""
        mid = getattr(fake_net, "mid_block", None)
        if mid is None:
            raise ConfigError("the GAN term needs a teacher network with a mid_block (bottleneck features)")
        mid.register_forward_hook(self._capture_mid)
        return GANHead(int(fake_net.config.block_out_channels[-1]), c.gan_head_channels)

    def _build_gan(self, c: DMD2Config) -> None:
        """``self.gan_head`` on the fake score's features (a method with several fake scores builds one each)."""
        self.gan_head = self._gan_head_for(self._fake_net, c)

    def timestep_grid(self) -> torch.Tensor:
        # Timestep drawn for grid index k (k uniform): the identity, or the Karras-spaced grid.
        all_t = torch.arange(self.teacher.num_train_timesteps)
        if self.cfg.timestep_sampling == "uniform":
            return all_t
        return S.karras_timestep_grid(*self.teacher.alpha_sigma(all_t), self.teacher.num_train_timesteps)

    def _validate(self, c: DMD2Config, T: int, flow: bool) -> None:
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

    def _capture_mid(self, module: nn.Module, args, output) -> None:
        self._captured["mid"] = output[0] if isinstance(output, tuple) else output

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

    @torch.no_grad()
    def teacher_ode(self, noise: torch.Tensor, cond, uncond) -> torch.Tensor:
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

    # --- the losses -----------------------------------------------------------------------------------------------
    def critic_params(self) -> list[nn.Parameter]:
        return list(self.gan_head.parameters()) if self.gan_head is not None else []

    def student_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Distribution matching (+ GAN, + regression) loss of the student."""
        c: DMD2Config = self.cfg
        cond, uncond, n = self._conditioning(batch)
        # 1. Student samples x0_g (1 step, or one grad step after a backward-simulated prefix).
        x0_g = self.generate(cond, n, grad=True)
        # 2. Re-noise to t ~ U[min_t T, max_t T] (indices into the timestep grid, see timestep_sampling).
        t = self.draw_timesteps(n, c.min_t, c.max_t, x0_g.device)
        # The GAN term needs a path from x0_g through the fake score's features; the DM term does not.
        x_t = self.teacher.add_noise(x0_g if self.gan_head is not None else x0_g.detach(), torch.randn_like(x0_g), t)
        # 3. Real score (teacher with CFG) and fake score (no CFG). The teacher runs first: with a LoRA fake score
        # its adapters are switched off for it and must be on again before any graph through them is built.
        x0_real = self.real_score(x_t.detach(), t, cond, uncond)
        with torch.set_grad_enabled(self.gan_head is not None and c.gan_weight_student > 0):
            x0_fake = self.fake_prediction(x_t, t, cond)
        # 4. Distribution-matching gradient, normalised per sample by mean |x0_g - x0_real| over (C, H, W); its
        # loss has gradient grad / numel w.r.t. x0_g.
        grad = score_difference_grad(x0_g, x0_real, x0_fake, normalise=True)
        loss_dm = loss_from_grad(x0_g, grad)
        loss = loss_dm if c.dm_weight == 1 else c.dm_weight * loss_dm
        logs = {"dm_loss": loss_dm.item(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item()}
        # 5. GAN generator term on the fake score's bottleneck features of the re-noised samples.
        feats = self._captured.pop("mid", None)
        if self.gan_head is not None and c.gan_weight_student > 0:
            loss_g = F.softplus(-self.gan_head(feats)).mean()
            loss = loss + c.gan_weight_student * loss_g
            logs["gan_g_loss"] = loss_g.item()
        # 6. Regression warm-up towards the teacher's ODE output from the same noise (1-step output).
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
        real = self._real_latents(batch) if self.gan_head is not None else None  # checks images before the work
        # 1. Fresh student samples, without gradient (the fake score models the student, it does not train it).
        with torch.no_grad():
            x0_s = self.generate(cond, n)
        # 2. Ordinary denoising in the network's own parameterisation, at any noise level of the timestep grid.
        t = self.draw_timesteps(n, 0.0, 1.0, x0_s.device)
        loss_fake = self.fake_denoising_loss(x0_s, t, cond)
        loss = loss_fake
        logs = {"denoise_loss": loss_fake.item()}
        feats_fake = self._captured.pop("mid", None)
        # 3. GAN critic: the same bottleneck features (of that denoising pass) for generated samples, and of real data
        # noised to the same levels; the head and the fake score's encoder learn to tell them apart.
        if self.gan_head is not None and c.gan_weight_critic > 0:
            fake = self.fake_denoiser()
            real = real[:n].to(x0_s.dtype)
            fake(fake.add_noise(real, torch.randn_like(real), t[: real.shape[0]]), t[: real.shape[0]],
                 cond.index(slice(0, real.shape[0])), "x0")
            feats_real = self._fake_features()
            loss_d = F.softplus(-self.gan_head(feats_real)).mean() + F.softplus(self.gan_head(feats_fake)).mean()
            loss = loss + c.gan_weight_critic * loss_d
            logs["gan_d_loss"] = loss_d.item()
        return loss, logs

    # --- outputs --------------------------------------------------------------------------------------------------
    def card_summary(self) -> tuple[str, str]:
        interval = [float(f) for f in self.cfg.real_guidance_interval]
        where = "" if interval == [0.0, 1.0] else f" at t/T in {interval}"
        return (f"DMD2 (distribution matching + two time-scale updates{', GAN term' if self.use_gan else ''})",
                f"the teacher's guidance w={self.cfg.real_guidance}{where}")
