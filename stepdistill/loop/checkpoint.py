"""Atomic, resumable checkpoints of the training loop.

A checkpoint is a folder ``checkpoints/step-N`` (N = completed loop steps) holding what
``accelerator.save_state`` writes (optimizers, LR schedulers, grad scaler, RNG states), the loop's own files (the
trained weights as ``model.safetensors``, the EMA as ``ema.safetensors``), a ``loop_state.json`` and, written last, a
``COMPLETE`` marker. Nothing in it is a pickle that resume would load unchecked: accelerate reads its ``.bin`` /
``.pkl`` files with ``torch.load(weights_only=True)``, and objects registered for checkpointing (which accelerate
reloads with ``weights_only=False``) are never used. It is written as
``checkpoints/.tmp-step-N`` and renamed into place only once complete, so a process killed at any moment leaves
either the previous checkpoints untouched or a ``.tmp-*`` folder that the next resume deletes. ``checkpoints/latest``
(a one-line text file, replaced atomically) names the newest checkpoint for people and tools; resume itself scans
for the highest complete ``step-N`` so that a crash between the rename and the pointer update loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stepdistill.errors import UserError, first_line
from stepdistill.inputs import Fields, check_tensors, read_json, safetensors_header, specs

COMPLETE_MARKER = "COMPLETE"
LOOP_STATE = "loop_state.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` completed loop steps."""
    return f"step-{step}"


def _fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename or a new file); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` so a rename after it never exposes half-written data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + ``os.replace`` so readers see the old or the new content."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder whose write finished (it holds the COMPLETE marker)."""
    return (path / COMPLETE_MARKER).is_file() and (path / LOOP_STATE).is_file()


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_dir`` as ``(step, path)``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_dir``, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def remove_partial(ckpt_dir: Path) -> list[Path]:
    """Delete stray ``.tmp-*`` entries and ``step-N`` folders without the COMPLETE marker; return what was removed.

    Incomplete ``step-N`` folders cannot come from this module (the marker is written before the rename) but they
    would block the rename of a later save of the same step, so they go too.
    """
    removed: list[Path] = []
    if not ckpt_dir.is_dir():
        return removed
    for p in ckpt_dir.iterdir():
        stray = p.name.startswith(TMP_PREFIX) or (_STEP_DIR.match(p.name) and not is_complete(p))
        if stray:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def read_loop_state(path: Path) -> dict[str, Any]:
    """The ``loop_state.json`` of checkpoint folder ``path``, its fields checked: the step its folder is named for,
    the data position, the process count."""
    f = Fields(read_json(path / LOOP_STATE, "loop state"), path / LOOP_STATE)
    m = _STEP_DIR.match(path.name)
    step = f.int("step", 0)
    if m is None or step != int(m.group(1)):
        raise UserError(f"'{path / LOOP_STATE}': field 'step' is {step}, but the checkpoint is '{path.name}'")
    return {**f.data, "step": step, "batches_consumed": f.int("batches_consumed", 0),
            "world_size": f.int("world_size", 1, default=1)}


def _delete(path: Path) -> None:
    # Rename first so that a crash halfway through rmtree leaves a ".tmp-*" folder (cleaned at resume) rather than a
    # half-deleted folder that still carries its COMPLETE marker.
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def save_checkpoint(accelerator: Any, ckpt_dir: Path, step: int, loop_state: dict[str, Any], keep: int,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Atomically write checkpoint ``step-{step}`` under ``ckpt_dir``; call on every process.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (models, optimizers, schedulers and registered objects
            are saved through ``save_state``; every process writes its own RNG state file).
        ckpt_dir: the run's ``checkpoints`` folder.
        step: completed loop steps.
        loop_state: JSON-able loop bookkeeping (step, data position, ...).
        keep: number of complete checkpoints to keep (at least 1).
        write_extra: called by the main process with the folder being written, to add files of its own.

    Returns:
        The final checkpoint folder.
    """
    name = checkpoint_name(step)
    tmp, final = ckpt_dir / f"{TMP_PREFIX}{name}", ckpt_dir / name
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        (tmp / LOOP_STATE).write_text(json.dumps(loop_state, indent=1))
        fsync_tree(tmp)
        with open(tmp / COMPLETE_MARKER, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # e.g. the final save of a resumed run that had already finished
            _delete(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        write_text_atomic(ckpt_dir / LATEST, name + "\n")
        # Only checkpoints up to this step count: newer ones that could not be loaded (the run fell back past them)
        # are left for inspection, and must not push the loadable ones out.
        for _, old in [c for c in list_checkpoints(ckpt_dir) if c[0] <= step][: -max(1, keep)]:
            _delete(old)
    accelerator.wait_for_everyone()
    return final


# --- what a checkpoint holds: the trained state only, the EMA as safetensors ------------------------------------
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"


def trained_state(method: torch.nn.Module, frozen: set[str]) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``method``: its state dict without the frozen parameters (the teacher, LoRA base
    weights), which the method's constructor rebuilds: a checkpoint holds what training changes, not a copy of a
    multi-GB teacher."""
    return {k: v.detach().cpu() for k, v in method.state_dict().items() if k not in frozen}


def save_trained(trained: dict[str, torch.Tensor], folder: Path) -> None:
    """Write trained tensors as ``model.safetensors``, under the method's own names."""
    save_file({k: v.contiguous() for k, v in trained.items()}, str(folder / MODEL_FILE), metadata={"format": "pt"})


def load_trained(method: torch.nn.Module, folder: Path, frozen: set[str],
                 load: Callable[[dict], None] | None = None) -> None:
    """Load ``model.safetensors`` into the method by its own names (through ``load`` for a sharded method), after
    checking that every trained tensor is there and nothing else."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"'{path}' is missing")
    # Names, dtypes and shapes against the method's own, from the header, before a byte of weights is read.
    expected = specs({k: v for k, v in method.state_dict().items() if k not in frozen})
    check_tensors(safetensors_header(path, "checkpoint weights"), expected, "its weights")
    state = load_file(str(path))
    (load or (lambda sd: method.load_state_dict(sd, strict=False)))(state)


def check_optimizer_states(optimizers: list) -> None:
    """A UserError when a loaded optimizer holds a moment whose shape or dtype is not its parameter's (a tampered
    optimizer file loads without complaint and would fail, or train wrongly, at the next step)."""
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                for key, v in opt.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.ndim and (v.shape != p.shape or v.dtype != p.dtype):
                        raise UserError(f"optimizer {i}'s '{key}' of a parameter of shape {list(p.shape)} is "
                                        f"{v.dtype} {list(v.shape)}")


def save_ema(ema: Any, folder: Path, shadow: list[torch.Tensor] | None = None) -> None:
    """The EMA's shadow weights (or ``shadow``, those gathered in full by a sharded run) as safetensors, its
    counters as JSON metadata of the same file."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params") if shadow is None else shadow
    state.pop("shadow_params", None)
    save_file({f"shadow.{i}": t.detach().contiguous().cpu() for i, t in enumerate(shadow)}, str(folder / EMA_FILE),
              metadata={"ema": json.dumps(state)})


def load_ema(ema: Any, folder: Path) -> None:
    path = folder / EMA_FILE
    if not path.is_file():
        raise UserError(f"it holds no {EMA_FILE} although the run keeps an EMA")
    want = specs({f"shadow.{i}": t for i, t in enumerate(ema.shadow_params)})
    check_tensors(safetensors_header(path, "EMA weights"), want, "its EMA")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["ema"])
        shadow = [f.get_tensor(f"shadow.{i}") for i in range(len(f.keys()))]
    ema.load_state_dict({**meta, "shadow_params": shadow})


def load_newest_checkpoint(accelerator: Any, ckpt_dir: Path, ema: Any, main: bool,
                           load_extra: Callable[[Path], None] | None = None) -> tuple[Path | None, dict]:
    """Load the newest complete checkpoint that loads; one that does not (truncated, tampered with, written by an
    older version) is reported in a warning line and the previous one is tried. ``load_extra(folder)`` loads what
    the loop wrote itself (the trained weights, sharded optimizer states), on every process. Returns (folder, loop
    state)."""
    found = list_checkpoints(ckpt_dir)
    first_problem = None
    for _, path in reversed(found):
        problem = None
        try:
            pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
            if pickled:
                raise UserError(f"it holds a pickled state ({pickled[0]}, as stepdistill 0.1 saved the EMA), which "
                                "is never loaded because a pickle can run code")
            state = read_loop_state(path)
            accelerator.load_state(str(path))
            if ema is not None:
                load_ema(ema, path)
            if load_extra is not None:
                load_extra(path)
        except (MemoryError, PermissionError, torch.OutOfMemoryError):
            raise  # a problem of this machine, not of the checkpoint: never skip a good checkpoint for it
        except Exception as e:  # noqa: BLE001 - whatever makes a checkpoint unreadable, the previous one may serve
            problem = first_line(e)
        # Every process moves on together: if any could not load this checkpoint, all try the previous one (a
        # process resuming from other weights than the rest would silently average mismatched gradients).
        failed = torch.tensor([1.0 if problem else 0.0], device=accelerator.device)
        if float(accelerator.reduce(failed, reduction="sum")) == 0:
            return path, state
        problem = problem or "another process could not load it"
        first_problem = first_problem or (path, problem)
        if main:
            print(f"warning: checkpoint '{path}' cannot be loaded ({problem}); trying the previous one",
                  file=sys.stderr)
    if first_problem is not None:
        path, why = first_problem
        raise UserError(f"no checkpoint of '{ckpt_dir.parent}' can be loaded (newest, '{path.name}': {why}); pass "
                        "--overwrite to start the run afresh, or --out another folder")
    return None, {}
