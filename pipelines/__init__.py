"""Pipelines and export. Import as ``stepdistill.pipelines``."""

from __future__ import annotations

import json
from pathlib import Path

from stepdistill.errors import UserError, first_line

from .class_conditional import ClassConditionalPipeline, numpy_to_uint8
from .guidance import AdapterGuidancePipeline
from .multi_student import MultiStudentPipeline

ASSETS = Path(__file__).resolve().parent.parent / "stepdistill" / "assets"
# Aliases for pipelines shipped inside the package.
ALIASES = {"digits16": "digits16_teacher", "digits16-flow": "digits16_flow_teacher"}
OUR_PIPELINES = {"ClassConditionalPipeline": ClassConditionalPipeline}

__all__ = ["AdapterGuidancePipeline", "ClassConditionalPipeline", "MultiStudentPipeline", "accepts_timesteps",
           "load_pipeline", "numpy_to_uint8",
           "rebuild_pipeline", "recorded_schedule", "recorded_timesteps", "resolve_pipeline_path"]


def accepts_timesteps(pipe) -> bool:
    """Whether both the pipeline's ``__call__`` and its scheduler's ``set_timesteps`` take explicit ``timesteps``."""
    import inspect

    return all("timesteps" in inspect.signature(fn).parameters for fn in (pipe.__call__, pipe.scheduler.set_timesteps))


def recorded_timesteps(pipe, steps: int) -> list[int] | None:
    """The schedule a distilled student records for ``steps``-step sampling, or None (the scheduler's own rule).

    LCM recipes may record ``sample_timesteps`` (recommended schedules, one per step count) and DMD2 students record
    ``student_timesteps`` (their trained schedule) in the scheduler config; the former are looked up first. None
    when the pipeline or its scheduler does not take explicit timesteps.
    """
    if not accepts_timesteps(pipe):
        return None
    cfg = pipe.scheduler.config
    for ts in [*(cfg.get("sample_timesteps") or []), cfg.get("student_timesteps") or []]:
        if len(ts) == steps:
            return [int(t) for t in ts]
    return None


def recorded_schedule(pipe, steps: int) -> dict:
    """How to ask ``pipe`` for a distilled student's recorded ``steps``-step sampler: ``{"timesteps": [...]}`` where
    the pipeline takes explicit timesteps, ``{"sigmas": [...]}`` for the stock flow-matching pipelines (SD3, Flux:
    they take ``sigmas``, recorded as ``sample_sigmas`` / ``student_sigmas``), or ``{}`` (the scheduler's own rule)."""
    import inspect

    ts = recorded_timesteps(pipe, steps)
    if ts is not None:
        return {"timesteps": ts}
    if "sigmas" in inspect.signature(pipe.__call__).parameters:
        cfg = pipe.scheduler.config
        for sig in [*(cfg.get("sample_sigmas") or []), cfg.get("student_sigmas") or []]:
            if len(sig) == steps:
                return {"sigmas": [float(v) for v in sig]}
    return {}


def _assets_dir() -> Path:
    # Installed wheel: assets live inside the stepdistill package; editable: beside this source tree.
    import stepdistill

    return Path(stepdistill.__file__).resolve().parent / "assets"


def resolve_pipeline_path(name: str) -> str:
    """A shipped alias ("digits16") -> its folder; a local folder as is; anything else is treated as a hub id."""
    if name in ALIASES:
        path = _assets_dir() / ALIASES[name]
        if not (path / "model_index.json").is_file():
            raise UserError(f"the shipped pipeline '{name}' is missing from {path}; reinstall stepdistill")
        return str(path)
    p = Path(name)
    if p.exists():
        if not p.is_dir() or not (p / "model_index.json").is_file():
            raise UserError(f"'{name}' is not a diffusers pipeline folder (no model_index.json)")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"pipeline folder '{name}' does not exist (pass a pipeline folder, 'digits16' or a hub id)")
    return name


def is_lora_export(name: str) -> bool:
    """A local folder holding a LoRA export without a pipeline of its own (SD-type LCM-LoRA students)."""
    from .lora import LORA_FILE

    p = Path(name)
    return p.is_dir() and (p / LORA_FILE).is_file() and not (p / "model_index.json").is_file()


def load_lora_export(path: str, base: str | None = None, device=None, dtype=None):
    """The base pipeline with a LoRA export applied and the export's scheduler swapped in.

    ``base`` defaults to the base model the export records; loading onto a base whose weights differ from the
    recorded fingerprint warns (:class:`~stepdistill.pipelines.lora.BaseMismatchWarning`).
    """
    import diffusers

    from .lora import load_lora, lora_base

    info = lora_base(path) or {}
    base = base or info.get("base")
    if not base:
        raise UserError(f"'{path}' is a LoRA export that does not record its base model; pass --base with the "
                        "pipeline it was trained on")
    pipe = load_lora(load_pipeline(base, dtype=dtype), path)
    sched = Path(path) / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        cls_name = json.loads(sched.read_text()).get("_class_name", "")
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise UserError(f"'{sched}' names an unknown scheduler class '{cls_name}'")
        pipe.scheduler = cls.from_pretrained(path, subfolder="scheduler")
    return pipe.to(device) if device is not None else pipe


def rebuild_pipeline(base, **replacements):
    """A pipeline of ``base``'s class with the same components but ``replacements`` (e.g. ``unet=...``,
    ``scheduler=...``), keeping the constructor flags ``base`` holds in its config (requires_safety_checker, ...)."""
    import inspect

    components = {**base.components, **replacements}
    params = inspect.signature(type(base).__init__).parameters
    flags = {k: v for k, v in base.config.items() if k in params and k not in components}
    pipe = type(base)(**components, **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(name: str, device=None, dtype=None, base: str | None = None, single: bool = False):
    """Load a pipeline by alias, local folder or hub id; our own pipeline classes are picked by model_index.json.

    A LoRA export folder (``pytorch_lora_weights.safetensors`` without a pipeline) loads as its base pipeline
    (``base``, or the one it records) with the adapters applied. ``base`` is refused for anything else. A
    multi-student export (with ``router.json``) loads as a :class:`MultiStudentPipeline`, or with ``single`` as its
    student 0 alone; an AGD export (with ``guidance_adapter/``) as an :class:`AdapterGuidancePipeline`, or with
    ``single`` as its base pipeline without the adapters.
    """
    from diffusers import DiffusionPipeline

    if is_lora_export(name):
        return load_lora_export(name, base, device, dtype)
    if base is not None:
        raise UserError(f"--base applies to LoRA exports (a folder with pytorch_lora_weights.safetensors and no "
                        f"model_index.json); '{name}' is a full pipeline")
    path = resolve_pipeline_path(name)
    if not single and MultiStudentPipeline.is_multi_student(path):
        return MultiStudentPipeline.from_pretrained(path, device=device, dtype=dtype)
    if not single and AdapterGuidancePipeline.is_guided(path):
        return AdapterGuidancePipeline.from_pretrained(path, device=device, dtype=dtype)
    cls = DiffusionPipeline
    index = Path(path) / "model_index.json"
    if index.is_file():
        try:
            cls_name = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError:
            raise UserError(f"'{index}' is not valid JSON") from None
        cls = OUR_PIPELINES.get(cls_name, DiffusionPipeline)
    from diffusers.utils import logging as diffusers_logging

    # diffusers' "Loading pipeline components" bar is noise in our commands (and would turn a one-line error into
    # several lines); switched off for this call only, since the setting is process-wide.
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        # Components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None to load again.
        if index.is_file():
            kwargs.update({k: None for k, v in json.loads(index.read_text()).items()
                           if isinstance(v, list) and v == [None, None]})
        pipe = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load pipeline '{name}': {first_line(e)}") from None
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def average_pipelines(sources: list[str], out: str | Path, overwrite: bool = False) -> Path:
    """Write a pipeline whose denoiser (``unet`` or ``transformer``) is the mean of the ``sources``' denoisers.

    Averaging snapshots of one run (a post-hoc EMA, as in EDM2 or stochastic weight averaging) smooths the
    oscillation of adversarial / distribution-matching training. Only the denoisers are loaded (one at a time, the
    running sum in float32); every other file is copied from the last source, so recorded sampling schedules and the
    model card survive (re-saving the scheduler through diffusers would drop the keys it does not know). Nothing is
    written unless every source loads and matches.
    """
    import shutil

    import torch
    from diffusers import AutoModel

    from stepdistill.utils import check_out_dir, prepare_out_dir

    if len(sources) < 2:
        raise UserError("average needs at least two pipeline folders")
    paths = [Path(resolve_pipeline_path(s)).resolve() for s in sources]
    for src, path in zip(sources, paths):
        if not path.is_dir():  # e.g. "runs/snap", which the resolver takes for a hub id
            raise UserError(f"pipeline folder '{src}' does not exist (average needs local folders: download hub "
                            "pipelines first)")
    target = Path(out).resolve()
    if any(target == p or target in p.parents or p in target.parents for p in paths):
        raise UserError(f"--out '{out}' is, holds or lies inside one of the pipelines to average; choose another "
                        "output folder")
    check_out_dir(out, overwrite)  # before the (possibly long) loading
    total, net_name, ref, net, state = None, None, None, None, {}
    for src, path in zip(sources, paths):
        index = json.loads((path / "model_index.json").read_text())
        name = "unet" if "unet" in index else "transformer" if "transformer" in index else None
        if name is None:
            raise UserError(f"pipeline '{src}' has neither a unet nor a transformer to average")
        try:
            net = AutoModel.from_pretrained(str(path), subfolder=name)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the {name} of pipeline '{src}': {first_line(e)}") from None
        config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
        if ref is None:
            net_name, ref = name, (type(net).__name__, config)
        elif (name, (type(net).__name__, config)) != (net_name, ref):
            raise UserError(f"pipeline '{src}' has another network than '{sources[0]}' (architecture or config): only "
                            "snapshots of one network can be averaged")
        state = net.state_dict()
        if total is None:
            total = {k: v.float() if v.is_floating_point() else v.clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                if v.is_floating_point():
                    total[k] += v.float()
    mean = {k: (v / len(paths)).to(state[k].dtype) if v.is_floating_point() else state[k] for k, v in total.items()}
    with torch.no_grad():
        net.load_state_dict(mean)
    out = prepare_out_dir(out, overwrite)
    shutil.copytree(paths[-1], out, dirs_exist_ok=True)
    shutil.rmtree(out / net_name)  # the source's weight files (any format) give way to the averaged ones
    net.save_pretrained(str(out / net_name), safe_serialization=True)
    # A LoRA student's folder also holds its adapter weights; they would contradict the averaged (fused) network.
    (out / "pytorch_lora_weights.safetensors").unlink(missing_ok=True)
    card = out / "README.md"
    note = ("\n\nThe network's weights are the mean of these pipelines' (`stepdistill average`): "
            + ", ".join(f"`{s}`" for s in sources) + ".\n")
    card.write_text((card.read_text() if card.is_file() else "") + note)
    return out
