"""Model families: how stepdistill talks to each kind of diffusers pipeline (k-diffusion's ``external.py`` in spirit).

A :class:`Family` knows, for one kind of pipeline, how to call its denoising network, how to encode conditioning
(class labels, or prompts through the pipeline's own ``encode_prompt`` with every text encoder it has), how to go
between images and the network's space (VAE scale **and** shift), the shape of the noise, and how to rebuild the
pipeline around a new network for export (``type(pipe)(**components)``, so the export is the teacher's own
pipeline class). Methods talk to a Family and the :class:`~stepdistill.denoiser.Denoiser`, never to a pipeline
class by name. Adding a family is adding a class here (and its tiny test pipeline) and listing it in
:data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from .conditioning import ClassConditioning, Cond, PromptCache
from .errors import ConfigError


class Family:
    """The adapter of one kind of pipeline. Subclasses set ``name`` and implement the methods that raise here.

    Args:
        pipe: the loaded teacher pipeline (its modules are used in place, never copied).
        source: how the teacher was named (alias, folder or hub id), for messages.
        prompt_cache_bytes: bound of the per-prompt embedding cache (kept on the CPU) of text families.
    """

    name: ClassVar[str] = ""
    # The pipeline attribute (and subfolder) holding the denoising network.
    network_attr: ClassVar[str] = "unet"
    # Guidance-distilled networks (Flux-dev) take the guidance scale as an input: the value used when no CFG is
    # asked for (the stock pipeline's default guidance_scale). None: CFG is two passes, as usual.
    guidance_input: float | None = None
    # The network's timestep input times this is on the [0, 1000) scale (Flux's transformer takes sigma: 1000).
    network_timestep_scale: ClassVar[float] = 1.0

    def __init__(self, pipe: Any, source: str, prompt_cache_bytes: int = 1 << 30):
        self.pipe, self.source = pipe, source
        self.classes: ClassConditioning | None = None
        self.prompts = PromptCache(self._encode_prompts, prompt_cache_bytes)

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        raise NotImplementedError

    @property
    def network(self) -> nn.Module:
        return getattr(self.pipe, self.network_attr)

    @property
    def distilled_guidance_scale(self) -> float:
        """The ``guidance_scale`` to pass to the exported pipeline of a student with the teacher's CFG distilled in:
        1.0 (no CFG pass), or for a guidance-distilled network (Flux-dev) the guidance input it was trained with."""
        return self.guidance_input if self.guidance_input is not None else 1.0

    def denoiser(self, model: nn.Module):
        """``model`` (the teacher network or a copy of it) as a Denoiser on the teacher's schedule, called the
        family's way."""
        from .denoiser import Denoiser

        return Denoiser(model, self.pipe.scheduler, call=self.call, guidance_input=self.guidance_input)

    @staticmethod
    def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The network's raw output at (x, t) for ``cond``."""
        raise NotImplementedError

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Frozen parts of the pipeline a method keeps beside the network (VAE, text encoders), by pipeline name."""
        return {}

    # --- conditioning -----------------------------------------------------------------------------------------------
    def prompt_cond(self, prompts: list[str], device: torch.device | None = None) -> tuple[Cond, Cond]:
        """(cond, uncond) for ``prompts``, as the pipeline itself conditions at sampling time."""
        if self.classes is not None:
            raise ConfigError(f"teacher '{self.source}' is class-conditional: it takes class labels, not prompts")
        cond, uncond = self.prompts(list(prompts))
        return cond.to(device), uncond.to(device)

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        raise ConfigError(f"teacher '{self.source}' ({type(self.pipe).__name__}) takes no prompts")

    # --- the network's space ----------------------------------------------------------------------------------------
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the network's input space (identity for pixel-space families)."""
        return images

    def noise_shape(self, n: int, resolution: int) -> tuple[int, ...]:
        """Shape of n noise samples for images of side ``resolution``."""
        raise NotImplementedError

    @contextmanager
    def frozen_in(self, dtype: torch.dtype) -> Iterator[None]:
        """The frozen parts (VAE, text encoders) in ``dtype`` for the block, back in their own dtype after it: a
        pipeline around an fp32 student samples with them (bf16 -> fp32 -> bf16 is exact)."""
        params = [p for m in self.frozen_modules().values() for p in m.parameters()]
        dtypes = [p.dtype for p in params]
        for p in params:
            p.data = p.data.to(dtype)
        try:
            yield
        finally:
            for p, d in zip(params, dtypes):
                p.data = p.data.to(d)

    # --- export -----------------------------------------------------------------------------------------------------
    def export_pipeline(self, network: nn.Module, scheduler: Any, originals: bool = False) -> Any:
        """The teacher's pipeline class around ``network`` and ``scheduler``.

        Every other component is shared with the teacher pipeline, or, with ``originals``, taken from a fresh load of
        the teacher (the frozen parts as published, not the copies a run keeps in ``train.teacher_dtype``).
        """
        base = self.pipe
        if originals:
            from stepdistill.pipelines import load_pipeline

            base = load_pipeline(self.source)
        from stepdistill.pipelines import rebuild_pipeline

        return rebuild_pipeline(base, **{self.network_attr: network, "scheduler": scheduler})


class ClassFamily(Family):
    """Class-conditional pixel-space ``UNet2DModel`` (our ``ClassConditionalPipeline``, e.g. the digits16 teacher)."""

    name = "class-conditional pixel UNet (ClassConditionalPipeline)"

    def __init__(self, pipe: Any, source: str, prompt_cache_bytes: int = 1 << 30):
        super().__init__(pipe, source, prompt_cache_bytes)
        self.classes = ClassConditioning(pipe.num_classes)

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        from stepdistill.pipelines import ClassConditionalPipeline

        return isinstance(pipe, ClassConditionalPipeline)

    @staticmethod
    def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return model(x, t, class_labels=cond.class_labels).sample

    def noise_shape(self, n: int, resolution: int) -> tuple[int, ...]:
        cfg = self.network.config
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (n, cfg.in_channels, *size)


class LatentFamily(Family):
    """Latent-space pipelines with a VAE and text encoders (what SD1.x/2.x, SDXL, SD3 and Flux share)."""

    # The frozen parts a method keeps beside the network, by pipeline attribute (absent ones are skipped).
    frozen_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {n: getattr(self.pipe, n) for n in self.frozen_names if getattr(self.pipe, n, None) is not None}

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """One posterior sample of the VAE, shifted and scaled as the pipeline's decode expects (SD3/Flux-type VAEs
        have a ``shift_factor``; SD/SDXL's is absent, i.e. 0)."""
        vae = self.pipe.vae
        # float16 VAEs that overflow (SDXL's, force_upcast) encode in float32, as diffusers' own pipelines do.
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        dtype = vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            z = vae.encode(images.to(device=next(vae.parameters()).device, dtype=vae.dtype)).latent_dist.sample()
        finally:
            if upcast:
                vae.to(dtype)
        shift = vae.config.get("shift_factor") or 0.0
        return ((z - shift) * vae.config.scaling_factor).float()

    def noise_shape(self, n: int, resolution: int) -> tuple[int, ...]:
        side = resolution // self.pipe.vae_scale_factor
        return (n, self.network.config.in_channels, side, side)


class LatentUNetFamily(LatentFamily):
    """Latent-space ``UNet2DConditionModel`` pipelines (SD1.x/2.x and SDXL share this)."""

    @staticmethod
    def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return model(x, t, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=cond.timestep_cond,
                     added_cond_kwargs=cond.added_cond_kwargs).sample

    def _encoder_device(self) -> torch.device:
        return next(self.pipe.text_encoder.parameters()).device


class SDFamily(LatentUNetFamily):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder."""

    name = "SD1.x/2.x (StableDiffusionPipeline)"

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        from diffusers import UNet2DConditionModel

        return (isinstance(getattr(pipe, "unet", None), UNet2DConditionModel)
                and getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "vae", None) is not None
                and getattr(pipe, "text_encoder_2", None) is None
                and pipe.unet.config.get("addition_embed_type") is None)

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        cond, uncond = self.pipe.encode_prompt(prompts, self._encoder_device(), 1, True)
        return Cond(encoder_hidden_states=cond), Cond(encoder_hidden_states=uncond)


class SDXLFamily(LatentUNetFamily):
    """Stable Diffusion XL: two CLIP text encoders (hidden states concatenated), the second's pooled embedding and the
    size / crop micro-conditioning (``time_ids``) as the UNet's added conditions."""

    name = "SDXL (StableDiffusionXLPipeline)"

    def __init__(self, pipe: Any, source: str, prompt_cache_bytes: int = 1 << 30, resolution: int | None = None):
        super().__init__(pipe, source, prompt_cache_bytes)
        # Micro-conditioning as the pipeline uses at sampling by default: original = target size, no crop.
        self.resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        from diffusers import UNet2DConditionModel

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


class SD3Family(LatentFamily):
    """Stable Diffusion 3 / 3.5: an ``SD3Transformer2DModel`` on flow-matching latents, two CLIP encoders and an
    optional T5 (the pipeline fills its part with zeros when absent); the transformer takes ``sigma * 1000`` as its
    timestep, the pooled CLIP embeddings as ``pooled_projections``; the VAE has a shift as well as a scale."""

    name = "SD3 / SD3.5 (StableDiffusion3Pipeline)"
    network_attr = "transformer"

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel)

    @staticmethod
    def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond.encoder_hidden_states,
                     pooled_projections=cond.pooled_projections, return_dict=False)[0]

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        device = next(self.pipe.text_encoder.parameters()).device
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                                    device=device, do_classifier_free_guidance=True)
        return (Cond(encoder_hidden_states=embeds, pooled_projections=pooled),
                Cond(encoder_hidden_states=neg, pooled_projections=neg_pooled))


class FluxFamily(LatentFamily):
    """Flux.1 (and transformers of its layout): a ``FluxTransformer2DModel`` on flow-matching latents packed 2x2 into
    tokens with image / text position ids, a CLIP encoder (pooled) and a T5 encoder (sequence), a VAE with shift and
    scale. The transformer takes ``sigma`` (``t / 1000``) as its timestep. Flux-dev is guidance-distilled: its CFG
    scale is the ``guidance`` input of one pass (the pipeline's default 3.5 when none is asked for)."""

    name = "Flux (FluxPipeline)"
    network_attr = "transformer"
    network_timestep_scale = 1000.0

    def __init__(self, pipe: Any, source: str, prompt_cache_bytes: int = 1 << 30):
        super().__init__(pipe, source, prompt_cache_bytes)
        self.guidance_input = 3.5 if pipe.transformer.config.guidance_embeds else None

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        from diffusers import FluxTransformer2DModel

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
    def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _, h, w = x.shape
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(cond.encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        out = model(hidden_states=FluxFamily.pack(x), timestep=t.to(x.dtype) / 1000, guidance=cond.guidance,
                    pooled_projections=cond.pooled_projections, encoder_hidden_states=cond.encoder_hidden_states,
                    txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3), return_dict=False)[0]
        return FluxFamily.unpack(out, h, w)

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        device = next(self.pipe.text_encoder.parameters()).device
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        cond = Cond(encoder_hidden_states=embeds, pooled_projections=pooled)
        if self.guidance_input is not None:  # CFG is the guidance input: no unconditional pass is ever made
            return cond, cond
        neg, neg_pooled, _ = self.pipe.encode_prompt(prompt=[""] * len(prompts), prompt_2=None, device=device)
        return cond, Cond(encoder_hidden_states=neg, pooled_projections=neg_pooled)

    def noise_shape(self, n: int, resolution: int) -> tuple[int, ...]:
        side = 2 * (resolution // (self.pipe.vae_scale_factor * 2))
        return (n, self.network.config.in_channels // 4, side, side)


# The families in the order they are tried (the more specific first).
FAMILIES: tuple[type[Family], ...] = (ClassFamily, SDXLFamily, SDFamily, SD3Family, FluxFamily)


def family_of(pipe: Any, source: str, resolution: int | None = None, prompt_cache_bytes: int = 1 << 30) -> Family:
    """The family adapter of a loaded pipeline; a ConfigError naming the supported families otherwise."""
    for fam in FAMILIES:
        if fam.accepts(pipe):
            if fam is SDXLFamily:
                return fam(pipe, source, prompt_cache_bytes, resolution=resolution)
            return fam(pipe, source, prompt_cache_bytes)
    names = "; ".join(f.name for f in FAMILIES)
    raise ConfigError(f"teacher '{source}' is a {type(pipe).__name__}, which no supported family matches (supported: "
                      f"{names})")
