"""Flux.1 (``FluxPipeline``, and transformers of its layout): a ``FluxTransformer2DModel`` on flow-matching latents
packed 2x2 into tokens with image / text position ids, a CLIP encoder (pooled) and a T5 encoder (sequence), a VAE with
shift and scale. The transformer takes ``sigma`` (``t / 1000``) as its timestep. Flux-dev is guidance-distilled: its
CFG scale is the ``guidance`` input of one pass (the pipeline's default 3.5 when none is asked for)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import nn

from stepdistill.conditioning import Cond

from .base import LatentFamily, token_map, transformer_width


class FluxFamily(LatentFamily):
    name = "Flux (FluxPipeline)"
    network_attr = "transformer"
    network_timestep_scale = 1000.0
    schedule_keyword = "sigmas"
    attention_kwargs_name = "joint_attention_kwargs"

    def __init__(self, pipe: Any, source: str, prompt_cache_bytes: int = 1 << 30, resolution: int | None = None):
        super().__init__(pipe, source, prompt_cache_bytes, resolution)
        self.guidance_input = 3.5 if pipe.transformer.config.guidance_embeds else None

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        return isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, as FluxPipeline packs them."""
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The inverse of :meth:`pack` for latents of side (h, w)."""
        b, _, c4 = tokens.shape
        return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)

    @staticmethod
    def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        b, _, h, w = x.shape
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(cond.encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        out = model(hidden_states=FluxFamily.pack(x), timestep=t.to(x.dtype) / 1000, guidance=cond.guidance,
                    pooled_projections=cond.pooled_projections, encoder_hidden_states=cond.encoder_hidden_states,
                    txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3), return_dict=False, **kwargs)[0]
        return FluxFamily.unpack(out, h, w)

    # GAN features: the image tokens after the middle double-stream block (or single-stream block, for a network
    # without double-stream ones), in their (h / 2, w / 2) grid of 2x2 latent patches.
    @staticmethod
    def feature_block(model: nn.Module) -> nn.Module:
        blocks = model.transformer_blocks if len(model.transformer_blocks) else model.single_transformer_blocks
        return blocks[len(blocks) // 2]

    @staticmethod
    def feature_map(model: nn.Module, block_output: Any, x: torch.Tensor) -> torch.Tensor:
        # block_output: (encoder_hidden_states, hidden_states)
        return token_map(block_output[1], x.shape[-2] // 2, x.shape[-1] // 2)

    @staticmethod
    def feature_channels(model: nn.Module) -> int:
        return transformer_width(model)

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        device = next(self.pipe.text_encoder.parameters()).device
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        cond = Cond(encoder_hidden_states=embeds, pooled_projections=pooled)
        if self.guidance_input is not None:  # CFG is the guidance input: no unconditional pass is ever made
            return cond, cond
        neg, neg_pooled, _ = self.pipe.encode_prompt(prompt=[""] * len(prompts), prompt_2=None, device=device)
        return cond, Cond(encoder_hidden_states=neg, pooled_projections=neg_pooled)

    def resolution_multiple(self) -> int:
        return 2 * int(self.pipe.vae_scale_factor)  # latents are packed 2x2 into tokens

    def noise_shape(self, n: int, resolution: int | None = None) -> tuple[int, ...]:
        side = 2 * ((resolution or self.resolution) // (self.pipe.vae_scale_factor * 2))
        return (n, self.network.config.in_channels // 4, side, side)

    def sampler_timesteps(self, steps: int) -> torch.Tensor:
        # The shift depends on the token count (dynamic shifting), as FluxPipeline sets it.
        scheduler = self.pipe.scheduler
        if not scheduler.config.get("use_dynamic_shifting", False):
            return super().sampler_timesteps(steps)
        h, w = self.noise_shape(1)[2:]
        c = scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
        return scheduler.timesteps
