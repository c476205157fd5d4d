"""Adapter guidance distillation (AGD; Jensen et al., 2025, cristianpjensen/agd): classifier-free guidance at the
cost of one network call per step.

Small adapters on the frozen teacher's attention blocks (:mod:`stepdistill.pipelines.guidance`), conditioned on
the guidance scale w and the timestep, learn to make ONE conditional pass at w output what CFG's two passes
output. The training data are CFG-guided trajectories of the teacher (``stepdistill trajectories``): the states the
guided sampler really visits, each with w and the guided prediction there (training on forward-noised data instead
would teach the adapters states the sampler never reaches).

Loss, per state (x_t, t, c, w, y_cfg) of the trajectories:
  1. the adapted network's single pass at (x_t, t, c) with the adapters set to w;
  2. MSE against y_cfg = uncond + w (cond - uncond) recorded by the teacher (its own parameterisation).
The base network never changes (its weights are frozen; only the adapters are trained).

Phase: ``adapter`` (every step). The export is the teacher pipeline unchanged plus ``guidance_adapter/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stepdistill.batch import Batch
from stepdistill.errors import ConfigError
from stepdistill.pipelines.export import StudentSpec
from stepdistill.pipelines.guidance import ADAPTER_KINDS, GuidanceAdapters
from stepdistill.pipelines.lora import base_fingerprint

from .base import Method, Phase, Setup


@dataclass
class AGDConfig:
    # Adapter type: "attention" (each adapted block attends to guidance tokens made from (w, t), plus a token of the
    # class for class-conditional networks, and for cross-attention to the text tokens; the reference's SD type) or
    # "additive" (a (w, t) embedding added to the block's output; the reference's DiT type).
    kind: str = "attention"
    # Width of the (w, t) embedding and of each adapter's attention (reference: 320 attention type on SD, 256
    # additive on DiT; the digits16 recipe keeps the adapters under 5% of the teacher's parameters).
    hidden: int = 64
    # Guidance tokens the attention-type adapters attend to.
    num_tokens: int = 4
    # w enters as sinusoidal(w * guidance_multiplier), like a timestep (reference: 1000).
    guidance_multiplier: float = 1000.0
    # The guidance scale the exported pipeline uses when none is asked for (the teacher's usual CFG scale); must lie
    # in the trajectories' range.
    default_guidance: float = 2.0
    # Sampler steps of the periodic sample grids.
    sample_steps: int = 25


class AGDMethod(Method):
    """Adapters on a frozen teacher trained to reproduce its CFG output in one pass (see the module docstring)."""

    name = "agd"
    Config = AGDConfig
    phase_names = ("adapter",)

    def __init__(self, setup: Setup, cfg: AGDConfig):
        super().__init__(setup, cfg)
        c = cfg
        if c.kind not in ADAPTER_KINDS:
            raise ConfigError(f"method_args.kind must be one of {', '.join(ADAPTER_KINDS)}, got '{c.kind}'")
        if c.hidden < 1 or c.num_tokens < 1 or c.guidance_multiplier <= 0 or c.sample_steps < 1:
            raise ConfigError("method_args.hidden, num_tokens, sample_steps must be at least 1 and "
                              "guidance_multiplier positive")
        spec = setup.data.trajectories
        if spec is None:
            raise ConfigError(f"agd trains on CFG trajectories of its teacher: data.source '{setup.data.source}' is "
                              "not a trajectory folder (write one with `stepdistill trajectories --teacher ... --out "
                              "DIR`)")
        self.spec, self.prompts = spec, setup.data.prompts
        self.teacher = setup.teacher
        net = self.family.network
        if base_fingerprint(net) != spec.fingerprint or type(net).__name__ != spec.network_class:
            raise ConfigError(f"the trajectories in '{setup.data.source}' were sampled from teacher "
                              f"'{spec.teacher}', whose weights differ from this run's teacher "
                              f"'{setup.teacher_name}': write trajectories of this teacher, or set teacher to theirs")
        want = tuple(self.family.noise_shape(1, spec.resolution)[1:])
        if setup.data.state_shape is not None and tuple(setup.data.state_shape) != want:
            raise ConfigError(f"the trajectories in '{setup.data.source}' hold states of shape "
                              f"{list(setup.data.state_shape)}, but teacher '{setup.teacher_name}' at resolution "
                              f"{spec.resolution} takes {list(want)}: write trajectories of this teacher")
        if not spec.w_min <= c.default_guidance <= spec.w_max:
            raise ConfigError(f"method_args.default_guidance {c.default_guidance} lies outside the trajectories' "
                              f"guidance range [{spec.w_min}, {spec.w_max}]")
        self.adapters = GuidanceAdapters.for_network(
            self.family, net, kind=c.kind, hidden=c.hidden, num_tokens=c.num_tokens,
            guidance_multiplier=c.guidance_multiplier, timestep_scale=self.family.network_timestep_scale,
            w_min=spec.w_min, w_max=spec.w_max, default_w=c.default_guidance, teacher=setup.teacher_name)
        self.adapters.attach(self.family, net)

    def phases(self) -> list[Phase]:
        return [Phase("adapter", list(self.adapters.parameters()))]

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x_t, t, w, target = (batch.tensors[k] for k in ("x_t", "t", "w", "target"))
        # 1. One pass of the adapted network at w.
        with self.adapters.guidance(w):
            pred = self.teacher.raw(x_t, t, batch.cond)
        # 2. MSE against the recorded CFG output.
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss": loss.item()}

    def export_spec(self) -> StudentSpec:
        c: AGDConfig = self.cfg
        base_params = sum(p.numel() for p in self.family.network.parameters())
        n = self.adapters.num_parameters()
        usage = ("from stepdistill.pipelines import load_pipeline\n"
                 "pipe = load_pipeline(\"{folder}\")  # an AdapterGuidancePipeline\n"
                 f"images = pipe(..., num_inference_steps=50, guidance_scale={c.default_guidance}).images\n"
                 "# or onto another pipeline of the same base architecture (a fine-tune, a distilled student):\n"
                 "from stepdistill.pipelines.guidance import load_guidance_adapter\n"
                 "guided = load_guidance_adapter(other_pipe, \"{folder}\")")
        return StudentSpec(
            method=self.name, title=f"Adapter guidance (AGD) for `{self.teacher_name}`",
            trained=f"guidance adapters ({c.kind} type, {n:,} parameters = {100 * n / base_params:.2f}% of the "
                    f"{type(self.family.network).__name__}) trained on CFG-guided trajectories at w in "
                    f"[{self.spec.w_min}, {self.spec.w_max}]",
            networks=[], scheduler=self.family.pipe.scheduler, sampling={"num_inference_steps": c.sample_steps},
            guidance_scale=c.default_guidance, adapters=self.adapters, usage=usage,
            details="`guidance_scale=w` makes ONE network call per step.", sample_prompts=self.prompts or [])
