"""The run folder: what to do with ``--out`` (start, resume, replace, continue as a new stage), decided read-only
before anything is written, and the logs a resumed run truncates to its checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from stepdistill.config import OptimConfig, RunConfig, to_dict
from stepdistill.errors import UserError
from stepdistill.trainers import get_method

from . import checkpoint as ckpt

# Config keys that may change between a run and its resumption: they change no value training computes.
# sample_timesteps only changes what the export records (older run folders do not have the key at all); the
# bookkeeping keys change when files are written, and writing a sample grid or a log line draws no training
# randomness (the RNGs are reseeded before every micro-batch).
RESUMABLE_CHANGES = {"train.max_steps", "method_args.sample_timesteps", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.log_every", "train.sample_every", "data.prompt_cache_mb",
                     "train.gradient_checkpointing"}
# A run may also continue as a new training stage (``--allow-changes``) with new learning rates (optim.PHASE.lr,
# applied to the restored LR schedulers) and new values of the keys its method lists in ``Method.stage_changes``
# (loss weights, noise ranges): no checkpointed tensor depends on them. The changes are appended to the run's
# config_changes.jsonl.
CHANGES_FILE = "config_changes.jsonl"
# What a run writes into its folder: all a failed start may hold for its rerun to replace it.
RUN_ENTRIES = {"config.yaml", CHANGES_FILE, "logs.jsonl", "checkpoints", "samples", "tensorboard"}
PROBE_PREFIX = ".stepdistill-probe-"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _as_saved(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A config object as flat dotted keys with the value types a saved config.yaml has: round-tripped through
    YAML (tuples -> lists, ...), so it compares equal to what was saved."""
    return flatten(yaml.safe_load(yaml.safe_dump(to_dict(obj), sort_keys=False)), prefix)


def _with_method_defaults(cfg: RunConfig, saved: dict) -> dict:
    """``saved`` (a config.yaml as flat dotted keys) with every key it lacks set to its default: the method's
    method_args and the run-level data / train keys.

    A run saved before a key existed resumes with that key's default, so a new key's default must reproduce the
    behaviour from before the key was added (as DMD2's ``timestep_sampling: uniform`` does).
    """
    run_defaults = {k: v for k, v in _as_saved(RunConfig()).items() if k.startswith(("data.", "train."))}
    return {**run_defaults, **_as_saved(get_method(cfg.method).Config(), "method_args"), **flatten(saved)}


def _config_diff(cfg: RunConfig, old: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of the keys that differ, ignoring :data:`RESUMABLE_CHANGES`; ``old`` is the
    saved config as :func:`_with_method_defaults` returns it."""
    new = _as_saved(cfg)
    # A phase without an optim section trains with OptimConfig's defaults: compare them, not "<unset>".
    optim_defaults = to_dict(OptimConfig())

    def value(d: dict, k: str) -> Any:
        parts = k.split(".")
        if k not in d and len(parts) == 3 and parts[0] == "optim" and parts[2] in optim_defaults:
            return optim_defaults[parts[2]]
        return d.get(k, "<unset>")

    return [
        (k, value(old, k), value(new, k))
        for k in sorted(set(new) | set(old))
        if k not in RESUMABLE_CHANGES and value(old, k) != value(new, k)
    ]


def shown(diff: list[tuple[str, Any, Any]]) -> str:
    text = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:3])
    return text + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")


def _stage_changeable(cfg: RunConfig, key: str) -> bool:
    """Whether ``key`` may take a new value when the run continues as a new stage (``--allow-changes``)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "optim" and parts[2] == "lr":
        return True
    return len(parts) == 2 and parts[0] == "method_args" and parts[1] in get_method(cfg.method).stage_changes


def plan_out_dir(cfg: RunConfig, out: Path, resume: bool, overwrite: bool,
                  allow_changes: bool = False) -> tuple[str, list[tuple[str, Any, Any]]]:
    """Decide (read-only) what to do with ``out``: "fresh", "resume" or "overwrite", and the config changes a
    resumed run continues with (only with ``allow_changes``); raise UserError on a conflict."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"output path '{out}' is a file, not a folder")
        _check_writable(out)
        if not out.exists() or not any(not p.name.startswith(PROBE_PREFIX) for p in out.iterdir()):
            return "fresh", []  # (another process's writability probe does not make a folder non-empty)
    except PermissionError as e:
        raise UserError(f"output folder '{out}' cannot be reached ({e.strerror}); choose another --out or fix the "
                        "permissions of its parent folders") from None
    if overwrite:
        return "overwrite", []
    cfg_file = out / "config.yaml"
    if not resume:
        raise UserError(f"output folder '{out}' already exists; pass --overwrite to replace it or --resume to "
                        "continue the run in it")
    if not cfg_file.is_file():
        raise UserError(f"output folder '{out}' already exists and holds no stepdistill run (no config.yaml); pass "
                        "--overwrite to replace it or choose another output folder")
    try:
        saved = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError:
        saved = {"<unreadable>": True}
    saved = _with_method_defaults(cfg, saved)
    diff = _config_diff(cfg, saved)
    if not diff:
        return "resume", []
    if not ckpt.list_checkpoints(out / "checkpoints") and {p.name for p in out.iterdir()} <= RUN_ENTRIES:
        # A start that failed before its first checkpoint (a bad value, a diverged loss): nothing trained is lost,
        # so the corrected rerun replaces it instead of being refused as a different run. Only a folder holding
        # nothing but a run's own files (no export, nothing of the user's) is replaced without --overwrite.
        return "restart", diff
    fixed = [d for d in diff if not _stage_changeable(cfg, d[0])]
    if fixed:
        raise UserError(f"output folder '{out}' holds a run with a different config ({shown(fixed)}); cannot "
                        "--resume it: pass --overwrite to replace it or choose another output folder")
    if not allow_changes:
        raise UserError(f"output folder '{out}' holds a run with a different config ({shown(diff)}); pass "
                        "--allow-changes to continue it with the new values from its last checkpoint, --overwrite "
                        "to replace it, or choose another output folder")
    saved_args = {k[len("method_args."):]: v for k, v in saved.items() if k.startswith("method_args.")}
    get_method(cfg.method).check_stage_change(saved_args, cfg.method_args,
                                              {name: oc.lr_schedule for name, oc in cfg.optim.items()})
    return "resume", diff


def _check_writable(out: Path) -> None:
    """A UserError unless ``out`` (or the folder it would be created in) accepts new files; probed by creating and
    removing an empty folder, since permission bits do not tell (root, read-only mounts)."""
    base = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not base.is_dir():
        raise UserError(f"cannot create output folder '{out}': '{base}' is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=base))
    except OSError as e:
        raise UserError(f"output folder '{out}' cannot be written ({e.strerror} in '{base}'); choose another --out "
                        "or make it writable") from None


def truncate_logs(path: Path, last_step: int) -> None:
    """Drop log lines past ``last_step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    ckpt.write_text_atomic(path, "".join(s + "\n" for s in keep))


def write_log_line(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
