"""Conditioning: what a network is conditioned on (:class:`Cond`), class labels with a null class, and a bounded
cache of per-prompt embeddings (the encoding itself is the model family's: :mod:`stepdistill.pipelines.families`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Cond:
    """Everything a denoiser network is conditioned on besides (x_t, t). Unused fields stay None.

    Args:
        class_labels: (B,) long, for class-conditional UNet2DModel / DiT.
        encoder_hidden_states: (B, L, D) text embeddings for UNet2DConditionModel and transformers.
        pooled_projections: (B, D) pooled text embedding (SD3/Flux-type transformers).
        added_cond_kwargs: extra UNet inputs (SDXL ``text_embeds`` / ``time_ids``), each (B, ...).
        timestep_cond: (B, D) extra time-like embedding (LCM's guidance-scale embedding).
        guidance: (B,) guidance scale given to a guidance-distilled network as an input (Flux-dev's ``guidance``).
    """

    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    pooled_projections: torch.Tensor | None = None
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    timestep_cond: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def _map(self, fn) -> Cond:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif isinstance(v, dict):
                out[f.name] = {k: fn(t) for k, t in v.items()}
            else:
                out[f.name] = fn(v)
        return Cond(**out)

    def to(self, device=None, dtype=None) -> Cond:
        """Move tensors; ``dtype`` applies to floating tensors only (labels stay long)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def index(self, idx) -> Cond:
        return self._map(lambda t: t[idx])

    def repeat(self, n: int) -> Cond:
        """Concatenate the batch with itself n times."""
        return self._map(lambda t: torch.cat([t] * n))

    @staticmethod
    def cat(a: Cond, b: Cond) -> Cond:
        """Batch-concatenate two conditionings with the same fields set."""
        out = {}
        for f in fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if (va is None) != (vb is None):
                raise ValueError(f"cannot concatenate conditionings: '{f.name}' set in one only")
            if va is None:
                out[f.name] = None
            elif isinstance(va, dict):
                out[f.name] = {k: torch.cat([va[k], vb[k]]) for k in va}
            else:
                out[f.name] = torch.cat([va, vb])
        return Cond(**out)

    def with_timestep_cond(self, timestep_cond: torch.Tensor | None) -> Cond:
        return replace(self, timestep_cond=timestep_cond)

    @staticmethod
    def concat(items: list[Cond]) -> Cond:
        """Batch-concatenate several conditionings with the same fields set."""
        out = items[0]
        for c in items[1:]:
            out = Cond.cat(out, c)
        return out

    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        total = 0
        for f in fields(self):
            v = getattr(self, f.name)
            for t in (v.values() if isinstance(v, dict) else [v] if v is not None else []):
                total += t.numel() * t.element_size()
        return total


class ClassConditioning:
    """Class labels 0..num_classes-1 plus a null class (index num_classes) used for CFG dropout and uncond."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.null_class = num_classes

    def cond(self, labels: torch.Tensor) -> Cond:
        return Cond(class_labels=labels.long())

    def uncond(self, batch_size: int, device=None) -> Cond:
        return Cond(class_labels=torch.full((batch_size,), self.null_class, dtype=torch.long, device=device))

    def drop(self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability p (CFG training dropout)."""
        if p <= 0:
            return labels
        mask = torch.rand(labels.shape, generator=generator, device=labels.device) < p
        return torch.where(mask, torch.full_like(labels, self.null_class), labels)


class PromptCache:
    """Per-prompt (cond, uncond) embeddings, computed by ``encode`` and kept on the CPU, at most ``max_bytes`` of
    them (the least recently used prompts leave first; 0 = no cache). Frozen text encoders see the same prompts
    again and again (data-free methods, small caption sets); an SD1.5 embedding is ~236 KB, an SDXL one ~600 KB.

    Args:
        encode: prompts -> (cond, uncond) for the whole list, batched.
        max_bytes: the bound.
    """

    def __init__(self, encode: Callable[[list[str]], tuple[Cond, Cond]], max_bytes: int = 1 << 30):
        self.encode, self.max_bytes = encode, max_bytes
        self.entries: OrderedDict[str, tuple[Cond, Cond]] = OrderedDict()
        self.nbytes = 0

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[Cond, Cond]:
        if self.max_bytes <= 0:
            return self.encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.entries))
        found: dict[str, tuple[Cond, Cond]] = {}
        if missing:
            cond, uncond = self.encode(missing)
            for i, p in enumerate(missing):
                # clone: a CPU view would keep the whole encoded batch alive beyond the byte bound.
                found[p] = (cond.index(slice(i, i + 1)).to("cpu")._map(torch.clone),
                            uncond.index(slice(i, i + 1)).to("cpu")._map(torch.clone))
        rows = [found.get(p) or self.entries[p] for p in prompts]
        for p, entry in found.items():
            self.entries[p] = entry
            self.nbytes += entry[0].nbytes() + entry[1].nbytes()
        for p in prompts:
            if p in self.entries:
                self.entries.move_to_end(p)
        while self.nbytes > self.max_bytes and self.entries:
            _, (c, u) = self.entries.popitem(last=False)
            self.nbytes -= c.nbytes() + u.nbytes()
        return Cond.concat([r[0] for r in rows]), Cond.concat([r[1] for r in rows])


def sample_guidance_scale(batch_size: int, low: float, high: float, generator: torch.Generator | None = None,
                          device=None) -> torch.Tensor:
    """Per-sample guidance scales w ~ U[low, high] (standard CFG convention)."""
    return low + (high - low) * torch.rand(batch_size, generator=generator, device=device)
