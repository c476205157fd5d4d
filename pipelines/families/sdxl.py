"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders (hidden states concatenated), the
second's pooled embedding and the size / crop micro-conditioning (``time_ids``) as the UNet's added conditions."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

from stepdistill.conditioning import Cond

from .sd import LatentUNetFamily


class SDXLFamily(LatentUNetFamily):
    """SDXL; the micro-conditioning is the pipeline's default at sampling: original = target size, no crop."""

    name = "SDXL (StableDiffusionXLPipeline)"

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        return (isinstance(getattr(pipe, "unet", None), UNet2DConditionModel)
                and getattr(pipe, "text_encoder_2", None) is not None
                and pipe.unet.config.get("addition_embed_type") == "text_time")

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        device = next(self.pipe.text_encoder_2.parameters()).device
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(prompt=prompts, device=device,
                                                                    num_images_per_prompt=1,
                                                                    do_classifier_free_guidance=True)
        h = w = self.resolution
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype, device=device).repeat(len(prompts), 1)
        return (Cond(encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}),
                Cond(encoder_hidden_states=neg, added_cond_kwargs={"text_embeds": neg_pooled, "time_ids": time_ids}))
