"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``), and what the latent ``UNet2DConditionModel`` families
(SD and SDXL) share: the UNet call with text embeddings and added conditions, cross-attention adapters, and the
guidance-scale embedding of full LCM students."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from stepdistill.conditioning import Cond

from .base import LatentFamily


class LatentUNetFamily(LatentFamily):
    """Latent-space ``UNet2DConditionModel`` pipelines (SD1.x/2.x and SDXL share this)."""

    attention_kwargs_name = "cross_attention_kwargs"

    @staticmethod
    def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        return model(x, t, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=cond.timestep_cond,
                     added_cond_kwargs=cond.added_cond_kwargs, **kwargs).sample

    # --- the guidance-scale embedding of full LCM students -----------------------------------------------------------
    @staticmethod
    def guidance_embedding_dim(network: nn.Module) -> int | None:
        # The UNet's timestep_cond input, sized by its time_cond_proj_dim (unset: 0).
        return int(network.config.time_cond_proj_dim or 0)

    @staticmethod
    def with_guidance_embedding(network: nn.Module, dim: int) -> nn.Module:
        """A copy of ``network`` that also takes a ``dim``-wide guidance-scale embedding (``timestep_cond``), its new
        projection zero so that it starts as ``network``."""
        net = type(network).from_config(network.config, time_cond_proj_dim=dim)
        missing, unexpected = net.load_state_dict(network.state_dict(), strict=False)
        if unexpected or not all("cond_proj" in k for k in missing):
            raise RuntimeError(f"the guidance-embedding copy does not fit the network: {missing} / {unexpected}")
        nn.init.zeros_(net.time_embedding.cond_proj.weight)
        return net

    @staticmethod
    def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
        """diffusers' guidance-scale embedding of the LCM-convention scale w - 1 (what the pipeline feeds a UNet with
        ``time_cond_proj_dim``)."""
        # The helper is an instance method that does not use the instance.
        return StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float().cpu() - 1, embedding_dim=dim)


class SDFamily(LatentUNetFamily):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder."""

    name = "SD1.x/2.x (StableDiffusionPipeline)"

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        return (isinstance(getattr(pipe, "unet", None), UNet2DConditionModel)
                and getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "vae", None) is not None
                and getattr(pipe, "text_encoder_2", None) is None
                and pipe.unet.config.get("addition_embed_type") is None)

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        cond, uncond = self.pipe.encode_prompt(prompts, self._encoder_device(), 1, True)
        return Cond(encoder_hidden_states=cond), Cond(encoder_hidden_states=uncond)
