"""A class-conditional pixel-space pipeline (stock diffusers has none that takes class labels + CFG for
UNet2DModel). Runs any diffusers scheduler; saves and loads with the usual diffusers round trip.

``save_pretrained`` also writes this file into the folder as ``pipeline.py``, so stock diffusers loads the folder
without stepdistill installed: ``DiffusionPipeline.from_pretrained(path, custom_pipeline=path,
trust_remote_code=True)``. The file must therefore stay self-contained (diffusers, numpy and torch only).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalPipeline(DiffusionPipeline):
    r"""Pipeline for class-conditional image generation with a ``UNet2DModel`` (``num_class_embeds`` set).

    The last class embedding (index ``num_class_embeds - 1``) is the null class used for classifier-free guidance,
    ``uncond + w * (cond - uncond)`` with ``w = guidance_scale`` (w = 1: no guidance, one network call per step).

    Args:
        unet ([`UNet2DModel`]): the class-conditional denoiser.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler matching the UNet's training schedule.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def num_classes(self) -> int:
        return self.null_class

    def load_lora_weights(self, path: str, fuse: bool = True) -> None:
        r"""Load a stepdistill LoRA export (``pytorch_lora_weights.safetensors`` or its folder) into the UNet.

        Every key and shape is checked against this UNet first; a LoRA of another network is a ``UserError``.

        Args:
            path: the export folder or the file.
            fuse: merge the adapters into the weights (the UNet stays a plain ``UNet2DModel``).
        """
        import importlib

        # Looked up at call time: a top-level import would make this file (shipped as pipeline.py) need stepdistill.
        importlib.import_module("stepdistill.pipelines.lora").load_class_lora(self, self.unet, path, fuse=fuse)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained``, plus this file as ``pipeline.py`` (loadable as a custom pipeline)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(__file__, Path(save_directory) / "pipeline.py")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        timesteps: list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per entry of ``class_labels``.

        Args:
            class_labels: class index per image, in ``[0, num_classes)``.
            num_inference_steps: sampler steps (ignored if ``timesteps`` is given).
            guidance_scale: CFG scale w in the standard convention (1 = off).
            generator: one generator, or one per image (then every image is independent of the batch size).
            timesteps: explicit descending timesteps, for schedulers that accept them (e.g. ``LCMScheduler``).
            output_type: "pil", "np" (float NHWC in [0, 1]) or "pt" (NCHW in [-1, 1]).
            latents: the starting point (N, C, H, W) at the first timestep instead of fresh noise, as diffusers
                pipelines take it (e.g. a teacher's intermediate sample for diversity distillation).
        """
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        device, dtype = self._execution_device, self.unet.dtype
        labels = labels.to(device)
        n = labels.shape[0]
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (n, self.unet.config.in_channels, *size)
        if latents is None:
            x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            x = latents.to(device=device, dtype=dtype)
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=list(timesteps), device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        use_cfg = guidance_scale != 1.0
        null = torch.full_like(labels, self.null_class)
        for t in self.progress_bar(self.scheduler.timesteps):
            # Flow-matching schedulers have no input scaling.
            model_in = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
            if use_cfg:
                out = self.unet(torch.cat([model_in, model_in]), t, class_labels=torch.cat([null, labels])).sample
                out_u, out_c = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            else:
                out = self.unet(model_in, t, class_labels=labels).sample
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        # LCM-type schedulers return the denoised sample of the last step as prev_sample already.
        if output_type == "pt":
            images = x.clamp(-1, 1)
        else:
            images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
