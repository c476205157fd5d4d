"""Ordinary diffusion training (the digits16 teacher recipe): denoising loss in the network's own
parameterisation, class-label dropout to a null class for CFG."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from stepdistill.batch import Batch
from stepdistill.conditioning import Cond
from stepdistill.errors import ConfigError
from stepdistill.pipelines.class_conditional import ClassConditionalPipeline
from stepdistill.pipelines.export import StudentSpec
from stepdistill.pipelines.families import family_of

from .base import Method, Phase, Setup


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
    """Diffusion training of a (class-conditional) UNet2DModel from scratch; its setup has no teacher."""

    name = "teacher"
    Config = TeacherConfig
    phase_names = ("main",)
    needs_teacher = False

    def __init__(self, setup: Setup, cfg: TeacherConfig):
        super().__init__(setup, cfg)
        c = cfg
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
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=c.num_train_timesteps, shift=1.0)
        else:
            scheduler = DDIMScheduler(
                num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                prediction_type=c.prediction_type, clip_sample=False, set_alpha_to_one=True,
                timestep_spacing="trailing",
            )
        pipe = (ClassConditionalPipeline(unet=unet, scheduler=scheduler) if c.num_classes > 0
                else DDIMPipeline(unet=unet, scheduler=scheduler))
        # The network's own family (the pipeline it is exported as) calls it and builds its batches.
        self.family = family_of(pipe, "teacher")
        # The network is registered once, inside the denoiser (a second attribute would duplicate it in
        # checkpoints as shared tensors).
        self.denoiser = self.family.denoiser(unet)
        self.classes = self.family.classes

    @property
    def unet(self) -> UNet2DModel:
        return self.denoiser.model

    def phases(self) -> list[Phase]:
        return [Phase("main", [p for p in self.unet.parameters() if p.requires_grad], cond=False, real=True)]

    def ema_network(self) -> UNet2DModel:
        return self.unet

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        # 1. Clean images and (dropped-out) labels.
        x0 = batch.real
        cond = Cond()
        if self.classes is not None:
            cond = self.classes.cond(self.classes.drop(batch.labels, self.cfg.cond_drop_prob))
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

    def export_spec(self) -> StudentSpec:
        c: TeacherConfig = self.cfg
        return StudentSpec(method=self.name, title="Teacher", trained=f"diffusion training ({c.prediction_type}, "
                           f"{c.num_classes} classes, label dropout {c.cond_drop_prob})", networks=[self.unet],
                           scheduler=self.family.pipe.scheduler, sampling={"num_inference_steps": c.sample_steps},
                           guidance_scale=c.sample_guidance if self.classes is not None else 1.0, from_teacher=False)
