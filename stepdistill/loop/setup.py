"""Building a method for a run: the teacher loaded with its model family, the data described, the setup handed to the
method with the method's own config, the frozen parts cast to ``train.teacher_dtype``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from stepdistill.config import DataConfig, RunConfig
from stepdistill.data import PromptFile, build_dataset, dataset_has_images, dataset_max_label, dataset_prompts
from stepdistill.denoiser import Denoiser
from stepdistill.errors import ConfigError, UserError
from stepdistill.pipelines import family_of
from stepdistill.pipelines.families import Family
from stepdistill.pipelines.folders import load_diffusers_pipeline
from stepdistill.trainers import get_method
from stepdistill.trainers.base import DataInfo, Method, Setup, World
from stepdistill.trajectories import TrajectoryDataset


def open_dataset(dc: DataConfig) -> Dataset:
    """The run's data set (nothing decoded yet)."""
    return build_dataset(dc.source, dc.resolution, dc.center_crop, dc.random_flip, dc.image_column,
                         dc.caption_column)


def data_info(dataset: Dataset, source: str) -> DataInfo:
    """What a method may know of the data: whether its items carry images, its prompts, a trajectory header."""
    traj = dataset if isinstance(dataset, TrajectoryDataset) else None
    prompts = dataset_prompts(dataset)
    if traj is not None and traj.spec.prompts and Path(traj.spec.prompts).is_file():
        prompts = PromptFile(traj.spec.prompts).prompts
    return DataInfo(source=source, has_images=dataset_has_images(dataset), prompts=prompts,
                    trajectories=traj.spec if traj else None, state_shape=traj.state_shape if traj else None)


def check_labels(dataset: Dataset, family: Family, source: str) -> None:
    """A ConfigError when the data's class labels go beyond the teacher's classes (told before training: the digits'
    labels array, or the trajectory shards' small label tensors)."""
    if family.classes is None:
        return
    top = dataset.max_class_label() if isinstance(dataset, TrajectoryDataset) else dataset_max_label(dataset)
    if top is not None and top >= family.classes.num_classes:
        raise ConfigError(f"data labels of '{source}' go up to {top} but the teacher has {family.classes.num_classes} "
                          "classes: use a matching data.source")


def load_teacher(cfg: RunConfig, who: str) -> tuple[Family, Denoiser]:
    """The teacher's model family and its network as a frozen Denoiser; ``who`` names the method in errors."""
    pipe = load_diffusers_pipeline(cfg.teacher)
    family = family_of(pipe, cfg.teacher, resolution=cfg.data.resolution,
                       prompt_cache_bytes=cfg.data.prompt_cache_mb << 20)
    if family.kind == "none":
        raise ConfigError(f"teacher '{cfg.teacher}' is an unconditional {type(pipe).__name__}: distillation needs a "
                          "class-conditional or text-to-image teacher")
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or "num_train_timesteps" not in dict(getattr(scheduler, "config", {})):
        raise ConfigError(f"teacher '{cfg.teacher}' has no usable scheduler config (num_train_timesteps, "
                          f"beta_schedule); {who} reads the noise schedule from it")
    try:
        teacher = family.denoiser(family.network.requires_grad_(False))
    except UserError as e:
        raise ConfigError(f"teacher '{cfg.teacher}': {e}") from None
    for m in family.frozen_modules().values():
        m.requires_grad_(False).eval()
    return family, teacher


def cast_frozen(setup: Setup, dtype_name: str) -> None:
    """Store the frozen parts (the teacher network's frozen weights, VAE, text encoders) in ``train.teacher_dtype``;
    trainable parameters (LoRA adapters on the teacher network) keep float32."""
    dtype = getattr(torch, dtype_name)
    if dtype == torch.float32 or setup.teacher is None:
        return
    for module in (setup.teacher.model, *setup.family.frozen_modules().values()):
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    setup.teacher.compute_dtype = dtype


def build_method(cfg: RunConfig, world: World | None = None, dataset: Dataset | None = None) -> Method:
    """``cfg``'s method over its setup (teacher, family, world, data), with the frozen parts in
    ``train.teacher_dtype``. Call it with the same RNG state on every process: the trainable networks are built (and
    randomly initialised where they are new) from it."""
    method_cls = get_method(cfg.method)
    dataset = dataset if dataset is not None else open_dataset(cfg.data)
    family, teacher = load_teacher(cfg, cfg.method) if method_cls.needs_teacher else (None, None)
    if family is not None:
        check_labels(dataset, family, cfg.data.source)
    setup = Setup(family=family, teacher=teacher, teacher_name=cfg.teacher, world=world or World(),
                  data=data_info(dataset, cfg.data.source), max_steps=cfg.train.max_steps)
    method = method_cls(setup, cfg.method_args)
    cast_frozen(setup, cfg.train.teacher_dtype)
    return method
