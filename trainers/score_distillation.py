"""The shared core of the score-distillation methods (DMD2, VSD, and the multi-student method built on them).

What they share: a student G that generates samples (one step, or several with backward simulation), a frozen
teacher (the "real" score, with CFG), a "fake" score fitted online by ordinary denoising to G's samples (a full
trainable copy, or peft LoRA adapters on the teacher network: adapters off = teacher, so no second copy), and a
gradient for G from the difference of the two scores at G's re-noised samples. A method subclasses
:class:`ScoreDistillationMethod`, sets its config (a subclass of :class:`ScoreDistillationConfig`) and writes its
two losses with the pieces here: ``generate``, ``real_score``, ``fake_prediction``, ``fake_denoising_loss`` and the
pure functions :func:`score_difference_grad` / :func:`loss_from_grad`.

Networks come in through :meth:`ScoreDistillationMethod.build_student` (default: a copy of the teacher network), so
a student may have another architecture than the teacher.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.conditioning import ClassConditioning, Cond
from stepdistill.data import to_uint8
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError, first_line

from .base import Method, Phase
from .common import (
    adapters,
    add_lora,
    cast_frozen,
    check_labels,
    init_student_weights,
    load_teacher,
    teacher_reference,
)

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


class ScoreDistillationMethod(Method):
    """A student, a frozen teacher and an online fake score (see the module docstring).

    Phases: ``student`` (every ``fake_updates_per_student`` steps) and ``fake_score`` (every step), the student
    declared first: one iteration updates the generator against the current fake score, then fits the fake score to
    the updated generator, so every student update sees a fake score that has just caught up with it.
    """

    phase_names = ("student", "fake_score")
    shardable = True
    # Human-readable method name for messages and model cards.
    title = ""

    def __init__(self, run_config):
        super().__init__(run_config)
        c: ScoreDistillationConfig = self.cfg
        self.family, self.teacher = load_teacher(run_config, self.name)
        unet, scheduler = self.family.network, self.family.pipe.scheduler
        self.scheduler = scheduler
        T = self.teacher.num_train_timesteps
        self._validate_core(c, T, self.teacher.is_flow)
        self._validate(c, T, self.teacher.is_flow)
        # Noise levels are drawn as indices into this grid (the identity by default; DMD2 may space it as Karras).
        self.register_buffer("_t_grid", self.timestep_grid(), persistent=False)

        # Conditioning: class labels or prompts (the family encodes them); latent teachers also bring their frozen
        # VAE and text encoders, registered here once so that they move with this Method to its device.
        self.classes: ClassConditioning | None = self.family.classes
        for name, module in self.family.frozen_modules().items():
            setattr(self, name, module)

        # The student G and the fake score (a method with several students builds them its own way).
        self.lora = c.fake_score_lora_rank > 0
        self._build_networks(unet)

        # The frozen teacher (and VAE, text encoders) in train.teacher_dtype, now that the trainable copies exist.
        cast_frozen(self.teacher, self.family, run_config.train.teacher_dtype)

    # --- construction hooks ---------------------------------------------------------------------------------------
    def _build_networks(self, teacher_network: nn.Module) -> None:
        """``self.student`` (a trainable Denoiser) and ``self.fake_score``: a full trainable copy of the teacher
        network, or (``self.lora``) LoRA adapters on the teacher network itself, toggled off for the teacher's own
        predictions, which keeps a single copy of the big network in memory (``fake_score`` is then None)."""
        c: ScoreDistillationConfig = self.cfg
        self.student = self.make_student(teacher_network)
        if self.lora:
            add_lora(teacher_network, c.fake_score_lora_rank, c.fake_score_lora_alpha, LORA_TARGETS,
                     "method_args.fake_score_lora_rank")
            self.fake_score: Denoiser | None = None
        else:
            self.fake_score = self.family.denoiser(copy.deepcopy(teacher_network).requires_grad_(True))

    def make_student(self, teacher_network: nn.Module, init_subfolder: str | None = None) -> Denoiser:
        """A trainable student Denoiser: :meth:`build_student`, then the weights of ``method_args.student_init``
        (its network in ``init_subfolder``, by default the family's network folder) if given."""
        c: ScoreDistillationConfig = self.cfg
        student = self.family.denoiser(self.build_student(teacher_network).requires_grad_(True))
        if c.student_init:
            init_student_weights(student.model, c.student_init, "method_args.student_init",
                                 init_subfolder or self.family.network_attr)
        return student

    def build_student(self, teacher_network: nn.Module) -> nn.Module:
        """The student network: a copy of the teacher's, or with ``method_args.student_config`` a network of the
        teacher's class (or the diffusers class it names as ``_class_name``) built from the teacher's config with
        those entries replaced, randomly initialised, checked to map the teacher's inputs to outputs of the
        teacher's shape."""
        overrides = dict(self.cfg.student_config)
        if not overrides:
            return copy.deepcopy(teacher_network)
        import diffusers

        name = overrides.pop("_class_name", type(teacher_network).__name__)
        cls = getattr(diffusers, str(name), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ConfigError(f"method_args.student_config: _class_name {name!r} is not a diffusers model class")
        config = {k: v for k, v in teacher_network.config.items() if not k.startswith("_")}
        try:
            net = cls.from_config({**config, **overrides})
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"method_args.student_config does not build a {name}: {first_line(e)}") from None
        self._check_student_shape(net, teacher_network)
        return net

    @torch.no_grad()
    def _check_student_shape(self, net: nn.Module, teacher_network: nn.Module) -> None:
        """ConfigError unless ``net`` maps one teacher input (noise at the largest timestep, a null condition) to an
        output of the teacher's shape."""
        x = torch.zeros(self._noise_shape(1))
        t = torch.full((1,), self.teacher.num_train_timesteps - 1, dtype=torch.long)
        cond = (self.family.classes.uncond(1, x.device) if self.family.classes is not None
                else self.family.prompt_cond([""])[0])
        want = tuple(self.family.call(teacher_network, x, t, cond).shape)
        try:
            got = tuple(self.family.call(net, x, t, cond).shape)
        except Exception as e:  # noqa: BLE001 - any failure of the user's architecture is one config error
            raise ConfigError(f"method_args.student_config: the student network cannot take the teacher's inputs "
                              f"{tuple(x.shape)} ({first_line(e)})") from None
        if got != want:
            raise ConfigError(f"method_args.student_config: the student network's output shape {got} does not match "
                              f"the teacher's {want}; keep in/out_channels and the sample size")

    def timestep_grid(self) -> torch.Tensor:
        """The noise levels (network timesteps) that draws index into; all T by default."""
        return torch.arange(self.teacher.num_train_timesteps)

    def _validate(self, c, T: int, flow: bool) -> None:
        """The method's own config checks (ConfigError); the shared keys are checked before."""

    @staticmethod
    def _validate_core(c: ScoreDistillationConfig, T: int, flow: bool) -> None:
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

    # --- the networks -------------------------------------------------------------------------------------------
    @property
    def _fake_net(self) -> nn.Module:
        return self.teacher.model if self.lora else self.fake_score.model

    def _adapters(self, enabled: bool) -> AbstractContextManager:
        """With a LoRA fake score, switch its adapters on (fake score) or off (teacher); a no-op otherwise."""
        return adapters(self.teacher.model, enabled) if self.lora else nullcontext()

    def fake_denoiser(self) -> Denoiser:
        """The fake score as a Denoiser (with a LoRA fake score: the teacher network, adapters on)."""
        return self.teacher if self.lora else self.fake_score

    def guidance_at(self, t: torch.Tensor) -> torch.Tensor | float | None:
        """The real score's CFG scale at timesteps ``t`` when the caller gives none (None = no CFG)."""
        return None

    def real_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
                   guidance: torch.Tensor | float | None | str = "method") -> torch.Tensor:
        """The teacher's x0 prediction with CFG ``guidance`` (None = no CFG; "method" = :meth:`guidance_at`),
        without gradient."""
        if isinstance(guidance, str):
            guidance = self.guidance_at(t)
        with torch.no_grad(), self._adapters(False):
            return self.teacher(x_t, t, cond, "x0", guidance_scale=guidance, uncond=uncond)

    def fake_prediction(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None = None,
                        guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """The fake score's x0 prediction (with CFG ``guidance`` when given: the fake score is trained with
        conditioning dropout for that). Runs with gradient if the caller's grad mode says so."""
        return self.fake_denoiser()(x_t, t, cond, "x0", guidance_scale=guidance, uncond=uncond)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    # --- conditioning and sampling ------------------------------------------------------------------------------
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
        predicts x0 and re-noises it with fresh noise to the next listed t, exactly as the exported scheduler
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

    def draw_timesteps(self, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
        """``n`` noise levels, indices drawn uniformly from the fractions [lo, hi] of the timestep grid."""
        T = self.teacher.num_train_timesteps
        a, b = int(lo * T), min(int(hi * T) + 1, T)
        return self._t_grid[torch.randint(a, max(b, a + 1), (n,), device=self._t_grid.device)].to(device)

    def fake_denoising_loss(self, x0: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Ordinary denoising loss of the fake score on (detached) student samples ``x0`` at noise levels ``t``, in
        the network's own parameterisation."""
        eps = torch.randn_like(x0)
        fake = self.fake_denoiser()
        pred = fake.raw(fake.add_noise(x0, eps, t), t, cond)
        return F.mse_loss(pred.float(), fake.training_target(x0, eps, t).float())

    # --- the Method contract --------------------------------------------------------------------------------------
    def critic_params(self) -> list[nn.Parameter]:
        """Trainable parameters besides the fake score's that the fake_score phase updates (e.g. a GAN head)."""
        return []

    def phases(self) -> list[Phase]:
        fake = [p for p in self.fake_denoiser().parameters() if p.requires_grad] + self.critic_params()
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
        raise NotImplementedError

    def fake_score_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

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
                                     student_sigmas=[t / self.teacher.num_train_timesteps for t in ts],
                                     distilled_from=teacher_reference(self.run_config.teacher))
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
        sched.register_to_config(student_timesteps=ts, distilled_from=teacher_reference(self.run_config.teacher))
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
                      height=size, width=size, **when).images
        return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)

    def card_summary(self) -> tuple[str, str]:
        """(how the student was trained, what guidance is distilled in) for the exported model card."""
        raise NotImplementedError

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
                   f"images = pipe([\"a photo of a cat\"], {when}, "
                   f"guidance_scale={self.family.distilled_guidance_scale}).images")
        if self.teacher.is_flow:
            how = (f"Sample with `{when}` (recorded as `student_sigmas`; the exported FlowMatchEulerDiscreteScheduler "
                   "does no shifting)")
        else:
            how = (f"Sample with `timesteps={ts}` (or `num_inference_steps={len(ts)}` with the saved "
                   f"`original_inference_steps={pipe.scheduler.config.original_inference_steps}`"
                   f"{'' if self._num_steps_reproduces(pipe.scheduler) else ', which does NOT reproduce them here'})")
        trained, guidance = self.card_summary()
        (out_dir / "README.md").write_text(
            f"# {self.title} student ({len(ts)}-step)\n\n"
            f"Distilled from `{self.run_config.teacher}` with {trained} by stepdistill:\n\n"
            f"    stepdistill train {self.name} --config <config.yaml>   # teacher={self.run_config.teacher}\n\n"
            f"Trained timesteps: `{ts}` (recorded as `student_timesteps` in scheduler/scheduler_config.json). "
            f"{how} and no CFG ({guidance} is distilled in).\n\n"
            f"```python\n{use}\n```\n")

    def _num_steps_reproduces(self, sched) -> bool:
        sched = copy.deepcopy(sched)
        try:
            sched.set_timesteps(len(self.cfg.student_timesteps))
        except ValueError:
            return False
        return sched.timesteps.tolist() == list(self.cfg.student_timesteps)
