"""Trainable networks from a teacher: a student initialised from another pipeline's network of the same
architecture."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from stepdistill.errors import ConfigError, UserError, first_line
from stepdistill.pipelines.folders import resolve_pipeline_path

# Config keys that do not change a network's computation (bookkeeping written by diffusers).
_NON_ARCH_KEYS = {"_name_or_path", "_diffusers_version", "_class_name", "_use_default_values"}


def init_student_weights(student: nn.Module, source: str, key: str, subfolder: str = "unet") -> None:
    """Copy the denoising network of pipeline ``source`` (alias, folder or hub id) into ``student``.

    Only the network's subfolder (the family's ``network_attr``) is loaded. The source must have the student's
    architecture (same config, same tensors); a LoRA export or a guidance-conditioned LCM student gets its own
    one-line error.
    """
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
