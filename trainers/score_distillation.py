"""The shared core of the score-distillation methods (DMD2, VSD, and multi-student distillation): functions over
explicit network handles, which each method calls for its own student(s).

What they share: a student G that generates samples (one step, or several with backward simulation), a frozen
teacher (the "real" score, with CFG), a "fake" score fitted online by ordinary denoising to G's samples (a full
trainable copy, or peft LoRA adapters on the teacher network: adapters off = teacher, so no second copy), and a
gradient for G from the difference of the two scores at G's re-noised samples. Here: the config keys they share,
building the student and the fake score, generation, the real and fake predictions, the fake score's denoising loss,
the score-difference gradient and its loss as pure functions, and the student's export.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler
from torch import nn
from torch.distributed.fsdp import FSDPModule

from stepdistill.conditioning import Cond
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError, first_line
from stepdistill.pipelines.export import StudentSpec, teacher_reference
from stepdistill.pipelines.families import Family
from stepdistill.pipelines.lora import adapters, add_lora

from .networks import init_student_weights

# Guard for the per-sample normaliser mean|x0 - x0_real| of the distribution-matching gradient.
_NORM_EPS = 1e-6
# LCMScheduler's boundary condition c_skip = 0.25 / ((t * timestep_scaling)^2 + 0.25) must vanish: a distilled
# student predicts x0 directly. With this scaling c_skip < 1e-12 and c_out rounds to exactly 1 for every t >= 1.
_LCM_TIMESTEP_SCALING = 1e6
# Modules a LoRA fake score adapts; those present in the teacher network are used (attention projections of
# UNet2DModel / UNet2DConditionModel blocks and transformers, the resnet convolutions).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@dataclass
class ScoreDistillationConfig:
    # Timesteps the student is conditioned on, strictly decreasing in [0, T): [999] is a 1-step student,
    # [999, 749, 499, 249] a 4-step one (trained with backward simulation). The exported scheduler reproduces them.
    # Flow-matching teachers: in [1, T], a student from pure noise starts at T (sigma 1).
    student_timesteps: list[int] = field(default_factory=lambda: [999])
    # Lower end of the distribution-matching noise levels t ~ U[min_t T, max_t T] (a fraction of the T timesteps).
    min_t: float = 0.02
    # Upper end of the distribution-matching noise levels (a fraction of the T training timesteps).
    max_t: float = 0.98
    # Two time-scale update rule: fake-score updates per student update (the student phase runs every k steps).
    fake_updates_per_student: int = 5
    # Initialise the student G from another pipeline's network (alias, local folder or hub id), e.g. an exported LCM
    # student of the same teacher; it must have the teacher network's architecture. "" = from the teacher.
    student_init: str = ""
    # A student network of another size than the teacher's: entries of the teacher network's diffusers config to
    # replace (e.g. {block_out_channels: [32, 64], layers_per_block: 1}; "_class_name" picks another diffusers model
    # class). The student is then randomly initialised (train it from the teacher first: the multi-student method's
    # score_matching stage, or DMD2's regression warm-up). {} = a copy of the teacher network.
    student_config: dict[str, Any] = field(default_factory=dict)
    # Fake score as a LoRA of this rank on the teacher network (adapters off = teacher); 0 = a full trainable copy.
    fake_score_lora_rank: int = 0
    # LoRA alpha (scale alpha / rank); 0 = the rank (scale 1).
    fake_score_lora_alpha: float = 0.0
    # Prompts of the periodic sample grids for text teachers (cycled).
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car", "a bowl of fruit",
                                                               "a mountain landscape"])


def check_config(c: ScoreDistillationConfig, T: int, flow: bool) -> None:
    """ConfigError naming the first shared key out of its range."""
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
    if c.fake_score_lora_rank < 0 or c.fake_score_lora_alpha < 0:
        raise ConfigError(f"method_args.fake_score_lora_rank / fake_score_lora_alpha must be >= 0 (rank 0 = a full "
                          f"fake score), got {c.fake_score_lora_rank} / {c.fake_score_lora_alpha}")


# --- the gradient, as pure functions -------------------------------------------------------------------------------
def score_difference_grad(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                          weight: torch.Tensor | None = None, normalise: bool = False) -> torch.Tensor:
    """The gradient for the student's sample ``x0`` from two denoisers' x0 predictions at its re-noised version:
    ``(x0_fake - x0_real) * weight``, descending moves ``x0`` towards the real score's prediction and away from the
    fake score's (DMD's ``p_real - p_fake`` with ``p = x0 - x0_pred``).

    ``normalise`` divides per sample by ``mean |x0 - x0_real|`` over all but the batch dimension (DMD2);
    ``weight`` (broadcast per sample) scales it otherwise, e.g. VSD's ``w(t) alpha_t / sigma_t`` that turns it into
    ``w(t) (eps_real - eps_fake)``. Computed in float32, without gradient, NaNs zeroed.
    """
    x0_d = x0.detach().float()
    p_real = x0_d - x0_real.detach().float()
    p_fake = x0_d - x0_fake.detach().float()
    grad = p_real - p_fake
    if normalise:
        norm = p_real.abs().mean(dim=tuple(range(1, x0_d.ndim)), keepdim=True)
        grad = grad / norm.clamp_min(_NORM_EPS)
    if weight is not None:
        grad = grad * weight.float().reshape(-1, *([1] * (x0_d.ndim - 1)))
    return torch.nan_to_num(grad)


def loss_from_grad(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient w.r.t. ``x0`` is ``grad / x0.numel()``: 0.5 * MSE(x0, x0 - grad) with the target
    detached."""
    return 0.5 * F.mse_loss(x0.float(), (x0.detach().float() - grad).detach(), reduction="mean")


# --- the networks --------------------------------------------------------------------------------------------------
def build_student(family: Family, teacher_network: nn.Module, c: ScoreDistillationConfig,
                  init_subfolder: str | None = None) -> Denoiser:
    """A trainable student Denoiser: a copy of the teacher network, or with ``student_config`` a network of the
    teacher's class (or the diffusers class it names as ``_class_name``) built from the teacher's config with those
    entries replaced, randomly initialised and checked to map the teacher's inputs to outputs of the teacher's shape;
    then the weights of ``student_init`` (its network in ``init_subfolder``, by default the family's network folder)
    if given."""
    overrides = dict(c.student_config)
    if not overrides:
        net = copy.deepcopy(teacher_network)
    else:
        name = overrides.pop("_class_name", type(teacher_network).__name__)
        cls = getattr(diffusers, str(name), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ConfigError(f"method_args.student_config: _class_name {name!r} is not a diffusers model class")
        config = {k: v for k, v in teacher_network.config.items() if not k.startswith("_")}
        try:
            net = cls.from_config({**config, **overrides})
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"method_args.student_config does not build a {name}: {first_line(e)}") from None
        _check_student_shape(family, net, teacher_network)
    student = family.denoiser(net.requires_grad_(True))
    if c.student_init:
        init_student_weights(student.model, c.student_init, "method_args.student_init",
                             init_subfolder or family.network_attr)
    return student


@torch.no_grad()
def _check_student_shape(family: Family, net: nn.Module, teacher_network: nn.Module) -> None:
    """ConfigError unless ``net`` maps one teacher input (noise at the largest timestep, a null condition) to an
    output of the teacher's shape."""
    x = torch.zeros(family.noise_shape(1))
    t = torch.full((1,), family.pipe.scheduler.config.num_train_timesteps - 1, dtype=torch.long)
    cond = family.classes.uncond(1, x.device) if family.classes is not None else family.prompt_cond([""])[0]
    want = tuple(family.call(teacher_network, x, t, cond).shape)
    try:
        got = tuple(family.call(net, x, t, cond).shape)
    except Exception as e:  # noqa: BLE001 - any failure of the user's architecture is one config error
        raise ConfigError(f"method_args.student_config: the student network cannot take the teacher's inputs "
                          f"{tuple(x.shape)} ({first_line(e)})") from None
    if got != want:
        raise ConfigError(f"method_args.student_config: the student network's output shape {got} does not match "
                          f"the teacher's {want}; keep in/out_channels and the sample size")


def build_fake_score(family: Family, teacher: Denoiser, c: ScoreDistillationConfig) -> Denoiser | None:
    """A full trainable copy of the teacher network as a Denoiser; or, with ``fake_score_lora_rank``, LoRA adapters
    added to the teacher network itself (toggled off for the teacher's own predictions, so a single copy of the big
    network is kept) and None."""
    if c.fake_score_lora_rank > 0:
        add_lora(teacher.model, c.fake_score_lora_rank, c.fake_score_lora_alpha, LORA_TARGETS,
                 "method_args.fake_score_lora_rank")
        return None
    return family.denoiser(copy.deepcopy(teacher.model).requires_grad_(True))


# --- one step's computations over explicit handles -----------------------------------------------------------------
@dataclass
class ScoreContext:
    """The frozen side of a score-distillation step: the teacher, whether the fake score is LoRA adapters on it, the
    noise-level grid draws index into, the student's timesteps and the noise shape."""

    teacher: Denoiser
    lora_fake: bool
    t_grid: torch.Tensor
    student_timesteps: list[int]
    noise_shape: Callable[[int], tuple[int, ...]]

    def teacher_only(self) -> AbstractContextManager:
        """With a LoRA fake score, its adapters off for the block (the network is the teacher); a no-op otherwise."""
        return adapters(self.teacher.model, False) if self.lora_fake else nullcontext()

    def draw_timesteps(self, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
        """``n`` noise levels, indices drawn uniformly from the fractions [lo, hi] of the timestep grid."""
        T = self.teacher.num_train_timesteps
        a, b = int(lo * T), min(int(hi * T) + 1, T)
        return self.t_grid[torch.randint(a, max(b, a + 1), (n,), device=self.t_grid.device)].to(device)

    def real_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
                   guidance: torch.Tensor | float | None) -> torch.Tensor:
        """The teacher's x0 prediction with CFG ``guidance`` (None = no CFG), without gradient."""
        with torch.no_grad(), self.teacher_only():
            return self.teacher(x_t, t, cond, "x0", guidance_scale=guidance, uncond=uncond)

    def generate(self, student: Denoiser, cond: Cond, n: int, steps: int | None = None, grad: bool = False,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Student samples x0 (multi-step students: "backward simulation").

        Runs ``student`` without gradient from pure noise through the first ``steps`` listed timesteps (each step
        predicts x0 and re-noises it with fresh noise to the next listed t, exactly as the exported scheduler does),
        then predicts x0 once more at the reached timestep, with gradient if ``grad``. ``steps=None`` draws the number
        uniformly from {0, ..., K-1} so that training sees every input the K-step sampler produces.
        """
        ts = self.student_timesteps
        device = next(student.model.parameters()).device
        run = steps
        if steps is None:
            steps = run = int(torch.randint(0, len(ts), ()).item()) if len(ts) > 1 else 0
            if isinstance(student.model, FSDPModule):
                # Every call of a sharded network gathers its shards from all processes, so all must call it
                # equally often whatever each drew: a sharded student runs the whole prefix and keeps its state at
                # the drawn step (the same noise draws as unsharded, so a sharded run equals the DDP run).
                run = len(ts) - 1
        x = torch.randn(self.noise_shape(n), device=device) if noise is None else noise
        kept = x
        with torch.no_grad():
            for i in range(run):
                x0 = student(x, ts[i], cond, "x0")
                if i >= steps:  # past the drawn step (a sharded student): the output is not used, draw no noise
                    continue
                t_next = torch.full((n,), ts[i + 1], device=x.device, dtype=torch.long)
                x = kept = student.add_noise(x0, torch.randn_like(x0), t_next)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return student(kept, ts[steps], cond, "x0")


def fake_denoising_loss(fake: Denoiser, x0: torch.Tensor, t: torch.Tensor, cond: Cond, features: bool = False):
    """Ordinary denoising loss of the fake score on (detached) student samples ``x0`` at noise levels ``t``, in the
    network's own parameterisation; with ``features``, ``(loss, the fake score's features of that pass)``."""
    eps = torch.randn_like(x0)
    out = fake.raw(fake.add_noise(x0, eps, t), t, cond, features=features)
    pred, feats = out if features else (out, None)
    loss = F.mse_loss(pred.float(), fake.training_target(x0, eps, t).float())
    return (loss, feats) if features else loss


# --- the student's export ------------------------------------------------------------------------------------------
def export_scheduler(family: Family, teacher: Denoiser, timesteps: list[int], teacher_name: str):
    """A scheduler that reproduces the student's training-time sampler, with the timesteps recorded as
    ``student_timesteps`` in its config.

    DDPM-type teachers: an ``LCMScheduler``; ``timesteps=student_timesteps`` always reproduces the sampler, and
    ``original_inference_steps`` is chosen (largest first) so that ``num_inference_steps=len(student_timesteps)``
    gives the same list whenever the LCM spacing can express it. Flow-matching teachers: the teacher's
    ``FlowMatchEulerDiscreteScheduler`` without shifting (the trained noise levels are exact, recorded as
    ``student_sigmas``: pass them as ``sigmas=``), stochastic for several steps (each step predicts x0 and re-noises
    it with fresh noise, as backward simulation trained it).
    """
    ts = [int(t) for t in timesteps]
    T = teacher.num_train_timesteps
    config = family.pipe.scheduler.config
    if teacher.is_flow:
        sched = FlowMatchEulerDiscreteScheduler.from_config(config, shift=1.0, use_dynamic_shifting=False,
                                                            stochastic_sampling=len(ts) > 1)
        sched.register_to_config(student_timesteps=ts, student_sigmas=[t / teacher.num_train_timesteps for t in ts],
                                 distilled_from=teacher_reference(teacher_name))
        return sched
    sched = LCMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, thresholding=False,
                                     timestep_scaling=_LCM_TIMESTEP_SCALING)
    for n in range(50, len(ts) - 1, -1):
        try:
            sched.set_timesteps(len(ts), original_inference_steps=n)
        except ValueError:
            continue
        if sched.timesteps.tolist() == ts:
            sched.register_to_config(original_inference_steps=n)
            break
    else:
        if any((t + 1) % (T // 50) for t in ts):
            # Off LCMScheduler's default 50-point grid: a grid of every timestep, so that `timesteps=` schedules
            # (the recorded ones) are taken without its "not on the original schedule" warning.
            sched.register_to_config(original_inference_steps=T)
    sched.register_to_config(student_timesteps=ts, distilled_from=teacher_reference(teacher_name))
    return sched


def _num_steps_reproduces(sched, timesteps: list[int]) -> bool:
    sched = copy.deepcopy(sched)
    try:
        sched.set_timesteps(len(timesteps))
    except ValueError:
        return False
    return sched.timesteps.tolist() == list(timesteps)


def score_student_spec(method: str, title: str, trained: str, guidance: str, family: Family, teacher: Denoiser,
                 teacher_name: str, networks: list[nn.Module], timesteps: list[int], prompts: list[str],
                 **more: Any) -> StudentSpec:
    """The export of score-distilled student(s) at ``timesteps``: the teacher's pipeline class with the
    :func:`export_scheduler`, sampled without CFG (``guidance``: what is distilled in, for the card)."""
    ts = [int(t) for t in timesteps]
    sched = export_scheduler(family, teacher, ts, teacher_name)
    sampling = family.schedule_kwargs(ts, teacher.num_train_timesteps)
    when = ", ".join(f"{k}={v}" for k, v in sampling.items())
    if teacher.is_flow:
        how = (f"Sample with `{when}` (recorded as `student_sigmas`; the exported FlowMatchEulerDiscreteScheduler "
               "does no shifting)")
    else:
        ok = "" if _num_steps_reproduces(sched, ts) else ", which does NOT reproduce them here"
        how = (f"Sample with `timesteps={ts}` (or `num_inference_steps={len(ts)}` with the saved "
               f"`original_inference_steps={sched.config.original_inference_steps}`{ok})")
    details = (f"Trained timesteps: `{ts}` (recorded as `student_timesteps` in scheduler/scheduler_config.json). "
               f"{how} and no CFG ({guidance} is distilled in).")
    return StudentSpec(method=method, title=f"{title} student ({len(ts)}-step)", trained=trained, networks=networks,
                       scheduler=sched, sampling=sampling, guidance_scale=family.distilled_guidance_scale,
                       details=details, sample_prompts=list(prompts), **more)
