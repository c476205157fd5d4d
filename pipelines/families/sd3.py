"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an ``SD3Transformer2DModel`` on flow-matching latents, two
CLIP encoders and an optional T5 (the pipeline fills its part with zeros when absent); the transformer takes
``sigma * 1000`` as its timestep, the pooled CLIP embeddings as ``pooled_projections``; the VAE has a shift as well
as a scale."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from stepdistill.conditioning import Cond

from .base import LatentFamily, token_map, transformer_width


class SD3Family(LatentFamily):
    name = "SD3 / SD3.5 (StableDiffusion3Pipeline)"
    network_attr = "transformer"
    schedule_keyword = "sigmas"
    attention_kwargs_name = "joint_attention_kwargs"

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        return isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel)

    @staticmethod
    def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond.encoder_hidden_states,
                     pooled_projections=cond.pooled_projections, return_dict=False, **kwargs)[0]

    # GAN features: the image tokens after the middle joint-attention block, in their (h / p, w / p) grid.
    @staticmethod
    def feature_block(model: nn.Module) -> nn.Module:
        return model.transformer_blocks[len(model.transformer_blocks) // 2]

    @staticmethod
    def feature_map(model: nn.Module, block_output: Any, x: torch.Tensor) -> torch.Tensor:
        p = model.config.patch_size  # block_output: (encoder_hidden_states, hidden_states)
        return token_map(block_output[1], x.shape[-2] // p, x.shape[-1] // p)

    @staticmethod
    def feature_channels(model: nn.Module) -> int:
        return transformer_width(model)

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        device = next(self.pipe.text_encoder.parameters()).device
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                                    device=device, do_classifier_free_guidance=True)
        return (Cond(encoder_hidden_states=embeds, pooled_projections=pooled),
                Cond(encoder_hidden_states=neg, pooled_projections=neg_pooled))
