"""Class-conditional pixel-space ``UNet2DModel`` pipelines (our ``ClassConditionalPipeline``, e.g. the digits16
teacher), and unconditional pixel pipelines (diffusers' ``DDIMPipeline`` / ``DDPMPipeline``, e.g. a teacher trained
with ``num_classes: 0``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMPipeline, DDPMPipeline
from torch import nn

from stepdistill.conditioning import ClassConditioning, Cond
from stepdistill.errors import UserError
from stepdistill.images import float_to_uint8

from .. import lora as L
from ..class_conditional import ClassConditionalPipeline
from .base import Family


class PixelFamily(Family):
    """What the pixel-space UNet2DModel pipelines share: the network is called on pixels, the noise has the
    network's sample size."""

    def default_resolution(self) -> int:
        size = self.network.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def check_resolution(self, resolution: int) -> None:
        if resolution != self.default_resolution():
            raise UserError(f"resolution {resolution}: a pixel-space {type(self.pipe).__name__} makes images of its "
                            f"network's size only, {self.default_resolution()}")

    def noise_shape(self, n: int, resolution: int | None = None) -> tuple[int, ...]:
        cfg = self.network.config
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (n, cfg.in_channels, *size)


class ClassFamily(PixelFamily):
    """Class-conditional pixel-space ``UNet2DModel`` (our ``ClassConditionalPipeline``): class labels with a null class
    for CFG."""

    name = "class-conditional pixel UNet (ClassConditionalPipeline)"

    def __init__(self, pipe: Any, source: str, prompt_cache_bytes: int = 1 << 30, resolution: int | None = None):
        super().__init__(pipe, source, prompt_cache_bytes, resolution)
        self.classes = ClassConditioning(pipe.num_classes)

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        return isinstance(pipe, ClassConditionalPipeline)

    @staticmethod
    def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        return model(x, t, class_labels=cond.class_labels, **kwargs).sample

    def sample(self, pipe: Any, conditions: list, generators: list[torch.Generator], guidance_scale: float = 1.0,
               **kwargs) -> np.ndarray:
        out = pipe(torch.as_tensor(conditions), guidance_scale=guidance_scale, generator=generators,
                   output_type="np", **kwargs)
        return float_to_uint8(out.images)

    def usage(self, folder: str, call: str, base: str | None = None, lora: bool = False) -> str:
        text = (f"pipe = load_pipeline(\"{folder}\")  # from stepdistill.pipelines\n"
                f"images = pipe(class_labels=[0, 1, 2], {call}).images")
        if lora:
            text += (f"\n# or the LoRA on the teacher:\nteacher = load_pipeline(\"{base}\")\n"
                     f"teacher.load_lora_weights(\"{folder}\")\nteacher.scheduler = "
                     f"type(pipe.scheduler).from_pretrained(\"{folder}\", subfolder=\"scheduler\")")
        return text

    # No diffusers LoRA loader exists for UNet2DModel: the adapters go into a file of our own format, which
    # ClassConditionalPipeline.load_lora_weights reads back (every key and shape checked first).
    def save_lora(self, network: nn.Module, out_dir: Path, lora_config, base: str, fingerprint: str) -> Path:
        L.save_class_lora(network, out_dir, lora_config)
        return L.record_base(out_dir, base, fingerprint, type(self.pipe).__name__)

    def load_lora(self, path: str | Path, fuse: bool = True) -> Any:
        L.load_class_lora(self.pipe, self.network, path, fuse)
        return self.pipe


class UnconditionalFamily(PixelFamily):
    """Unconditional pixel-space ``UNet2DModel`` pipelines (``DDIMPipeline`` / ``DDPMPipeline``): sampled and
    evaluated; the distillation methods need a conditional teacher."""

    name = "unconditional pixel UNet (DDIMPipeline / DDPMPipeline)"

    @classmethod
    def accepts(cls, pipe: Any) -> bool:
        return isinstance(pipe, (DDIMPipeline, DDPMPipeline))

    @property
    def kind(self) -> str:
        return "none"

    @staticmethod
    def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        return model(x, t, **kwargs).sample

    def sample(self, pipe: Any, conditions: list, generators: list[torch.Generator], guidance_scale: float = 1.0,
               **kwargs) -> np.ndarray:
        return float_to_uint8(pipe(batch_size=len(conditions), generator=generators, output_type="np",
                                   **kwargs).images)
