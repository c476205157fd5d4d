"""Conditioning: class labels with a null class, text prompts through a pipeline's text encoder (cached)."""

from __future__ import annotations

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
    """

    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    pooled_projections: torch.Tensor | None = None
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    timestep_cond: torch.Tensor | None = None

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


class TextConditioning:
    """Prompts -> ``Cond(encoder_hidden_states=...)`` through a pipeline's tokenizer and text encoder.

    Embeddings are cached per prompt (data-free methods see the same prompts many times; the encoder is frozen).
    Designed for one CLIP/T5-style encoder (SD1.x/2.x); SDXL/SD3-type pipelines with two or three encoders plug in
    by subclassing :meth:`_encode`.
    """

    def __init__(self, tokenizer, text_encoder, cache: bool = True, max_cache: int = 100_000):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None
        self.max_cache = max_cache

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(device))[0]

    def embed(self, prompts: list[str]) -> torch.Tensor:
        if self.cache is None:
            return self._encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            enc = self._encode(missing)
            if len(self.cache) + len(missing) > self.max_cache:
                self.cache.clear()
            for p, e in zip(missing, enc):
                self.cache[p] = e
        return torch.stack([self.cache[p] for p in prompts])

    def cond(self, prompts: list[str]) -> Cond:
        return Cond(encoder_hidden_states=self.embed(list(prompts)))

    def uncond(self, batch_size: int, device=None) -> Cond:
        return Cond(encoder_hidden_states=self.embed([""] * batch_size))


def sample_guidance_scale(batch_size: int, low: float, high: float, generator: torch.Generator | None = None,
                          device=None) -> torch.Tensor:
    """Per-sample guidance scales w ~ U[low, high] (standard CFG convention)."""
    return low + (high - low) * torch.rand(batch_size, generator=generator, device=device)
