"""Pieces the distillation methods (dmd2, consistency) share: loading the frozen teacher with its model family, and
LoRA adapters on the teacher network that are switched off for the teacher's own predictions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from stepdistill.conditioning import ClassConditioning
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError, UserError, first_line
from stepdistill.families import Family, family_of


# --- the teacher ---------------------------------------------------------------------------------------------------
def load_teacher(run_config: Any, who: str) -> tuple[Family, Denoiser]:
    """The teacher's model family adapter and its network as a frozen Denoiser; ``who`` names the method in errors."""
    from stepdistill.pipelines import load_pipeline

    pipe = load_pipeline(run_config.teacher)
    family = family_of(pipe, run_config.teacher, resolution=run_config.data.resolution,
                       prompt_cache_bytes=run_config.data.prompt_cache_mb << 20)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or "num_train_timesteps" not in dict(getattr(scheduler, "config", {})):
        raise ConfigError(f"teacher '{run_config.teacher}' has no usable scheduler config (num_train_timesteps, "
                          f"beta_schedule); {who} reads the noise schedule from it")
    try:
        teacher = family.denoiser(family.network.requires_grad_(False))
    except UserError as e:
        raise ConfigError(f"teacher '{run_config.teacher}': {e}") from None
    for m in family.frozen_modules().values():
        m.requires_grad_(False).eval()
    return family, teacher


def cast_frozen(teacher: Denoiser, family: Family, dtype_name: str) -> None:
    """Store the frozen parts (the teacher network's frozen weights, VAE, text encoders) in ``train.teacher_dtype``;
    trainable parameters (LoRA adapters on the teacher network) keep float32."""
    dtype = getattr(torch, dtype_name)
    if dtype == torch.float32:
        return
    for module in (teacher.model, *family.frozen_modules().values()):
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    teacher.compute_dtype = dtype


# Config keys that do not change a network's computation (bookkeeping written by diffusers).
_NON_ARCH_KEYS = {"_name_or_path", "_diffusers_version", "_class_name", "_use_default_values"}


def init_student_weights(student: nn.Module, source: str, key: str, subfolder: str = "unet") -> None:
    """Copy the denoising network of pipeline ``source`` (alias, folder or hub id) into ``student``.

    Only the network's subfolder (the family's ``network_attr``) is loaded. The source must have the student's
    architecture (same config, same tensors); a LoRA export or a guidance-conditioned LCM student gets its own
    one-line error.
    """
    from pathlib import Path

    from stepdistill.pipelines import resolve_pipeline_path

    folder = Path(source)
    if folder.is_dir() and not (folder / "model_index.json").is_file() and any(folder.glob("*lora*.safetensors")):
        raise ConfigError(f"{key}: '{source}' is a LoRA export; initialise from a full student pipeline (or load the "
                          "LoRA into the teacher pipeline, fuse it and save that pipeline)")
    try:
        path = resolve_pipeline_path(source)
        other = type(student).from_pretrained(path, subfolder=subfolder)
    except UserError as e:
        raise ConfigError(f"{key}: {e}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load the {subfolder} of '{source}': {first_line(e)}") from None
    if other.config.get("time_cond_proj_dim") and not student.config.get("time_cond_proj_dim"):
        raise ConfigError(f"{key}: '{source}' is a guidance-conditioned student (time_cond_proj_dim="
                          f"{other.config['time_cond_proj_dim']}); initialise from one trained without a "
                          "w-embedding (method_args.w_embedding_dim=0)")
    mine, theirs = dict(student.config), dict(other.config)
    diff = sorted(k for k in set(mine) | set(theirs) if k not in _NON_ARCH_KEYS and mine.get(k) != theirs.get(k))
    sd_mine, sd_theirs = student.state_dict(), other.state_dict()
    bad = diff + [k for k in sd_mine if k not in sd_theirs or sd_theirs[k].shape != sd_mine[k].shape]
    bad += [k for k in sd_theirs if k not in sd_mine]
    if bad:
        raise ConfigError(f"{key}: the network of '{source}' does not match the teacher's architecture ({len(bad)} "
                          f"config entries / tensors differ, e.g. '{bad[0]}'); initialise from a student of the same "
                          "teacher")
    student.load_state_dict({k: v.to(sd_mine[k].dtype) for k, v in sd_theirs.items()})


def check_labels(labels: torch.Tensor, classes: ClassConditioning) -> None:
    """Reject data labels beyond the teacher's classes."""
    if labels.numel() and int(labels.max()) >= classes.num_classes:
        raise ConfigError(f"data labels go up to {int(labels.max())} but the teacher has {classes.num_classes} "
                          "classes: use a matching data.source")


# --- LoRA on the teacher network -----------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_max_rank(model: nn.Module, targets: Sequence[str]) -> int:
    """The smallest in/out dimension over the layers a LoRA with ``targets`` would adapt (0: none)."""
    dims = []
    for name, m in model.named_modules():
        if not _matches(name, targets):
            continue
        if isinstance(m, nn.Linear):
            dims += [m.in_features, m.out_features]
        elif isinstance(m, nn.Conv2d):
            dims += [m.in_channels, m.out_channels]
    return min(dims) if dims else 0


def add_lora(network: nn.Module, rank: int, alpha: float, targets: Sequence[str], key: str):
    """Add LoRA adapters (those of ``targets`` present in ``network``) and make them its only trainable parameters.

    ``key`` is the config key of ``rank``, named in the error when the rank exceeds a layer dimension. Returns the
    peft ``LoraConfig``; alpha 0 means alpha = rank (scale 1).
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in network.named_modules()]
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    max_rank = lora_max_rank(network, present)
    if rank > max_rank:
        raise ConfigError(f"{key}={rank} exceeds the smallest adapted layer dimension of the teacher network "
                          f"(max {max_rank})")
    # B = 0 at init: the adapted network starts as the teacher.
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=present, init_lora_weights=True)
    if hasattr(network, "add_adapter"):  # diffusers PeftAdapterMixin (UNet2DConditionModel, transformers)
        network.add_adapter(config)
    else:  # UNet2DModel has no adapter mixin: peft's own injection does the same
        inject_adapter_in_model(config, network)
    for n, p in network.named_parameters():
        p.requires_grad_("lora_" in n)
    return config


@contextmanager
def adapters(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Switch the LoRA adapters of ``model`` on or off for the block, and always back on after it.

    Back on because the adapter weights are a training phase's parameters, and peft freezes them while they are off.
    """
    for m in lora_layers(model):
        m.enable_adapters(enabled)
    try:
        yield
    finally:
        if not enabled:
            for m in lora_layers(model):
                m.enable_adapters(True)


def teacher_reference(teacher: str) -> str:
    """How an export records its teacher (``distilled_from`` in its scheduler config, a LoRA file's base): a local
    folder as an absolute path (the export may be used from another working directory), an alias or hub id as
    given."""
    from pathlib import Path

    return str(Path(teacher).resolve()) if Path(teacher).is_dir() else teacher
