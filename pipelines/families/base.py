"""The family contract: how stepdistill talks to one kind of diffusers pipeline (k-diffusion's ``external.py`` in
spirit), and the shared base of the latent-space families.

A :class:`Family` is the only code that knows a pipeline class. It calls the pipeline's denoising network (and, when
asked, returns the network's intermediate features for GAN heads), encodes conditioning through the pipeline's own
``encode_prompt``, goes between images and the network's space (VAE scale and shift), gives the noise shape, turns
data items into the typed :class:`~stepdistill.batch.Batch` of a method's loss, calls the pipeline for samples, saves
and loads LoRA adapters, finds the attention blocks adapters go on, and rebuilds the pipeline around a new network
for export (``type(pipe)(**components)``, so the export is the teacher's own pipeline class).

A new family is one file in this folder (a subclass of :class:`Family` or :class:`LatentFamily`) and one line in
``FAMILIES`` (``families/__init__.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from stepdistill.batch import Batch
from stepdistill.conditioning import ClassConditioning, Cond, PromptCache
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError, UserError
from stepdistill.images import float_to_uint8
from stepdistill.trajectories import cond_from_tensors

from .. import lora as L
from ..folders import load_diffusers_pipeline, rebuild_pipeline

IMAGES_NEEDED = ("needs real images: set data.source to an image folder (with captions for a text teacher), a local "
                 "HF datasets folder or digits16; a prompt file has no images")


class Family:
    """The adapter of one kind of pipeline. Subclasses set ``name`` and implement the methods that raise here.

    Args:
        pipe: the loaded pipeline (its modules are used in place, never copied).
        source: how the pipeline was named (alias, folder or hub id), for messages and exports.
        prompt_cache_bytes: bound of the per-prompt embedding cache (kept on the CPU) of text families.
        resolution: the image side the run trains / samples at (latent families; None = the pipeline's default).
    """

    name: ClassVar[str] = ""
    # The pipeline attribute (and subfolder) holding the denoising network.
    network_attr: ClassVar[str] = "unet"
    # The network's timestep input times this is on the [0, 1000) scale (Flux's transformer takes sigma: 1000).
    network_timestep_scale: ClassVar[float] = 1.0
    # The stock pipeline's keyword for an explicit schedule of a distilled student: "timesteps", or "sigmas" for the
    # flow-matching pipelines that take noise levels.
    schedule_keyword: ClassVar[str] = "timesteps"
    # The network's keyword argument that diffusers passes on to its attention processors (None: it takes none).
    attention_kwargs_name: ClassVar[str | None] = None

    def __init__(self, pipe: Any, source: str, prompt_cache_bytes: int = 1 << 30, resolution: int | None = None):
        self.pipe, self.source = pipe, source
        self.resolution = resolution or self.default_resolution()
        self.classes: ClassConditioning | None = None
        # Guidance-distilled networks (Flux-dev) take the guidance scale as an input: the value used when no CFG is
        # asked for (the stock pipeline's default guidance_scale). None: CFG is two passes, as usual.
        self.guidance_input: float | None = None
        self.prompts = PromptCache(self._encode_prompts, prompt_cache_bytes)

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        raise NotImplementedError

    @property
    def network(self) -> nn.Module:
        return getattr(self.pipe, self.network_attr)

    @property
    def kind(self) -> str:
        """What the pipeline is conditioned on: "class", "text" or "none"."""
        return "class" if self.classes is not None else "text"

    @property
    def distilled_guidance_scale(self) -> float:
        """The ``guidance_scale`` to pass to the exported pipeline of a student with the teacher's CFG distilled in:
        1.0 (no CFG pass), or for a guidance-distilled network (Flux-dev) the guidance input it was trained with."""
        return self.guidance_input if self.guidance_input is not None else 1.0

    def default_resolution(self) -> int:
        """The image side the pipeline samples at by default."""
        raise NotImplementedError

    def check_resolution(self, resolution: int) -> None:
        """A UserError unless the pipeline can make images of side ``resolution``."""
        m = self.resolution_multiple()
        if resolution < m or resolution % m:
            raise UserError(f"resolution {resolution}: a {type(self.pipe).__name__} makes images whose side is a "
                            f"positive multiple of {m}")

    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this (the VAE's downsampling, and any patching of the latents)."""
        return 1

    # --- the network ------------------------------------------------------------------------------------------------
    def denoiser(self, model: nn.Module) -> Denoiser:
        """``model`` (the pipeline's network or a copy of it) as a Denoiser on the pipeline's schedule, called the
        family's way."""
        return Denoiser(model, self.pipe.scheduler, call=self.call, guidance_input=self.guidance_input)

    @staticmethod
    def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        """The network's raw output at (x, t) for ``cond`` (``kwargs``: more keyword arguments of the network)."""
        raise NotImplementedError

    @classmethod
    def call(cls, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, features: bool = False):
        """The network's raw output, or with ``features`` ``(output, features)``: the output of the network's
        :meth:`feature_block` as a (B, C, h, w) map (:meth:`feature_map`), for GAN heads."""
        if not features:
            return cls.forward(model, x, t, cond)
        seen: list[Any] = []
        # Held for this one call only: the features are this call's value, whatever else calls the block.
        handle = cls.feature_block(model).register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            out = cls.forward(model, x, t, cond)
        finally:
            handle.remove()
        return out, cls.feature_map(model, seen[0], x)

    @staticmethod
    def feature_block(model: nn.Module) -> nn.Module:
        """The block whose output are the network's GAN features (a UNet's bottleneck, a middle transformer block)."""
        block = getattr(model, "mid_block", None)
        if block is None:
            raise ConfigError(f"a {type(model).__name__} has no block stepdistill takes GAN features from")
        return block

    @staticmethod
    def feature_map(model: nn.Module, block_output: Any, x: torch.Tensor) -> torch.Tensor:
        """The feature block's output as a (B, C, h, w) map."""
        return block_output[0] if isinstance(block_output, tuple) else block_output

    @staticmethod
    def feature_channels(model: nn.Module) -> int:
        """Channels C of :meth:`feature_map`."""
        return int(model.config.block_out_channels[-1])

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Frozen parts of the pipeline a method keeps beside the network (VAE, text encoders), by pipeline name."""
        return {}

    # --- a guidance-scale input (full LCM students) ------------------------------------------------------------------
    @staticmethod
    def guidance_embedding_dim(network: nn.Module) -> int | None:
        """The width of the network's guidance-scale embedding input: None when the network class has no such input,
        0 when it has one that is switched off."""
        return None

    @staticmethod
    def with_guidance_embedding(network: nn.Module, dim: int) -> nn.Module:
        """A copy of ``network`` that also takes a ``dim``-wide guidance-scale embedding, starting as ``network``."""
        raise ConfigError(f"a {type(network).__name__} takes no guidance-scale embedding")

    @staticmethod
    def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
        """The (B, dim) embedding of per-sample guidance scales ``w`` that the network's guidance input takes."""
        raise NotImplementedError

    def attention_blocks(self, network: nn.Module) -> dict[str, nn.Module]:
        """The attention blocks guidance adapters go on, by module name: every diffusers attention block (a module
        with a swappable ``processor``); networks with cross-attention only their cross-attention blocks."""
        found = {name: m for name, m in network.named_modules()
                 if hasattr(m, "set_processor") and hasattr(m, "processor")}
        cross = {k: m for k, m in found.items() if getattr(m, "is_cross_attention", False)}
        return cross or found

    # --- conditioning -----------------------------------------------------------------------------------------------
    def prompt_cond(self, prompts: list[str], device: torch.device | None = None) -> tuple[Cond, Cond]:
        """(cond, uncond) for ``prompts``, as the pipeline itself conditions at sampling time."""
        if self.classes is not None:
            raise ConfigError(f"teacher '{self.source}' is class-conditional: it takes class labels, not prompts")
        cond, uncond = self.prompts(list(prompts))
        return cond.to(device), uncond.to(device)

    def _encode_prompts(self, prompts: list[str]) -> tuple[Cond, Cond]:
        raise ConfigError(f"teacher '{self.source}' ({type(self.pipe).__name__}) takes no prompts")

    def null_cond(self, n: int, device: torch.device | None = None) -> Cond:
        """An unconditional input for ``n`` samples (shape checks of another network)."""
        return self.classes.uncond(n, device) if self.classes is not None else self.prompt_cond([""] * n, device)[1]

    def batch(self, raw: dict[str, Any], cond: bool, real: bool, device: torch.device | None = None) -> Batch:
        """The typed batch of collated data items ``raw``: labels (the data's, or drawn uniformly when it has none)
        or prompts, with ``cond`` their (cond, uncond), with ``real`` their images in the network's space."""
        b = Batch.items(raw)
        if any(k.startswith("cond.") for k in raw):  # conditioning stored with the data (trajectory folders)
            b.cond = cond_from_tensors(raw).to(device)
            return b
        if self.classes is not None:
            if b.labels is not None:
                b.labels = b.labels.to(device)
                if b.labels.numel() and int(b.labels.max()) >= self.classes.num_classes:
                    raise ConfigError(f"data labels go up to {int(b.labels.max())} but the teacher has "
                                      f"{self.classes.num_classes} classes: use a matching data.source")
            elif cond:
                b.labels = torch.randint(0, self.classes.num_classes, (b.size,), device=device)
            if cond:
                b.cond, b.uncond = self.classes.cond(b.labels), self.classes.uncond(b.size, device)
        elif cond:
            if self.kind == "none":
                raise ConfigError(f"teacher '{self.source}' ({type(self.pipe).__name__}) is unconditional: this "
                                  "method needs a class-conditional or text-to-image teacher")
            if b.prompts is None:
                raise ConfigError("a text teacher needs prompts: set data.source to a prompt file or captioned images")
            b.cond, b.uncond = self.prompt_cond(b.prompts, device)
        if real:
            if "image" not in raw:
                raise ConfigError(f"this method {IMAGES_NEEDED}")
            b.real = self.to_latents(raw["image"].to(device))
        return b

    # --- the network's space ----------------------------------------------------------------------------------------
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the network's input space (identity for pixel-space families)."""
        return images

    def noise_shape(self, n: int, resolution: int | None = None) -> tuple[int, ...]:
        """Shape of n noise samples for images of side ``resolution`` (default: the family's)."""
        raise NotImplementedError

    def sampler_timesteps(self, steps: int) -> torch.Tensor:
        """The network timesteps of the pipeline's own ``steps``-step sampler at the family's resolution."""
        self.pipe.scheduler.set_timesteps(steps, device="cpu")
        return self.pipe.scheduler.timesteps

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

    # --- sampling ---------------------------------------------------------------------------------------------------
    def schedule_kwargs(self, timesteps: list[int], num_train_timesteps: int) -> dict:
        """How the exported pipeline is asked for an explicit schedule: ``timesteps=`` or ``sigmas=``."""
        if self.schedule_keyword == "sigmas":
            return {"sigmas": [t / num_train_timesteps for t in timesteps]}
        return {"timesteps": [int(t) for t in timesteps]}

    def sample(self, pipe: Any, conditions: list, generators: list[torch.Generator], guidance_scale: float = 1.0,
               **kwargs) -> np.ndarray:
        """uint8 NHWC samples of ``pipe`` (this family's pipeline, or one of our wrappers around it) for
        ``conditions`` (class labels or prompts; for unconditional pipelines only their number counts), one
        generator per sample; ``kwargs`` go to the pipeline (schedule, ``latents``, ...)."""
        out = pipe(prompt=list(conditions), guidance_scale=guidance_scale, generator=generators, output_type="np",
                   height=self.resolution, width=self.resolution, **kwargs)
        return float_to_uint8(out.images)

    def no_cfg_kwargs(self) -> dict:
        """Arguments that switch the pipeline's own CFG off (one network call per step)."""
        kwargs = {"guidance_scale": 1.0} if takes_keyword(self.pipe.__call__, "guidance_scale") else {}
        if takes_keyword(self.pipe.__call__, "true_cfg_scale"):  # FluxPipeline's two-pass CFG
            kwargs["true_cfg_scale"] = 1.0
        return kwargs

    def usage(self, folder: str, call: str, base: str | None = None, lora: bool = False) -> str:
        """Python lines that load the export ``folder`` and sample it with ``call`` (the keyword arguments)."""
        cls = type(self.pipe).__name__
        if lora:
            return (f"pipe = {cls}.from_pretrained(\"{base}\")\npipe.load_lora_weights(\"{folder}\")\n"
                    f"pipe.scheduler = type(pipe.scheduler).from_pretrained(\"{folder}\", subfolder=\"scheduler\")\n"
                    f"images = pipe([\"a photo of a cat\"], {call}).images")
        return f"pipe = {cls}.from_pretrained(\"{folder}\")\nimages = pipe([\"a photo of a cat\"], {call}).images"

    # --- export -----------------------------------------------------------------------------------------------------
    def export_pipeline(self, network: nn.Module, scheduler: Any, originals: bool = False) -> Any:
        """The pipeline's class around ``network`` and ``scheduler``.

        Every other component is shared with this pipeline, or, with ``originals``, taken from a fresh load of it (the
        frozen parts as published, not the copies a run keeps in ``train.teacher_dtype``).
        """
        base = load_diffusers_pipeline(self.source) if originals else self.pipe
        return rebuild_pipeline(base, **{self.network_attr: network, "scheduler": scheduler})

    # --- LoRA -------------------------------------------------------------------------------------------------------
    def save_lora(self, network: nn.Module, out_dir: Path, lora_config, base: str, fingerprint: str) -> Path:
        """Write ``network``'s LoRA adapters as ``pytorch_lora_weights.safetensors`` that this family's pipeline
        loads with ``load_lora_weights``, recording the base (name, weight fingerprint, pipeline class)."""
        state, meta = L.adapter_state(network, lora_config)
        # peft's keys as they are (diffusers' LCM-LoRA script does the same): convert_state_dict_to_diffusers would
        # rewrite only the attention keys to the old "lora.down/up" names, which the peft-based loader then drops
        # (caught by tests/test_consistency.py::test_sd_lora_file_reproduces_the_student).
        type(self.pipe).save_lora_weights(
            save_directory=str(out_dir), safe_serialization=True,
            **{f"{self.network_attr}_lora_layers": state, f"{self.network_attr}_lora_adapter_metadata": meta})
        return L.record_base(out_dir, base, fingerprint, type(self.pipe).__name__)

    def load_lora(self, path: str | Path, fuse: bool = True) -> Any:
        """Load a LoRA export into this family's pipeline (every key and shape checked against the network first; a
        mismatch is a one-line UserError) and return the pipeline."""
        state, meta = L.read_lora_file(path)
        L.check_base(self.pipe, self.network, path)
        if meta is not None:
            raise UserError(f"'{L.lora_file(path)}' is a LoRA for a class-conditional {meta.get('network')}; it "
                            f"cannot be loaded into a {type(self.pipe).__name__}")
        prefix = f"{self.network_attr}."
        peft_keys = {}
        for k, v in state.items():
            if k.startswith(prefix):
                k = k[len(prefix):].replace(".lora.down.weight", ".lora_A.weight")
                peft_keys[k.replace(".lora.up.weight", ".lora_B.weight")] = v
        if not peft_keys:
            raise UserError(f"'{L.lora_file(path)}' holds no LoRA weights of a {self.network_attr} (keys start "
                            f"with '{prefix}')")
        L.check_shapes(self.network, peft_keys)
        f = L.lora_file(path)
        self.pipe.load_lora_weights(str(f.parent), weight_name=f.name)
        return self.pipe


class LatentFamily(Family):
    """Latent-space pipelines with a VAE and text encoders (what SD1.x/2.x, SDXL, SD3 and Flux share)."""

    # The frozen parts a method keeps beside the network, by pipeline attribute (absent ones are skipped).
    frozen_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")

    def default_resolution(self) -> int:
        size = getattr(self.pipe, "default_sample_size", None) or self.network.config.sample_size
        return int(size) * self.pipe.vae_scale_factor

    def resolution_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor)

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

    def noise_shape(self, n: int, resolution: int | None = None) -> tuple[int, ...]:
        side = (resolution or self.resolution) // self.pipe.vae_scale_factor
        return (n, self.network.config.in_channels, side, side)

    def _encoder_device(self) -> torch.device:
        return next(self.pipe.text_encoder.parameters()).device


def token_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h * w, C) image tokens in raster order -> a (B, C, h, w) feature map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def transformer_width(model: nn.Module) -> int:
    """The token width of a diffusers DiT-type transformer (heads x head dimension)."""
    return int(model.config.num_attention_heads * model.config.attention_head_dim)


def takes_keyword(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes a keyword argument ``name``."""
    return name in inspect.signature(fn).parameters

