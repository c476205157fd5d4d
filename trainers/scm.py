r"""sCM: continuous-time consistency distillation (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", arXiv 2410.11081; SANA-Sprint, arXiv 2503.09641).

The teacher and the student are seen in TrigFlow (:mod:`stepdistill.trigflow`): ``x_t = cos(t) x0 + sin(t) z``,
``z ~ N(0, sigma_d^2 I)``, ``t in [0, pi/2]``, the consistency function ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d
F(x_t, t)``. The student is a network of the teacher's kind (a trainable copy, or LoRA adapters on the teacher
network); its TrigFlow F comes from its own prediction by the same training-free conversion as the teacher's, so
``f`` is its x0 prediction and the export is an ordinary pipeline of the teacher's family.

Per step (numbered as in :func:`scm_loss`): draw t from a log-normal proposal over ``sigma_d tan t``; noise a data
sample x0 to x_t; the teacher's probability-flow velocity with CFG gives ``dx_t/dt = sigma_d F_teacher``; the
student's time derivative along the ODE, ``cos t sin t dF/dt``, comes from one Jacobian-vector product through the
student (``torch.func.jvp``, or a central finite difference where forward-mode AD is unavailable); the tangent

    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt)

(``F^-``: the student without gradient; ``r = min(1, step / tangent_warmup)``, the tangent warm-up) is normalised,
``g / (||g|| + c)``, and the student is pulled towards ``F^- + g`` with the loss

    e^{-v(t)} / (sigma_d tan t) * mean((F - F^- - g)^2) + v(t)

whose gradient is the continuous-time consistency gradient; ``v(t)`` is a small learned log-variance head (the paper's
adaptive weighting w(t) = -v(t)). Constants as the references: sigma_d 0.5, c 0.1, the prior weight
1 / (sigma_d tan t), the proposal (P_mean -1.0, P_std 1.4: the sCM paper's CIFAR-10 and FastGen's defaults; SANA-Sprint
uses (0.2, 1.6)), and tangent warm-up (SANA-Sprint 4000 iterations, FastGen 10000, NVlabs/rcm 1000).

Sampling (multistep consistency sampling): from noise at the teacher's largest noise level, predict x0, re-noise it
with fresh noise to the next time, predict again: ``sample_times`` lists the intermediate TrigFlow times per step count
(sCM's 2-step t = 1.1), recorded in the export as teacher timesteps.

Healthy runs (digits16, docs/results/scm_digits16.md): the loss is near 0 from the start with a small negative drift
as the log-variance head learns (``loss`` mixes ``v``; read ``scm_mse``, which falls); ``tangent_norm`` (before the
normalisation) grows while the warm-up ramps ``r`` to 1 and then settles. Failure modes: a tangent norm that keeps
growing by orders of magnitude after the warm-up (tangent explosion: lower the learning rate, lengthen
``tangent_warmup``, keep ``tangent_norm_c``); samples that go flat grey (the student ignores the tangent: check that
the teacher's guidance is what it samples well with).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.module import register_module_forward_pre_hook

from stepdistill import schedules as S
from stepdistill.batch import Batch
from stepdistill.conditioning import Cond
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError
from stepdistill.pipelines.export import LoraStudent, StudentSpec
from stepdistill.pipelines.families import Family
from stepdistill.pipelines.lora import adapters, add_lora, base_fingerprint, fuse_lora
from stepdistill.trigflow import TrigFlow

from .base import Method, Phase, Setup
from .consistency import LORA_TARGETS
from .score_distillation import score_student_spec

JVP_MODES = ("exact", "finite_difference")


@dataclass
class SCMConfig:
    # TrigFlow's sigma_d, the data's standard deviation in the networks' space (sCM, SANA-Sprint: 0.5).
    sigma_d: float = 0.5
    # The teacher's CFG scale for dx_t/dt, standard convention uncond + w (cond - uncond); 1 = no CFG. The student
    # distills this one w (it samples without CFG).
    teacher_guidance: float = 2.0
    # Log-normal proposal of the training noise levels: ln(sigma_d tan t) ~ N(p_mean, p_std^2) (sCM's CIFAR-10 and
    # FastGen: -1.0 / 1.4; SANA-Sprint: 0.2 / 1.6), t kept within the teacher's noise levels.
    p_mean: float = -1.0
    # Standard deviation of the log-normal proposal (see p_mean).
    p_std: float = 1.4
    # Tangent warm-up: the sin(t) term of the tangent is ramped in by r = min(1, step / tangent_warmup) (loop steps);
    # 0 = no warm-up (SANA-Sprint 4000, FastGen 10000, NVlabs/rcm 1000 / 0).
    tangent_warmup: int = 1000
    # Tangent normalisation g / (||g|| + c), the norm per sample over all its elements (sCM: c = 0.1).
    tangent_norm_c: float = 0.1
    # Adaptive weighting: a learned log-variance head v(t) on Fourier features of t (loss e^{-v} L + v); false = v = 0.
    adaptive_weighting: bool = True
    # How the student's time derivative is computed: "exact" (forward-mode AD, torch.func.jvp, attention by the math
    # kernel) or "finite_difference" (central difference of two forward passes along the same tangent: for attention
    # kernels and sharded networks without forward-mode AD, as FastGen offers).
    jvp: str = "exact"
    # Relative step of the finite difference: the time moves by fd_step * t (at least 1e-6) either way. FastGen uses
    # 1e-3 for EDM networks (time input ln(sigma) / 4); diffusers networks take the teacher's timestep in [0, 1000]
    # through sinusoidal embeddings of up to one radian per timestep, and 1e-3 spans ~1 timestep at t ~ 1.4, where
    # the difference then misses the derivative by ~50% on the tiny test networks; 1e-4 stays within 1%. The digits16
    # teacher's output wiggles over a few timesteps at the middle noise levels (its local derivative is 2.6x the
    # trend's at t = 1.1): there a step over several timesteps (0.05) trains far better than 1e-4 or the exact JVP
    # (docs/results/scm_digits16.md).
    fd_step: float = 1e-4
    # Integer-timestep finite difference (with jvp: finite_difference): > 0 snaps every training time to the nearest
    # integer timestep of the teacher and takes the difference between the timesteps fd_timesteps below and above it
    # (fd_step is then unused). For networks trained only at integer timesteps (DDPM-family teachers: SD1.x/2.x,
    # SDXL, the digits16 UNet), whose outputs between integers were never trained; 0 = continuous times. On
    # digits16 it did worse than a wider continuous difference (docs/results/scm_digits16.md).
    fd_timesteps: int = 0
    # LoRA student of this rank on the teacher network (adapters off = the teacher); 0 = a full trainable copy.
    lora_rank: int = 0
    # LoRA alpha (scale alpha / rank); 0 = the rank (scale 1).
    lora_alpha: float = 0.0
    # Intermediate TrigFlow times of the multistep sampler, one list per step count (the first step is always at the
    # teacher's largest noise level): [] = 1 step, [1.1] = sCM's 2-step sampler. Each list strictly decreasing in
    # (0, pi/2); recorded in the export as teacher timesteps (`sample_timesteps`, flow teachers also `sample_sigmas`).
    sample_times: list[list[float]] = field(default_factory=lambda: [[], [1.1], [1.3, 1.1, 0.8]])
    # Step count of the export's default schedule (`student_timesteps`) and of the periodic sample grids; one of the
    # sample_times' step counts.
    sample_steps: int = 2
    # Prompts of the periodic sample grids for text teachers (cycled).
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car", "a bowl of fruit",
                                                               "a mountain landscape"])


def check_scm_config(c: SCMConfig) -> None:
    """ConfigError naming the first sCM key out of its range."""
    if not c.sigma_d > 0 or not c.teacher_guidance > 0 or not c.p_std > 0:
        raise ConfigError("method_args.sigma_d, teacher_guidance and p_std must be > 0 (teacher_guidance 1 = no CFG)")
    if c.tangent_warmup < 0 or not c.tangent_norm_c > 0 or not 0 < c.fd_step < 0.5:
        raise ConfigError("method_args.tangent_warmup must be >= 0, tangent_norm_c > 0 and fd_step in (0, 0.5)")
    if c.fd_timesteps < 0 or (c.fd_timesteps > 0 and c.jvp != "finite_difference"):
        raise ConfigError("method_args.fd_timesteps must be >= 0, and > 0 only with jvp: finite_difference")
    if c.jvp not in JVP_MODES:
        raise ConfigError(f"method_args.jvp must be one of {', '.join(JVP_MODES)}, got {c.jvp!r}")
    if c.lora_rank < 0 or c.lora_alpha < 0:
        raise ConfigError(f"method_args.lora_rank / lora_alpha must be >= 0 (rank 0 = a full student), got "
                          f"{c.lora_rank} / {c.lora_alpha}")
    for ts in c.sample_times:
        ts = list(ts)
        if any(not 0 < t < math.pi / 2 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"method_args.sample_times: each list must be strictly decreasing TrigFlow times in "
                              f"(0, pi/2), got {ts}")
    counts = [len(ts) + 1 for ts in c.sample_times]
    if len(set(counts)) != len(counts) or c.sample_steps not in counts:
        raise ConfigError(f"method_args.sample_times must give at most one list per step count, one of them for "
                          f"sample_steps={c.sample_steps} (they give {counts} steps)")


# --- pure pieces ---------------------------------------------------------------------------------------------------
class LogVarianceHead(nn.Module):
    """The adaptive weighting's log-variance v(t): fixed Fourier features of t, one linear layer, zero at init
    (FastGen's EDM2 head: Fourier(128) -> 1)."""

    def __init__(self, features: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # Frequencies and phases are buffers (fixed, checkpointed), as magnitude-preserving Fourier features are.
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = math.sqrt(2) * torch.cos(t.float()[:, None] * self.freqs + self.phases)
        return self.linear(feats).sum(dim=1)


def draw_times(n: int, p_mean: float, p_std: float, sigma_d: float, lo: float, hi: float,
               device: torch.device) -> torch.Tensor:
    """``n`` TrigFlow times t = atan(exp(N(p_mean, p_std^2)) / sigma_d), clamped to [lo, hi] (float64)."""
    ratio = torch.exp(p_mean + p_std * torch.randn(n, device=device, dtype=torch.float64))
    return torch.atan(ratio / sigma_d).clamp(lo, hi)


@contextmanager
def forward_mode_ad() -> Iterator[None]:
    """What diffusers networks need for forward-mode AD (``torch.func.jvp``) in the block: attention in the math
    kernel (the fused CPU and flash kernels have no forward-mode formula) and GroupNorm inputs made contiguous (torch's
    forward-mode formula of group_norm fails, "view size is not compatible with input tensor's size and stride", on a
    non-contiguous input, which diffusers' attention blocks hand the next resnet). Values are unchanged."""
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if isinstance(module, nn.GroupNorm) and args and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    handle = register_module_forward_pre_hook(hook)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        handle.remove()


def time_derivative(F_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                    dxdt: torch.Tensor, mode: str, fd_step: float = 1e-4,
                    bounds: tuple[float, float] = (0.0, math.pi / 2),
                    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``cos(t) sin(t) dF/dt`` of ``F_fn(x, t)`` along the ODE (x moving at ``dxdt``), without gradient.

    "exact": one JVP with tangents ``(cos t sin t dxdt, cos t sin t)`` (sCM's scaling, which keeps it finite at both
    ends); attention runs in the math kernel, which forward-mode AD supports. "finite_difference": the central
    difference ``(F(x + d dxdt, t + d) - F(x - d dxdt, t - d)) / 2d`` with ``d = max(fd_step t, 1e-6)`` per sample,
    kept inside ``bounds`` (the times the networks can be asked about), times ``cos t sin t``; with ``neighbours``
    (times below and above t), the difference between those instead.
    """
    cs = torch.cos(t) * torch.sin(t)
    csx = cs.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    with torch.no_grad():
        if mode == "exact":
            with forward_mode_ad():
                _, out = torch.func.jvp(F_fn, (x, t), (csx * dxdt, cs))
            return out.detach()
        if neighbours is None:
            d = torch.minimum(torch.clamp(fd_step * t, min=1e-6), torch.minimum(t - bounds[0], bounds[1] - t))
            neighbours = (t - d, t + d)
        below, above = neighbours
        up, down = ((a - b).to(x.dtype).reshape_as(csx) for a, b in ((above, t), (t, below)))
        diff = F_fn(x + up * dxdt, above) - F_fn(x - down * dxdt, below)
        return csx * diff / (up + down)


def tangent(F_minus: torch.Tensor, dxdt: torch.Tensor, dF: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
            sigma_d: float, r: float = 1.0) -> torch.Tensor:
    """sCM's tangent ``cos(t) df^-/dt`` of the consistency function ``f = cos(t) x - sin(t) sigma_d F`` along the ODE:
    ``-cos^2 t (sigma_d F^- - dx/dt) - r (cos t sin t x_t + sigma_d dF)``, with ``dF = cos t sin t dF^-/dt`` (from
    :func:`time_derivative`) and ``r`` the warm-up factor of the sin(t) term (1 = the exact derivative)."""
    cos, sin = S.expand_like(torch.cos(t), x_t), S.expand_like(torch.sin(t), x_t)
    return -cos**2 * (sigma_d * F_minus - dxdt) - r * (cos * sin * x_t + sigma_d * dF)


@dataclass
class SCMNets:
    """The networks of one sCM step: the student and teacher seen in TrigFlow, the log-variance head (None: v = 0), and
    the teacher's own context (a LoRA student's adapters off)."""

    student: TrigFlow
    teacher: TrigFlow
    logvar: LogVarianceHead | None = None
    teacher_only: Callable[[], AbstractContextManager] = nullcontext


def scm_loss(c: SCMConfig, nets: SCMNets, x0: torch.Tensor, cond: Cond, uncond: Cond,
             step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The continuous-time consistency distillation loss at loop step ``step`` on data ``x0`` (networks' space)."""
    n, sd = x0.shape[0], c.sigma_d
    tf_s, tf_t = nets.student, nets.teacher
    # 1. Noise levels from the log-normal proposal, strictly inside the teacher's range (so that a finite
    # difference has neighbours on both sides).
    lo, hi = tf_t.time_range()
    t = draw_times(n, c.p_mean, c.p_std, sd, lo + 1e-3, hi - 1e-3, x0.device)
    neighbours = None
    if c.fd_timesteps:  # snapped to the teacher's integer timesteps, the difference over +-fd_timesteps of them
        m = c.fd_timesteps
        first = math.ceil(float(tf_t.timestep(torch.tensor([lo + 1e-3], dtype=torch.float64))[0]))
        last = math.floor(float(tf_t.timestep(torch.tensor([hi - 1e-3], dtype=torch.float64))[0]))
        k = tf_t.timestep(t).round().clamp(first + m, last - m)
        t, below, above = (tf_t.time(j).to(x0.device) for j in (k, k - m, k + m))
        neighbours = (below, above)
    # 2. x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2).
    x_t = tf_t.noise(x0, sd * torch.randn_like(x0), t)
    # 3. The teacher's PF-ODE velocity dx_t/dt = sigma_d F_teacher, with CFG.
    g_scale = None if c.teacher_guidance == 1 else c.teacher_guidance
    with torch.no_grad(), nets.teacher_only():
        dxdt = sd * tf_t.velocity(x_t, t, cond, g_scale, uncond)
    # 4. The student's F with gradient; F^- is it without.
    F_theta = tf_s.velocity(x_t, t, cond)
    F_minus = F_theta.detach()
    # 5. cos t sin t dF^-/dt along the ODE.
    dF = time_derivative(lambda x, tt: tf_s.velocity(x, tt, cond), x_t, t, dxdt, c.jvp, c.fd_step, (lo, hi),
                         neighbours)
    # 6. The tangent (times cos t), warmed up and normalised per sample.
    r = 1.0 if c.tangent_warmup == 0 else min(1.0, step / c.tangent_warmup)
    g = tangent(F_minus, dxdt, dF, x_t, t, sd, r)
    g_norm = g.flatten(1).norm(dim=1)
    g = g / S.expand_like(g_norm + c.tangent_norm_c, g)
    # 7. Pull F towards F^- + g, weighted by the prior 1 / (sigma_d tan t) and the adaptive log-variance v(t).
    mse = (F_theta.float() - F_minus.float() - g.float()).pow(2).flatten(1).mean(dim=1)
    prior = 1 / (sd * torch.tan(t)).float()
    v = nets.logvar(t) if nets.logvar is not None else torch.zeros_like(prior)
    loss = (torch.exp(-v) * prior * mse + v).mean()
    logs = {"scm_mse": mse.mean().item(), "tangent_norm": g_norm.mean().item(), "tangent_warmup_r": r,
            "logvar_mean": v.mean().item()}
    return loss, logs


# --- the student ---------------------------------------------------------------------------------------------------
def sample_schedules(c: SCMConfig, teacher: TrigFlow) -> list[list[int]]:
    """The multistep samplers of ``sample_times`` as teacher timesteps (descending, distinct; flow teachers in
    [1, T], starting at T = pure noise)."""
    T = teacher.T
    top = T if teacher.net.is_flow else T - 1
    out = []
    for times in c.sample_times:
        ts = [top] + [int(round(float(teacher.timestep(torch.tensor([float(t)], dtype=torch.float64))[0])))
                      for t in times]
        ts = [min(max(v, 1), top) for v in ts]
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"method_args.sample_times {list(times)} map to teacher timesteps {ts}, which are not "
                              "strictly decreasing: space the times further apart")
        out.append(ts)
    return out


class TrigFlowStudent(nn.Module):
    """A student trained in TrigFlow, with what its losses and export need: the student network as a Denoiser (a
    trainable copy of the teacher network, or LoRA adapters on the teacher network itself), the adaptive weighting's
    log-variance head, and its samplers as teacher timesteps.

    Args:
        family: the teacher's model family.
        teacher: the frozen teacher Denoiser.
        c: the sCM keys.
    """

    def __init__(self, family: Family, teacher: Denoiser, c: SCMConfig):
        super().__init__()
        check_scm_config(c)
        if 4 * c.fd_timesteps >= teacher.num_train_timesteps:
            raise ConfigError(f"method_args.fd_timesteps={c.fd_timesteps} leaves no room in the teacher's "
                              f"{teacher.num_train_timesteps} timesteps: use fewer than a quarter of them")
        self.family = family
        self.c = c
        self.lora = c.lora_rank > 0
        self.lora_config = None
        if self.lora:
            self.lora_config = add_lora(teacher.model, c.lora_rank, c.lora_alpha, LORA_TARGETS,
                                        "method_args.lora_rank")
            # The base weights' fingerprint a LoRA export records, taken before they are cast to train.teacher_dtype.
            self.base_fingerprint = base_fingerprint(teacher.model)
            self.student = teacher
        else:
            self.student = family.denoiser(copy.deepcopy(teacher.model).requires_grad_(True))
        self.logvar = LogVarianceHead() if c.adaptive_weighting else None
        self.schedules = sample_schedules(c, TrigFlow(teacher, c.sigma_d))

    def teacher_only(self) -> AbstractContextManager:
        """With a LoRA student, its adapters off for the block (the network is the teacher); a no-op otherwise."""
        return adapters(self.student.model, False) if self.lora else nullcontext()

    def nets(self, teacher: Denoiser) -> SCMNets:
        """The handles of :func:`scm_loss`."""
        sd = self.c.sigma_d
        return SCMNets(TrigFlow(self.student, sd), TrigFlow(teacher, sd), self.logvar, self.teacher_only)

    def params(self) -> list[nn.Parameter]:
        """What the student phase trains: the student's trainable weights and the log-variance head."""
        head = list(self.logvar.parameters()) if self.logvar is not None else []
        return [p for p in self.student.parameters() if p.requires_grad] + head

    def ema_network(self) -> nn.Module | None:
        return None if self.lora else self.student.model

    def timesteps(self) -> list[int]:
        """The default sampler (``sample_steps`` steps) as teacher timesteps."""
        return next(ts for ts in self.schedules if len(ts) == self.c.sample_steps)

    def spec(self, method: str, title: str, trained: str, guidance: str, teacher: Denoiser,
             teacher_name: str) -> StudentSpec:
        """The export: the score-distilled students' (x0 prediction at the recorded timesteps, fresh noise between
        steps: multistep consistency sampling) with every ``sample_times`` schedule recorded; a LoRA student as its
        adapters on the teacher."""
        c = self.c
        lora = None
        network = self.student.model
        if self.lora:
            lora = LoraStudent(network, self.lora_config, self.base_fingerprint)
            # float32 like every exported student, whatever dtype the frozen base weights are kept in.
            network = fuse_lora(copy.deepcopy(network)).float()
        T = teacher.num_train_timesteps
        derivative = ("exact (JVP)" if c.jvp == "exact" else f"finite difference over +-{c.fd_timesteps} timesteps"
                      if c.fd_timesteps else f"finite difference over +-{c.fd_step:g} t")
        settings = (f"Settings: sigma_d {c.sigma_d}, proposal ln(sigma_d tan t) ~ N({c.p_mean}, {c.p_std}^2), "
                    f"tangent warm-up {c.tangent_warmup} steps, time derivative {derivative}; recorded samplers "
                    f"(teacher timesteps): {self.schedules}.")
        spec = score_student_spec(method, title, trained, guidance, self.family, teacher, teacher_name, [network],
                                  self.timesteps(), list(c.sample_prompts), lora=lora, card_lines=[settings])
        spec.scheduler.register_to_config(sample_timesteps=self.schedules)
        if teacher.is_flow:
            # Every step re-noises the predicted x0 with fresh noise (FlowMatchEulerDiscreteScheduler's stochastic
            # mode), also for the 1-step default.
            spec.scheduler.register_to_config(stochastic_sampling=True,
                                              sample_sigmas=[[t / T for t in ts] for ts in self.schedules])
        return spec


class SCMMethod(Method):
    r"""sCM (continuous-time consistency distillation) of a diffusers teacher into a 1-4 step student.

    Networks: the frozen teacher (through TrigFlow) and a :class:`TrigFlowStudent`.

    Args:
        setup: the teacher's family and Denoiser, the world, the data.
        cfg: the method's :class:`SCMConfig`.
    """

    name = "scm"
    Config = SCMConfig
    phase_names = ("student",)
    images_needed_for = "x0 samples to noise (sCM trains on the teacher's ODE from data)"
    # Loss weights and noise levels may change when a run continues (train --allow-changes).
    stage_changes = ("teacher_guidance", "p_mean", "p_std", "tangent_warmup", "tangent_norm_c", "jvp", "fd_step")

    def __init__(self, setup: Setup, cfg: SCMConfig):
        super().__init__(setup, cfg)
        self.scm = TrigFlowStudent(self.family, setup.teacher, cfg)
        # With a LoRA student the teacher is the student's network with its adapters off: registered once.
        self.frozen_teacher = None if self.scm.lora else setup.teacher

    @property
    def teacher(self) -> Denoiser:
        """The teacher Denoiser (with a LoRA student: the same network, called with adapters off)."""
        return self.scm.student if self.scm.lora else self.frozen_teacher

    # FSDP2 gathers a sharded network's weights in hooks around its forward; forward-mode AD through those hooks
    # does not work, the finite difference is three plain forward passes.
    not_shardable_because = ("the exact JVP (forward-mode AD) does not pass FSDP2's hooks; set "
                             "method_args.jvp=finite_difference, or train.sharding=none")

    @property
    def shardable(self) -> bool:  # type: ignore[override]
        return self.cfg.jvp == "finite_difference"

    def phases(self) -> list[Phase]:
        return [Phase("student", self.scm.params(), real=True)]

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if phase != "student":
            raise ValueError(f"unknown phase {phase!r}")
        return scm_loss(self.cfg, self.scm.nets(self.teacher), batch.real, batch.cond, batch.uncond, step)

    def ema_network(self) -> nn.Module | None:
        return self.scm.ema_network()

    def export_spec(self) -> StudentSpec:
        c = self.cfg
        return self.scm.spec(self.name, "sCM", "sCM (continuous-time consistency distillation)",
                             f"the teacher's guidance w={c.teacher_guidance}", self.teacher, self.teacher_name)
