"""The typed batch a method's loss takes: the items' conditioning and, where a phase asks for them, their real
images in the networks' space. The loop builds it from the data through the teacher's model family
(:meth:`stepdistill.pipelines.families.Family.batch`), so a method never decodes, encodes or checks raw items."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .conditioning import Cond


@dataclass
class Batch:
    """One micro-batch.

    Args:
        size: the number of items.
        labels: (B,) long class labels (a class-conditional teacher): the data's, or drawn uniformly when the data has
            none; None for text teachers.
        prompts: the items' prompts (text teachers); None otherwise.
        cond, uncond: the items' conditioning and its unconditional counterpart, as the teacher's pipeline conditions
            at sampling time; None when the phase did not ask for them.
        real: the items' images in the networks' space (pixels, or VAE latents), (B, ...); None when the phase did
            not ask for them.
        tensors: the items' other tensors (e.g. the states ``x_t``, ``t``, ``w``, ``target`` of a trajectory folder).
    """

    size: int
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    cond: Cond | None = None
    uncond: Cond | None = None
    real: torch.Tensor | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def items(raw: dict[str, Any]) -> Batch:
        """The labels, prompts and other tensors of a collated batch of data items, nothing encoded."""
        prompts = list(raw["prompt"]) if "prompt" in raw else None
        labels = torch.as_tensor(raw["label"]).long() if "label" in raw else None
        lengths = [len(v) for k, v in raw.items() if k in ("image", "label", "prompt") or torch.is_tensor(v)]
        tensors = {k: v for k, v in raw.items() if torch.is_tensor(v) and k not in ("image", "label")
                   and not k.startswith("cond.")}
        return Batch(size=lengths[0] if lengths else 0, labels=labels, prompts=prompts, tensors=tensors)
