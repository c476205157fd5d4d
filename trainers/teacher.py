"""Ordinary diffusion training (the digits16 teacher recipe): denoising loss in the network's own
parameterisation, class-label dropout to a null class for CFG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stepdistill.conditioning import ClassConditioning, Cond
from stepdistill.data import to_uint8
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError

from .base import Method, Phase


@dataclass
class TeacherConfig:
    # UNet2DModel architecture (pixel space).
    sample_size: int = 16
    in_channels: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
    attention_head_dim: int = 32
    norm_num_groups: int = 16
    # Number of classes (a null class is added for CFG); 0 trains an unconditional model.
    num_classes: int = 10
    # Probability of replacing a label by the null class during training (enables CFG).
    cond_drop_prob: float = 0.1
    # Number of training timesteps T of the noise schedule written into the exported scheduler config.
    num_train_timesteps: int = 1000
    # DDPM beta schedule (unused by flow_prediction).
    beta_schedule: str = "squaredcos_cap_v2"
    # What the network predicts: "epsilon", "v_prediction", "sample", or "flow_prediction" (a rectified-flow teacher,
    # x_t = (1 - s) x0 + s eps at t = s T, sampled by FlowMatchEulerDiscreteScheduler).
    prediction_type: str = "v_prediction"
    # Sampler used for sample grids and recorded as the exported pipeline's default.
    sample_steps: int = 50
    sample_guidance: float = 2.0


class TeacherMethod(Method):
    """Diffusion training of a (class-conditional) UNet2DModel from scratch."""

    name = "teacher"
    Config = TeacherConfig
    phase_names = ("main",)

    def __init__(self, run_config):
        super().__init__(run_config)
        from diffusers import DDIMScheduler, UNet2DModel

        c: TeacherConfig = self.cfg
        if c.prediction_type not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            raise ConfigError(f"method_args.prediction_type '{c.prediction_type}' is not one of epsilon, "
                              "v_prediction, sample, flow_prediction")
        if not 0 <= c.cond_drop_prob < 1:
            raise ConfigError("method_args.cond_drop_prob must be in [0, 1)")
        if len(c.down_block_types) != len(c.block_out_channels) or len(c.up_block_types) != len(c.block_out_channels):
            raise ConfigError("method_args.down_block_types / up_block_types need one entry per block_out_channels")
        unet = UNet2DModel(
            sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.in_channels,
            block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
            down_block_types=tuple(c.down_block_types), up_block_types=tuple(c.up_block_types),
            attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups,
            num_class_embeds=c.num_classes + 1 if c.num_classes > 0 else None,
        )
        if c.prediction_type == "flow_prediction":
            # Rectified flow x_t = (1 - s) x0 + s eps, the network predicting eps - x0 at t = s T; sampled by Euler.
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=c.num_train_timesteps, shift=1.0)
        else:
            self.scheduler = DDIMScheduler(
                num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                prediction_type=c.prediction_type, clip_sample=False, set_alpha_to_one=True,
                timestep_spacing="trailing",
            )
        # The network is registered once, inside the denoiser (a second attribute would duplicate it in
        # checkpoints as shared tensors).
        self.denoiser = Denoiser(unet, self.scheduler)
        self.classes = ClassConditioning(c.num_classes) if c.num_classes > 0 else None

    @property
    def unet(self):
        return self.denoiser.model

    def phases(self) -> list[Phase]:
        return [Phase("main", [p for p in self.unet.parameters() if p.requires_grad], every=1)]

    def ema_network(self):
        return self.unet

    def loss(self, phase: str, batch: dict, step: int):
        # 1. Clean images and (dropped-out) labels.
        x0 = batch["image"]
        cond = Cond()
        if self.classes is not None:
            cond = self.classes.cond(self.classes.drop(batch["label"], self.cfg.cond_drop_prob))
        # 2. Uniform timesteps (integers in [0, T); flow: continuous in (0, T]) and Gaussian noise; forward process.
        T = self.denoiser.num_train_timesteps
        if self.denoiser.is_flow:
            t = (1 - torch.rand(x0.shape[0], device=x0.device)) * T
        else:
            t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = self.denoiser.add_noise(x0, eps, t)
        # 3. Regress the network's own prediction type (eps, v or x0) with plain MSE.
        pred = self.denoiser.raw(x_t, t, cond)
        loss = F.mse_loss(pred.float(), self.denoiser.training_target(x0, eps, t).float())
        return loss, {"loss": loss.detach().item()}

    def pipeline(self):
        from stepdistill.pipelines import ClassConditionalPipeline

        if self.classes is None:
            from diffusers import DDIMPipeline

            return DDIMPipeline(unet=self.unet, scheduler=self.scheduler)
        return ClassConditionalPipeline(unet=self.unet, scheduler=self.scheduler)

    @torch.no_grad()
    def sample_grid(self, num: int, seed: int) -> np.ndarray:
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num)]
        if self.classes is None:
            out = pipe(batch_size=num, generator=gens, num_inference_steps=self.cfg.sample_steps, output_type="np")
            return (out.images * 255).round().astype(np.uint8)
        labels = torch.arange(num) % self.cfg.num_classes
        was_training = self.unet.training
        self.unet.eval()
        imgs = pipe(labels, num_inference_steps=self.cfg.sample_steps, guidance_scale=self.cfg.sample_guidance,
                    generator=gens, output_type="pt").images
        self.unet.train(was_training)
        return to_uint8(imgs)

    def export(self, out_dir: Path) -> None:
        self.pipeline().save_pretrained(str(out_dir), safe_serialization=True)
