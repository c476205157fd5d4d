r"""Consistency distillation: LCM (Luo et al., 2023), LCM-LoRA and multiphase / trajectory-segmented CD (Hyper-SD,
PCM).

The student G learns to map every point of the teacher's probability-flow ODE trajectory to the same point: the
clean end (LCM, one segment) or the lower boundary of the segment of [0, T] it lies in (multiphase, S segments).
Per step (numbered as in :meth:`ConsistencyMethod.student_loss`): pick t_{n+k} on a DDIM grid, noise x0 to it, take
one teacher DDIM step with CFG at a per-sample guidance scale w to t_n, and pull G(x_{t_{n+k}}) towards the target
G_target(x_{t_n}) (no grad) under a pseudo-Huber or L2 distance.

Variants, chosen by config:

- **LCM** (``lora_rank: 0``, ``segments: [1]``): a full trainable copy of the teacher network; the target is an EMA
  of the student (``target_ema_decay``, 0.95 as LCM) that the method owns and updates itself at the start of every
  loop step. Its weights are *buffers* (not frozen parameters) so that the loop's checkpoints, which leave frozen
  parameters out, store them and resume is exact; every rank computes the same EMA.
- **LCM-LoRA** (``lora_rank > 0``): peft LoRA adapters on the teacher network itself; the teacher is that network
  with the adapters switched off; the target is the student under no grad with an EMA of its adapter weights swapped
  in (``target_ema_decay`` > 0; the adapters alone, no second copy of the network) or, at 0, the student itself as in
  the LCM-LoRA reference, which diverged on digits16.
- **Multiphase** (``segments: [8, 4, 2, 1]`` with ``segment_starts: [0, a, b, c]``): the consistency target is the
  start (lower boundary) of the current segment; G maps x_t to that boundary by a DDIM step from its own x0/eps
  prediction, and the student samples in S steps with deterministic trailing DDIM.

Student parameterisation (one formula for all variants): with the student's (x0, eps) prediction at (x_t, t),
``x0_hat = c_skip(t) x_t + c_out(t) x0`` (LCM's boundary scalings, sigma_data 0.5, timestep scaling 10, so that
G(x, 0) = x exactly) and ``G(x_t, t; b) = alpha_b x0_hat + sigma_b eps`` for the segment boundary b (b = clean end:
alpha 1, sigma 0, i.e. G = x0_hat, LCM itself). At t = b the DDIM step is the identity (the boundary condition).

Guidance: the teacher uses the standard CFG ``uncond + w (cond - uncond)`` with w ~ U[guidance_min, guidance_max]
per sample. LCM's paper draws w ~ U[5, 15] in its convention ``cond + w' (cond - uncond)``, i.e. w = w' + 1 ~ U[6, 16]
here. A full ``UNet2DConditionModel`` student is conditioned on w through diffusers' guidance-scale embedding of
``w - 1`` (the LCM convention, exactly what ``StableDiffusionPipeline`` feeds a UNet with ``time_cond_proj_dim``), so
the exported pipeline's ``guidance_scale`` selects the distilled w. ``UNet2DModel`` (the class-conditional digits16
network) has no ``timestep_cond`` input: a full student of it distills one fixed w (guidance_min == guidance_max; a
range is a ConfigError). Adding a w input would need a network class of our own that stock diffusers and the
exported ClassConditionalPipeline cannot load, for a toy whose teacher is used at one w anyway. LoRA students are
never w-conditioned (as LCM-LoRA): a range trains them on an average of the guided trajectories.

Data: consistency distillation needs x0 samples (images, VAE-encoded for latent teachers by the family). A prompt
file has none and is refused before anything is written; generating x0 with the teacher (50 guided steps per sample)
would cost more than the distillation.

Healthy runs. Observed only on small runs: a tiny *random-weight* class-conditional teacher (8/16 channels),
batch 32, 300 steps, the digits16 configs' learning rates (the trained digits16 teacher was not available yet), so
read the shapes, not the values:

- LCM (full, huber): falls fast at first (0.020 at step 10 -> 0.014 at step 100), then slowly and noisily
  (0.012 +- 0.0005 from step 190 on). The noise comes from the random t_{n+k}: the large-t points carry most of the
  loss. A loss that keeps falling towards 0 while the sample grids go blank is collapse, not progress.
- LCM-LoRA: the same shape, slower and higher (0.021 -> 0.018 at step 100 -> 0.016 at 300): fewer parameters, and
  the target moves with the student itself.
- Multiphase (4 -> 2 -> 1 segments at steps 0/100/200): within a phase the LCM shape (4 segments: 0.0074 -> 0.0054);
  each drop of the segment count makes the loss jump up (-> 0.0089 with 2 segments, -> 0.012 with 1), because the
  jumps to the boundary get longer; the logged ``segments`` value marks the phases. A jump that does not settle
  within the phase means the phase is too short.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
from torch import nn

from stepdistill import schedules as S
from stepdistill.batch import Batch
from stepdistill.conditioning import Cond, sample_guidance_scale
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError
from stepdistill.pipelines.export import LoraStudent, StudentSpec, teacher_reference
from stepdistill.pipelines.families.base import takes_keyword
from stepdistill.pipelines.lora import adapters, add_lora, base_fingerprint, fuse_lora

from .base import Method, Phase, Setup

# Modules LCM-LoRA adapts (those present in the network are used): attention projections and feed-forwards of
# transformer blocks, resnet convolutions and time projections, up/down-samplers.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass
class ConsistencyConfig:
    # Points of the teacher's DDIM solver grid over the T training timesteps (LCM: 50 -> skip k = T / 50 = 20).
    num_ddim_timesteps: int = 50
    # Teacher CFG scale w ~ U[guidance_min, guidance_max] per sample, standard convention uncond + w (cond - uncond)
    # (LCM's U[5, 15] in its own convention is U[6, 16] here). min == max distills one fixed w; 1 = no CFG.
    guidance_min: float = 2.0
    # Upper end of the teacher CFG scale range (see guidance_min).
    guidance_max: float = 2.0
    # Dimension of the guidance-scale embedding of full UNet2DConditionModel students (LCM: 256; fed to the UNet's
    # timestep_cond). 0 = no embedding (then guidance_min must equal guidance_max). Unused by LoRA and UNet2DModel.
    w_embedding_dim: int = 256
    # Distance d(student, target): "huber" (LCM's elementwise pseudo-Huber sqrt((a-b)^2 + c^2) - c, mean) or "l2".
    loss: str = "huber"
    # Pseudo-Huber constant c (LCM: 0.001; iCT: 0.00054 sqrt(dim)).
    huber_c: float = 0.001
    # EMA decay of the target network (LCM: 0.95). Full students keep an EMA copy of the network; LoRA students an EMA
    # copy of the adapter weights only (a few MB), swapped in for the target. 0 = the online student is its own
    # target, as the LCM-LoRA reference script does; on digits16 that diverges (docs/results/consistency_digits16.md).
    target_ema_decay: float = 0.95
    # sigma_data of the LCM boundary scalings c_skip(t), c_out(t) (LCM: 0.5).
    sigma_data: float = 0.5
    # Timestep scaling of the LCM boundary scalings (LCM: 10).
    timestep_scaling: float = 10.0
    # LoRA student (LCM-LoRA) of this rank on the teacher network; 0 = a full trainable student.
    lora_rank: int = 0
    # LoRA alpha (scale alpha / rank); 0 = the rank (scale 1). LCM-LoRA: rank 64, alpha 64.
    lora_alpha: float = 0.0
    # Trajectory segments (multiphase CD): a list of segment counts S, each a divisor of T, [1] = plain LCM; with
    # several, segment_starts gives the loop step at which each count takes over (progressive, e.g. 8 -> 4 -> 2 -> 1).
    segments: list[int] = field(default_factory=lambda: [1])
    # Loop step at which each entry of segments takes over (one per entry, starting at 0).
    segment_starts: list[int] = field(default_factory=lambda: [0])
    # Prompts of the periodic sample grids for text teachers (cycled).
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car", "a bowl of fruit",
                                                               "a mountain landscape"])
    # Steps of the sample grids for one-segment (LCM) students (multiphase students sample in S steps).
    sample_steps: int = 4
    # Recommended sampling schedules of a one-segment (LCM) student, one list per step count, each descending and on
    # the DDIM grid, e.g. [[999, 699, 399, 19]]. Recorded as `sample_timesteps` in the exported scheduler config and
    # the model card; `stepdistill sample/eval/bench` use the list whose length is the step count asked for, the
    # scheduler's own rule otherwise. LCMScheduler's rule ends 4 steps at t = 259 on a 50-point grid; on digits16
    # ending at 19 gave a much lower FID and KID (docs/results/consistency_digits16.md). [] = the scheduler's rule
    # for every count. Ignored (not recorded) when the student ends with several segments (it samples at the
    # segment starts).
    sample_timesteps: list[list[int]] = field(default_factory=list)


# --- pure helpers ------------------------------------------------------------------------------------------------
def ddim_grid(num_ddim_timesteps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Ascending DDIM solver grid t_i = (i + 1) k - 1 with skip k = T // N (LCM's grid, also LCMScheduler's)."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def segment_edges(num_segments: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending segment edges [T-1, T-1-T/S, ..., T/S-1, -1] (-1 = the clean end); trailing DDIM's timesteps."""
    step = num_train_timesteps // num_segments
    return [num_train_timesteps - 1 - j * step for j in range(num_segments)] + [-1]


def segment_boundary(t: torch.Tensor, num_segments: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Lower boundary of the segment holding each timestep t (segments (e_{j+1}, e_j]); -1 for the last one."""
    step = num_train_timesteps // num_segments
    j = torch.div(num_train_timesteps - 1 - t, step, rounding_mode="floor")
    b = num_train_timesteps - 1 - (j + 1) * step
    return torch.where(j + 1 >= num_segments, torch.full_like(b, -1), b)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Mean elementwise pseudo-Huber distance sqrt((a - b)^2 + c^2) - c (LCM's form)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c).mean()


class AdapterEMA(nn.Module):
    """EMA copies (buffers, so they are checkpointed and never trained) of a LoRA student's adapter weights."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = params  # a plain list: not registered, the student owns them
        for i, p in enumerate(params):
            self.register_buffer(f"w{i}", p.detach().clone())

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"w{i}") for i in range(len(self.params))]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for w, p in zip(self.weights(), self.params):
            w.lerp_(p.detach(), 1 - decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the adapters for the block (no gradient use), the trained ones back afterwards."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for w, p in zip(self.weights(), self.params):
                p.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, p in zip(trained, self.params):
                    p.copy_(t)


def params_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a (persistent) buffer of the same name, in place."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            delattr(m, name)
            m.register_buffer(name, p.detach().clone())
    return module



def check_consistency_config(c: ConsistencyConfig, T: int) -> None:
    """ConfigError naming the first key out of its range."""
    if not 1 <= c.num_ddim_timesteps <= T or T % c.num_ddim_timesteps:
        raise ConfigError(f"method_args.num_ddim_timesteps must divide the teacher's {T} training timesteps, "
                          f"got {c.num_ddim_timesteps}")
    if c.guidance_min > c.guidance_max:
        raise ConfigError(f"method_args.guidance_min ({c.guidance_min}) > guidance_max ({c.guidance_max}): the "
                          "guidance range is inverted")
    if c.guidance_min <= 0:
        raise ConfigError("method_args.guidance_min must be > 0 (1 = no CFG)")
    if c.lora_rank < 0:
        raise ConfigError(f"method_args.lora_rank must be >= 1 for a LoRA student (0 = full student), got "
                          f"{c.lora_rank}")
    if c.loss not in ("huber", "l2"):
        raise ConfigError(f"method_args.loss must be 'huber' or 'l2', got {c.loss!r}")
    if c.huber_c <= 0 or not 0 <= c.target_ema_decay < 1 or c.w_embedding_dim < 0 or c.sample_steps < 1:
        raise ConfigError("method_args.huber_c must be > 0, target_ema_decay in [0, 1), w_embedding_dim >= 0 and "
                          "sample_steps >= 1")
    segs, starts = list(c.segments), list(c.segment_starts)
    if not segs or len(segs) != len(starts) or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"method_args.segments and segment_starts must be equally long with segment_starts "
                          f"strictly increasing from 0, got {segs} / {starts}")
    for s in segs:
        if s < 1 or T % s or s > c.num_ddim_timesteps:
            raise ConfigError(f"method_args.segments: each count must divide {T} and be at most num_ddim_timesteps"
                              f" ({c.num_ddim_timesteps}), got {s}")
    grid = set(ddim_grid(c.num_ddim_timesteps, T).tolist())
    for ts in c.sample_timesteps:
        if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or not set(ts) <= grid:
            raise ConfigError(f"method_args.sample_timesteps: each schedule must be descending points of the "
                              f"{c.num_ddim_timesteps}-point DDIM grid ({T // c.num_ddim_timesteps}k - 1, e.g. "
                              f"{T - 1}), got {list(ts)}; fix it or set method_args.sample_timesteps=[]")
    if len({len(ts) for ts in c.sample_timesteps}) != len(c.sample_timesteps):
        raise ConfigError("method_args.sample_timesteps: give at most one schedule per step count")


class ConsistencyMethod(Method):
    r"""Consistency distillation (LCM, LCM-LoRA, multiphase CD) of a diffusers teacher into a few-step student.

    Networks: the frozen teacher; the student (a trainable copy, or LoRA adapters on the teacher network so that
    no second copy exists); for full students an EMA target network held as buffers.

    Args:
        setup: the teacher's family and Denoiser, the world, the data, the run's length (the final segment count).
        cfg: the method's :class:`ConsistencyConfig`.
    """

    name = "consistency"
    Config = ConsistencyConfig
    phase_names = ("student",)
    images_needed_for = "x0 samples to noise (consistency distillation trains on the teacher's ODE from data)"

    def __init__(self, setup: Setup, cfg: ConsistencyConfig):
        super().__init__(setup, cfg)
        c = cfg
        teacher = setup.teacher
        self.T = teacher.num_train_timesteps
        self.max_steps = setup.max_steps
        self.lora = c.lora_rank != 0
        check_consistency_config(c, self.T)
        self.w_dim = 0
        unet = teacher.model
        if self.lora:
            # LCM-LoRA: adapters on the teacher network; adapters off = the teacher, on = the student and its target.
            self.lora_config = add_lora(unet, c.lora_rank, c.lora_alpha, LORA_TARGETS, "method_args.lora_rank")
            self.student = teacher
            self._frozen_teacher: Denoiser | None = None
            self.target: Denoiser | None = None
            # The target's adapter weights: an EMA of the student's (decay 0: the student itself).
            self.target_adapters = (AdapterEMA([p for p in unet.parameters() if p.requires_grad])
                                    if c.target_ema_decay > 0 else None)
        else:
            # LCM: a full trainable copy, w-conditioned where the network takes a guidance embedding.
            self._frozen_teacher = teacher
            self.target_adapters = None
            net = self._full_student(unet, c)
            self.student = self.family.denoiser(net.requires_grad_(True))
            # The EMA target as buffers: checkpointed (frozen parameters are not) and never trained.
            self.target = self.family.denoiser(params_to_buffers(copy.deepcopy(net)))
        # The base weights' fingerprint a LoRA export records, taken before they are cast to train.teacher_dtype.
        self.base_fingerprint = base_fingerprint(unet) if self.lora else None
        # The loop step the target was last updated at (-1: never), so resume replays the updates exactly.
        self.register_buffer("target_step", torch.tensor(-1, dtype=torch.long))

    # --- construction helpers -----------------------------------------------------------------------------------
    def _full_student(self, unet: nn.Module, c: ConsistencyConfig) -> nn.Module:
        fixed = c.guidance_min == c.guidance_max
        have = self.family.guidance_embedding_dim(unet)
        if have is None:  # e.g. UNet2DModel: no guidance input
            if not fixed:
                raise ConfigError(f"a full {type(unet).__name__} student cannot be conditioned on the guidance scale "
                                  "(no timestep_cond input): set guidance_min == guidance_max, or use a LoRA student "
                                  "(lora_rank > 0)")
            return copy.deepcopy(unet)
        if have:  # the teacher already takes a w embedding: keep its size
            self.w_dim = have
            return copy.deepcopy(unet)
        if c.w_embedding_dim == 0:
            if not fixed:
                raise ConfigError("a guidance range (guidance_min < guidance_max) needs method_args.w_embedding_dim "
                                  "> 0 for a full student")
            return copy.deepcopy(unet)
        # LCM: the teacher's weights in a network that also takes the embedding, starting exactly as the teacher.
        self.w_dim = c.w_embedding_dim
        return self.family.with_guidance_embedding(unet, c.w_embedding_dim)

    def _adapters(self, enabled: bool) -> AbstractContextManager:
        """With a LoRA student, switch its adapters on (student) or off (teacher); a no-op otherwise."""
        return adapters(self.student.model, enabled) if self.lora else nullcontext()

    @property
    def teacher(self) -> Denoiser:
        """The teacher Denoiser (with a LoRA student: the same network, to be called with adapters off)."""
        return self.student if self.lora else self._frozen_teacher

    def segments_at(self, step: int) -> int:
        """Segment count S of the progressive schedule at loop step ``step``."""
        c = self.cfg
        return int([s for s, a in zip(c.segments, c.segment_starts) if a <= step][-1])

    @property
    def final_segments(self) -> int:
        return self.segments_at(max(self.max_steps - 1, 0))

    # --- the consistency function ---------------------------------------------------------------------------------
    def consistency_fn(self, net: Denoiser, x_t: torch.Tensor, t: torch.Tensor, boundary: torch.Tensor,
                       cond: Cond) -> torch.Tensor:
        """G(x_t, t; b) = alpha_b x0_hat + sigma_b eps with x0_hat = c_skip(t) x_t + c_out(t) x0 (b = -1: x0_hat)."""
        x0, eps = net.x0_eps(x_t, t, cond)
        c_skip, c_out = S.consistency_scalings(t, self.cfg.sigma_data, self.cfg.timestep_scaling)
        x0_hat = S.expand_like(c_skip, x_t) * x_t + S.expand_like(c_out, x_t) * x0
        a_b, s_b = net.alpha_sigma(boundary, like=x_t)
        return a_b * x0_hat + s_b * eps

    @torch.no_grad()
    def update_target(self, step: int) -> None:
        """EMA update of the target (network, or adapter weights of a LoRA student) towards the student, once per
        loop step; a no-op for a LoRA student that is its own target."""
        if int(self.target_step) >= step or (self.target is None and self.target_adapters is None):
            return
        d = self.cfg.target_ema_decay
        if self.target_adapters is not None:
            self.target_adapters.update(d)
        else:
            # By name: the target also holds the network's own buffers, and .to() replaces buffer objects.
            target = self.target.model
            for name, p in self.student.model.named_parameters():
                target.get_buffer(name).lerp_(p.detach(), 1 - d)
        self.target_step.fill_(step)

    def _student_cond(self, cond: Cond, w: torch.Tensor) -> Cond:
        if not self.w_dim:
            return cond
        emb = self.family.guidance_embedding(w, self.w_dim).to(w.device)
        return cond.with_timestep_cond(emb)

    # --- the Method contract --------------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        return [Phase("student", [p for p in self.student.parameters() if p.requires_grad], real=True)]

    def ema_network(self) -> nn.Module | None:
        return None if self.lora else self.student.model

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if phase != "student":
            raise ValueError(f"unknown phase {phase!r}")
        return self.student_loss(batch, step)

    def student_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The consistency distillation loss at loop step ``step``."""
        c: ConsistencyConfig = self.cfg
        # 0. The EMA target catches up with the student as it is after the previous optimizer step.
        self.update_target(step)
        x0, cond, uncond = batch.real, batch.cond, batch.uncond
        n, dev = x0.shape[0], x0.device
        # 1. t_{n+k} uniformly on the DDIM grid; its segment's lower boundary b (-1 = clean end for S = 1).
        segs = self.segments_at(step)
        grid = ddim_grid(c.num_ddim_timesteps, self.T).to(dev)
        t = grid[torch.randint(0, len(grid), (n,), device=dev)]
        b = segment_boundary(t, segs, self.T)
        # t_n one solver step (k) below, never past the boundary; the final segment stops at t = 0 as LCM does,
        # where c_skip = 1 and c_out = 0 make G the identity.
        t_n = torch.maximum(t - self.T // c.num_ddim_timesteps, b.clamp(min=0))
        # 2. Noise x0 to x_{t_{n+k}}.
        x_t = self.teacher.add_noise(x0, torch.randn_like(x0), t)
        # 3. Per-sample guidance scale w (standard convention); a w-conditioned student sees it.
        w = sample_guidance_scale(n, c.guidance_min, c.guidance_max, device=dev)
        s_cond = self._student_cond(cond, w)
        with torch.no_grad():
            # 4. One teacher DDIM step with CFG at w from t_{n+k} to t_n (adapters off for a LoRA student).
            g = None if c.guidance_min == c.guidance_max == 1.0 else w
            with self._adapters(False):
                x_tn = self.teacher.solver_step(x_t, t, t_n, cond, guidance_scale=g, uncond=uncond)
            # 5. Target G_target(x_{t_n}): the EMA network (full), the student with its EMA adapter weights swapped in
            # (LoRA), or the student itself (LoRA, decay 0). At t_n = b the boundary condition makes it x_{t_n}.
            swap = self.target_adapters.swapped() if self.target_adapters is not None else nullcontext()
            with swap:
                target = self.consistency_fn(self.target if self.target is not None else self.student, x_tn, t_n,
                                             b, s_cond)
            target = torch.where(S.expand_like(t_n == b, x_tn).bool(), x_tn, target)
        # 6. The student's consistency function at x_{t_{n+k}}, with gradient (after the target: swapping EMA adapter
        # weights in and out would invalidate a graph already built through them).
        pred = self.consistency_fn(self.student, x_t, t, b, s_cond)
        # 7. Distance.
        if c.loss == "huber":
            loss = pseudo_huber(pred, target, c.huber_c)
        else:
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        logs = {"segments": float(segs), "w_mean": w.mean().item(), "at_boundary": (t_n == b).float().mean().item()}
        return loss, logs

    # --- the student ------------------------------------------------------------------------------------------------
    def student_timesteps(self) -> list[int]:
        """The exported sampler's timesteps: trailing DDIM over the final segments, or LCM's 1-step [T - 1]."""
        return segment_edges(self.final_segments, self.T)[:-1]

    def sample_schedules(self) -> list[list[int]]:
        """The recommended LCM sampling schedules the export records (none for multi-segment students)."""
        return [[int(t) for t in ts] for ts in self.cfg.sample_timesteps] if self.final_segments == 1 else []

    def export_scheduler(self):
        """LCMScheduler (one segment: LCM's own boundary scalings and grid) or trailing DDIM (S segments); for a
        flow-matching teacher its unshifted FlowMatchEulerDiscreteScheduler, stochastic for one segment (each step
        predicts x0 and re-noises it, as LCM sampling does; the boundary scalings, c_skip <= 7e-6 on the DDIM grid's
        points, are left out) and deterministic Euler through the segment starts otherwise."""
        common = dict(clip_sample=False, thresholding=False)
        config = self.family.pipe.scheduler.config
        if self.teacher.is_flow:
            sched = FlowMatchEulerDiscreteScheduler.from_config(config, shift=1.0, use_dynamic_shifting=False,
                                                                stochastic_sampling=self.final_segments == 1)
        elif self.final_segments == 1:
            sched = LCMScheduler.from_config(config, original_inference_steps=self.cfg.num_ddim_timesteps,
                                             timestep_scaling=self.cfg.timestep_scaling, **common)
        else:
            sched = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, **common)
        sched.register_to_config(student_timesteps=self.student_timesteps(),
                                 consistency_segments=self.final_segments,
                                 sample_timesteps=self.sample_schedules(),
                                 distilled_from=teacher_reference(self.teacher_name))
        if self.teacher.is_flow:  # the same schedules as noise levels: the stock SD3 / Flux pipelines take sigmas=
            sched.register_to_config(student_sigmas=self._sigmas(self.student_timesteps()),
                                     sample_sigmas=[self._sigmas(ts) for ts in self.sample_schedules()])
        return sched

    def _sigmas(self, timesteps: list[int]) -> list[float]:
        return [t / self.T for t in timesteps]

    def _sample_steps(self) -> int:
        return self.cfg.sample_steps if self.final_segments == 1 else self.final_segments

    def _sampling_kwargs(self, steps: int) -> dict:
        """How the exported pipeline is asked for the recorded ``steps``-step sampler (timesteps= or sigmas=)."""
        rec = {len(r): r for r in self.sample_schedules()}
        ts = rec.get(steps) or (self.student_timesteps() if steps == len(self.student_timesteps()) else None)
        if ts is None:
            return {"num_inference_steps": steps}
        kwargs = self.family.schedule_kwargs(ts, self.T)
        # A scheduler that takes no explicit schedule (DDIMScheduler of multi-segment students) samples the trained
        # timesteps from the step count itself (trailing spacing: exactly the segment starts).
        if not all(takes_keyword(self.export_scheduler().set_timesteps, k) for k in kwargs):
            return {"num_inference_steps": steps}
        return kwargs

    def fused_network(self) -> nn.Module:
        """The student network as a plain diffusers model (LoRA adapters merged into a copy)."""
        if not self.lora:
            return self.student.model
        # float32 like every exported student, whatever dtype the frozen base weights are kept in during training.
        return fuse_lora(copy.deepcopy(self.student.model)).float()

    def export_spec(self) -> StudentSpec:
        c: ConsistencyConfig = self.cfg
        ts, segs = self.student_timesteps(), self.final_segments
        sched = self.export_scheduler()
        sampling = self._sampling_kwargs(self._sample_steps())
        when = ", ".join(f"{k}={v}" for k, v in sampling.items())
        kind = "LCM-LoRA" if self.lora else "LCM"
        if len(c.segments) > 1 or segs > 1:
            kind += f" multiphase (segments {list(c.segments)} from steps {list(c.segment_starts)})"
        ranged = c.guidance_min < c.guidance_max
        w = f"w in [{c.guidance_min}, {c.guidance_max}]" if ranged else f"w = {c.guidance_min}"
        if self.w_dim:
            guide = (f"The student is conditioned on the guidance scale ({self.w_dim}-d embedding of w - 1): pass "
                     f"`guidance_scale` in [{c.guidance_min}, {c.guidance_max}]; no CFG pass is run.")
        else:
            guide = ("The teacher's guidance is distilled in: sample with "
                     f"`guidance_scale={self.family.distilled_guidance_scale}` (no CFG pass).")
        if self.teacher.is_flow:
            how = ("stochastic: each step predicts x0 and re-noises it" if segs == 1
                   else "deterministic Euler through the segment starts")
            sampler = (f"`FlowMatchEulerDiscreteScheduler` (unshifted, {how}); sample with `{when}` (recorded as "
                       "`student_sigmas` / `sample_sigmas`).")
        elif segs == 1:
            sampler = (f"`LCMScheduler` (original_inference_steps={c.num_ddim_timesteps}): 1 step uses t = {ts}; any "
                       "step count from LCM's grid works (multi-step LCM sampling re-noises with fresh noise).")
            if self.sample_schedules():
                recs = ", ".join(f"`timesteps={r}`" for r in self.sample_schedules())
                sampler += (" Recommended schedules (pass them as `timesteps=`; recorded as `sample_timesteps`, which "
                            f"`stepdistill sample/eval/bench` apply by themselves for those step counts): {recs}.")
        else:
            sampler = (f"`DDIMScheduler` (trailing, deterministic): sample with `num_inference_steps={segs}`, which "
                       f"gives exactly the trained segment starts {ts}.")
        lora = LoraStudent(self.student.model, self.lora_config, self.base_fingerprint) if self.lora else None
        return StudentSpec(
            method=self.name, title=f"{kind} student",
            trained=f"consistency distillation (teacher CFG {w}, DDIM grid of {c.num_ddim_timesteps} points, "
                    f"{c.loss} distance)",
            networks=[self.fused_network()], scheduler=sched, sampling=sampling,
            guidance_scale=c.guidance_max if self.w_dim else self.family.distilled_guidance_scale,
            details=f"Sampler: {sampler} Trained timesteps recorded as `student_timesteps` ({ts}) in "
                    f"scheduler/scheduler_config.json. {guide}",
            lora=lora, sample_prompts=list(c.sample_prompts),
            card_lines=[f"Settings: segments {list(c.segments)}, segment starts {list(c.segment_starts)}."])
