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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stepdistill.data import to_uint8
from stepdistill.errors import ConfigError
from stepdistill.pipelines.guidance import ADAPTER_KINDS, AdapterGuidancePipeline, GuidanceAdapters
from stepdistill.pipelines.lora import base_fingerprint
from stepdistill.trajectories import cond_from_tensors, is_trajectory_folder, read_spec

from .base import Method, Phase
from .common import cast_frozen, load_teacher


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

    def __init__(self, run_config):
        super().__init__(run_config)
        c: AGDConfig = self.cfg
        if c.kind not in ADAPTER_KINDS:
            raise ConfigError(f"method_args.kind must be one of {', '.join(ADAPTER_KINDS)}, got '{c.kind}'")
        if c.hidden < 1 or c.num_tokens < 1 or c.guidance_multiplier <= 0 or c.sample_steps < 1:
            raise ConfigError("method_args.hidden, num_tokens, sample_steps must be at least 1 and "
                              "guidance_multiplier positive")
        source = run_config.data.source
        if not is_trajectory_folder(source):
            raise ConfigError(f"agd trains on CFG trajectories of its teacher: data.source '{source}' is not a "
                              "trajectory folder (write one with `stepdistill trajectories --teacher ... --out DIR`)")
        self.spec = read_spec(source)
        self.family, self.teacher = load_teacher(run_config, self.name)
        net = self.family.network
        if base_fingerprint(net) != self.spec.fingerprint or type(net).__name__ != self.spec.network_class:
            raise ConfigError(f"the trajectories in '{source}' were sampled from teacher '{self.spec.teacher}', whose "
                              f"weights differ from this run's teacher '{run_config.teacher}': write trajectories of "
                              "this teacher, or set teacher to theirs")
        if not self.spec.w_min <= c.default_guidance <= self.spec.w_max:
            raise ConfigError(f"method_args.default_guidance {c.default_guidance} lies outside the trajectories' "
                              f"guidance range [{self.spec.w_min}, {self.spec.w_max}]")
        for name, module in self.family.frozen_modules().items():
            setattr(self, name, module)
        self.adapters = GuidanceAdapters.for_network(
            net, kind=c.kind, hidden=c.hidden, num_tokens=c.num_tokens, guidance_multiplier=c.guidance_multiplier,
            timestep_scale=self.family.network_timestep_scale, w_min=self.spec.w_min, w_max=self.spec.w_max,
            default_w=c.default_guidance, teacher=run_config.teacher)
        self.adapters.attach(net)
        cast_frozen(self.teacher, self.family, run_config.train.teacher_dtype)

    # --- the loop's interface ----------------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        return [Phase("adapter", list(self.adapters.parameters()))]

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.adapters.embed[0].weight.device
        x_t, t = batch["x_t"].to(device), batch["t"].to(device)
        w, target = batch["w"].to(device), batch["target"].to(device)
        cond = cond_from_tensors(batch).to(device)
        # 1. One pass of the adapted network at w.
        with self.adapters.guidance(w):
            pred = self.teacher.raw(x_t, t, cond)
        # 2. MSE against the recorded CFG output.
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss": loss.item()}

    def pipeline(self) -> AdapterGuidancePipeline:
        """The teacher pipeline with these adapters, as exported (the adapters stay attached to the teacher)."""
        return AdapterGuidancePipeline(self.family.pipe, self.adapters, attach=False)

    @torch.no_grad()
    def sample_grid(self, num: int, seed: int) -> np.ndarray:
        pipe = self.pipeline()
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num)]
        steps = self.cfg.sample_steps
        # The network is the frozen teacher itself: the pipeline samples in its dtype (train.teacher_dtype).
        if self.family.classes is not None:
            labels = torch.arange(num) % self.family.classes.num_classes
            images = pipe(labels, num_inference_steps=steps, generator=gens, output_type="pt").images
            return to_uint8(images.float())
        from stepdistill.data import PromptFile

        prompts = PromptFile(self.spec.prompts).prompts if self.spec.prompts else ["a photo"]
        size = self.run_config.data.resolution
        images = pipe([prompts[i % len(prompts)] for i in range(num)], num_inference_steps=steps, generator=gens,
                      output_type="np", height=size, width=size).images
        return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)

    def export(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        c: AGDConfig = self.cfg
        self.adapters.save(out_dir / "guidance_adapter")
        # The base pipeline as published (the run may hold its frozen parts in another dtype).
        from stepdistill.pipelines import load_pipeline

        load_pipeline(self.run_config.teacher).save_pretrained(str(out_dir), safe_serialization=True)
        base_params = sum(p.numel() for p in self.family.network.parameters())
        n = self.adapters.num_parameters()
        (out_dir / "README.md").write_text(
            f"# Adapter guidance (AGD) for `{self.run_config.teacher}`\n\n"
            f"Guidance adapters ({c.kind} type, {n:,} parameters = {100 * n / base_params:.2f}% of the "
            f"{type(self.family.network).__name__}) trained by stepdistill on CFG-guided trajectories at "
            f"w in [{self.spec.w_min}, {self.spec.w_max}]: `guidance_scale=w` makes ONE network call per step. The "
            "folder is the unchanged teacher pipeline plus `guidance_adapter/`.\n\n"
            "```python\nfrom stepdistill.pipelines import load_pipeline\n"
            f"pipe = load_pipeline(\"{out_dir.name}\")  # an AdapterGuidancePipeline\n"
            f"images = pipe(..., num_inference_steps=50, guidance_scale={c.default_guidance}).images\n"
            "# or onto another pipeline of the same base architecture (a fine-tune, a distilled student):\n"
            "from stepdistill.pipelines.guidance import load_guidance_adapter\n"
            f"guided = load_guidance_adapter(other_pipe, \"{out_dir.name}\")\n```\n")
