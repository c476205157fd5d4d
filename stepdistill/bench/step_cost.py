"""The cost of one training step of several recipes, measured side by side in one process on the same batch.

A step is every phase's loss and backward pass, each phase weighted by how often it runs (``1 / every``), without the
optimizer update (the same for methods with the same trainable networks); recipes are measured in turn within each
repeat (interleaved), and each recipe's median over the repeats is reported with its ratio to the first recipe's.
"""

from __future__ import annotations

import statistics
import time

import torch

from stepdistill.data import load_digits16
from stepdistill.loop import build_method
from stepdistill.trainers import load_config


def step_cost(recipes: list[tuple[str, str, list[str]]], overrides: list[str] | None = None, repeats: int = 5,
              warmup: int = 1) -> list[dict]:
    """Median seconds per training step of each ``(label, recipe, its overrides)`` (a recipe name or file, with
    ``overrides`` then its own) on the first digits16 images, as many as the first recipe's batch size, and the ratio
    to the first; step draws seeded alike for every recipe. Returns ``[{"name", "seconds", "ratio", "phases"}]``."""
    methods, batch_size = [], None
    for label, recipe, own in recipes:
        cfg = load_config(recipe, [*(overrides or []), *own])
        batch_size = batch_size or cfg.data.batch_size
        torch.manual_seed(0)
        methods.append((label, build_method(cfg)))
    images, labels = load_digits16()
    raw = {"image": torch.as_tensor(images[:batch_size]), "label": torch.as_tensor(labels[:batch_size])}
    times: dict[str, list[float]] = {label: [] for label, _ in methods}
    for r in range(warmup + repeats):
        for label, method in methods:
            total = 0.0
            for phase in method.phases():
                batch = method.family.batch(raw, cond=phase.cond, real=phase.real, device=method.device)
                torch.manual_seed(r)
                t = time.perf_counter()
                loss, _ = method.loss(phase.name, batch, step=10_000)
                loss.backward()
                total += (time.perf_counter() - t) / phase.every
                method.zero_grad(set_to_none=True)
            if r >= warmup:
                times[label].append(total)
    first = statistics.median(times[methods[0][0]])
    return [{"name": label, "seconds": statistics.median(times[label]),
             "ratio": statistics.median(times[label]) / first,
             "phases": ", ".join(f"{p.name} every {p.every}" for p in method.phases())} for label, method in methods]


def step_cost_table(rows: list[dict]) -> str:
    lines = ["| recipe | phases | s / step (median) | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['phases']} | {r['seconds']:.3f} | {r['ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)
