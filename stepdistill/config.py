"""Typed dataclass configs loaded from YAML with dotted ``key=value`` overrides.

Every run is described by one :class:`RunConfig`. The method-specific part (``method_args``) is a dataclass that
each method registers next to its implementation, so an unknown key or a wrong type is caught before any work is
done and reported as a one-line :class:`~stepdistill.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from diffusers.optimization import SchedulerType

from .errors import ConfigError, first_line


@dataclass
class DataConfig:
    # "digits16", a folder of images (optionally with captions), a prompt file (.txt), or a local HF datasets folder.
    source: str = "digits16"
    # Side length images are resized / center-cropped to (ignored by digits16, which is always 16).
    resolution: int = 16
    # Center crop (True) or random crop (False) after resizing the short side.
    center_crop: bool = True
    # Random horizontal flip (never for digits).
    random_flip: bool = False
    # Image column of an HF datasets folder.
    image_column: str = "image"
    # Caption column of an HF datasets folder.
    caption_column: str = "text"
    # Per-process batch size of one micro-batch.
    batch_size: int = 64
    # DataLoader worker processes (0 = load in the main process).
    num_workers: int = 0
    # Bound of the per-prompt text-embedding cache of text teachers, in MiB, kept on the CPU (0 = no cache).
    prompt_cache_mb: int = 1024


@dataclass
class OptimConfig:
    # Peak learning rate of this phase's AdamW optimizer.
    lr: float = 1e-4
    # AdamW beta1 (first-moment decay).
    beta1: float = 0.9
    # AdamW beta2 (second-moment decay).
    beta2: float = 0.999
    # AdamW decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW epsilon.
    eps: float = 1e-8
    # LR schedule name understood by diffusers.optimization.get_scheduler ("constant", "cosine", "linear", ...).
    lr_schedule: str = "constant_with_warmup"
    # Linear warm-up, in optimizer updates of this phase.
    warmup_steps: int = 0
    # Clip the gradient norm of this phase's parameters (0 = no clipping).
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    # Number of loop steps. A phase with update interval k updates on steps where step % k == 0.
    max_steps: int = 1000
    # Micro-batches accumulated per optimizer update (for every phase).
    grad_accum: int = 1
    # "no", "fp16" or "bf16" (accelerate mixed precision of the trainable networks); "" = what accelerate was
    # launched with (accelerate launch --mixed_precision / its config), "no" without a launcher.
    mixed_precision: str = ""
    # dtype of the frozen parts (teacher network weights, VAE, text encoders): "float32", "bfloat16" or "float16".
    # Trainable weights (students, fake scores, LoRA adapters) stay float32 whatever this says.
    teacher_dtype: str = "float32"
    # Recompute activations in the backward pass of the trainable networks (less memory, ~30% more compute).
    gradient_checkpointing: bool = False
    # "none" (DDP: every process holds all weights) or "fsdp2" (torch fully_shard: trainable networks, their
    # gradients and optimizer states split over the processes; frozen parts stay whole). Same code on CPU and GPU.
    sharding: str = "none"
    # EMA decay of the student (0 = no EMA), stepped after each update of the phase that trains it. The EMA weights
    # are what gets exported when enabled; refused where a method keeps no student EMA (LoRA students).
    ema_decay: float = 0.0
    # Warm the EMA decay up from 0 towards ema_decay over the first steps (diffusers EMAModel's use_ema_warmup).
    ema_warmup: bool = False
    # Save a checkpoint every this many steps (0 = only at the end).
    checkpoint_every: int = 500
    # Number of newest checkpoints kept in the run folder.
    keep_checkpoints: int = 2
    # Log scalars every this many steps.
    log_every: int = 10
    # Write a sample grid every this many steps (0 = only at the end).
    sample_every: int = 0
    # "tensorboard" or "none".
    tracker: str = "tensorboard"


@dataclass
class RunConfig:
    # Training method: a key of stepdistill.trainers.METHODS.
    method: str = "teacher"
    # Base seed; every rank and step derives its own stream from it.
    seed: int = 0
    # Teacher pipeline: "digits16" (shipped), a local folder or a hub id. Unused by the "teacher" method.
    teacher: str = "digits16"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # One optimizer per phase, keyed by the phase names the method declares.
    optim: dict[str, OptimConfig] = field(default_factory=dict)
    # Method-specific arguments; replaced by the method's own dataclass when the config is resolved.
    method_args: Any = field(default_factory=dict)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it where that is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        et = args[0] if args else Any
        out = [_coerce(v, et, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; accept it for float fields.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            # YAML 1.1 (PyYAML) reads unquoted no / yes / off / on as booleans: `mixed_precision: no` means "no".
            return "yes" if value else "no"
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (valid keys here: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """A plain-YAML-able dict of a (possibly nested) dataclass config."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict in place and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def recipes_dir() -> Path:
    """The folder of the shipped recipes: ``stepdistill/configs`` of an installed wheel, else the source checkout's
    ``configs/`` (an editable install maps the package there without a folder of that name)."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``--config NAME`` resolves them)."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_config_path(arg: str | Path) -> Path:
    """``--config`` as given: an existing file, else the shipped recipe of that name (``digits16_dmd2`` or
    ``configs/digits16_dmd2.yaml`` outside a checkout); a ConfigError naming both places otherwise."""
    p = Path(arg)
    if p.is_file():
        return p
    shipped = recipes_dir() / (p.stem + ".yaml")
    if p.suffix in ("", ".yaml") and p.parent.name in ("", "configs") and shipped.is_file():
        return shipped
    raise ConfigError(f"config file '{arg}' not found, and no shipped recipe has that name (shipped: "
                      f"{', '.join(list_recipes())}; `stepdistill config list` shows them)")


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        # PyYAML's message starts with context ("while parsing a block mapping"); the problem and its line say more.
        problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"config file '{p}' is not valid YAML: {problem or first_line(e)}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of config keys")
    return data


def run_config(data: dict, method_config: type, phase_names: tuple[str, ...] | list[str]) -> RunConfig:
    """A :class:`RunConfig` from a config mapping (a YAML file with its overrides applied), with ``method_args``
    typed by ``method_config`` (the method's dataclass) and an optimizer section for each of ``phase_names``."""
    data = dict(data)
    method_args = data.pop("method_args", {}) or {}
    cfg = from_dict(RunConfig, data)
    cfg.method_args = from_dict(method_config, method_args, prefix="method_args")
    check_finite(cfg.method_args, "method_args")
    check_optim_phases(cfg, phase_names)
    # Every phase gets its optimizer section, defaults filled in, so the resolved config says what trains.
    cfg.optim = {n: cfg.optim.get(n, OptimConfig()) for n in phase_names}
    resolve_launch_settings(cfg)
    check_values(cfg)
    return cfg


def check_finite(cfg: Any, prefix: str) -> None:
    """A ConfigError for the first number of a config (in nested lists too) that is NaN or infinite: no method key
    means anything by them, and a loss would only diverge on them after the run folder exists."""
    for f in dataclasses.fields(cfg):
        stack = [(f"{prefix}.{f.name}", getattr(cfg, f.name))]
        while stack:
            key, v = stack.pop()
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key '{key}' must be a finite number, got {v}")
            if isinstance(v, (list, tuple)):
                stack += [(f"{key}[{i}]", x) for i, x in enumerate(v)]


def read_config(path: str | Path | None, overrides: list[str] | None = None, method: str | None = None) -> dict:
    """The config mapping of a YAML file (a path or a shipped recipe's name) with ``overrides`` applied; ``method``
    (the command's) must match the file's."""
    data = read_yaml(resolve_config_path(path)) if path is not None else {}
    apply_overrides(data, overrides or [])
    if method is not None:
        if data.get("method", method) != method:
            raise ConfigError(f"config is for method '{data['method']}' but the command asked for '{method}'")
        data["method"] = method
    return data


MIXED_PRECISION = ("no", "fp16", "bf16")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
SHARDING = ("none", "fsdp2")


def resolve_launch_settings(cfg: RunConfig) -> RunConfig:
    """Fill ``train.mixed_precision: ""`` with what accelerate was launched with (its launcher exports
    ACCELERATE_MIXED_PRECISION; "no" without one), so that the saved config says what ran."""
    if cfg.train.mixed_precision == "":
        cfg.train.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return cfg


def check_values(cfg: RunConfig) -> None:
    """A ConfigError naming the first run-level value (data, train, optim) outside its valid range.

    Called when a config is loaded and again by the loop, so that a bad value is refused before anything is built
    or written (a NaN learning rate would otherwise train to NaN and export it).
    """
    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    d, t = cfg.data, cfg.train
    need(d.batch_size >= 1, "data.batch_size", "a positive integer (images per process and micro-batch)",
         d.batch_size)
    need(d.resolution >= 1, "data.resolution", "a positive number of pixels", d.resolution)
    need(d.num_workers >= 0, "data.num_workers", "0 or more", d.num_workers)
    need(d.prompt_cache_mb >= 0, "data.prompt_cache_mb", "0 (no cache) or more MiB", d.prompt_cache_mb)
    need(t.max_steps >= 1, "train.max_steps", "at least 1 (0 steps would export the untrained copy)", t.max_steps)
    need(t.grad_accum >= 1, "train.grad_accum", "at least 1", t.grad_accum)
    need(t.mixed_precision in MIXED_PRECISION, "train.mixed_precision", " / ".join(MIXED_PRECISION) + " (or unset)",
         t.mixed_precision)
    need(t.teacher_dtype in TEACHER_DTYPES, "train.teacher_dtype", " / ".join(TEACHER_DTYPES), t.teacher_dtype)
    need(t.sharding in SHARDING, "train.sharding", " / ".join(SHARDING), t.sharding)
    need(finite(t.ema_decay) and 0 <= t.ema_decay < 1, "train.ema_decay", "in [0, 1) (0 = no EMA)", t.ema_decay)
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "0 (only at the end) or a positive number of steps",
         t.checkpoint_every)
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "at least 1", t.keep_checkpoints)
    need(t.log_every >= 1, "train.log_every", "a positive number of steps", t.log_every)
    need(t.sample_every >= 0, "train.sample_every", "0 (only at the end) or a positive number of steps",
         t.sample_every)
    need(t.tracker in ("tensorboard", "none"), "train.tracker", "'tensorboard' or 'none'", t.tracker)
    for name, oc in cfg.optim.items():
        k = f"optim.{name}."
        need(finite(oc.lr) and oc.lr > 0, k + "lr", "a finite number > 0", oc.lr)
        need(finite(oc.beta1) and 0 <= oc.beta1 < 1, k + "beta1", "in [0, 1)", oc.beta1)
        need(finite(oc.beta2) and 0 <= oc.beta2 < 1, k + "beta2", "in [0, 1)", oc.beta2)
        need(finite(oc.eps) and oc.eps > 0, k + "eps", "a finite number > 0", oc.eps)
        need(finite(oc.weight_decay) and oc.weight_decay >= 0, k + "weight_decay", "a finite number >= 0",
             oc.weight_decay)
        need(oc.warmup_steps >= 0, k + "warmup_steps", "0 or more", oc.warmup_steps)
        need(finite(oc.max_grad_norm) and oc.max_grad_norm >= 0, k + "max_grad_norm",
             "a finite number >= 0 (0 = no clipping)", oc.max_grad_norm)
        valid = [s.value for s in SchedulerType]
        need(oc.lr_schedule in valid, k + "lr_schedule", "one of " + ", ".join(valid), oc.lr_schedule)


def check_optim_phases(cfg: RunConfig, phase_names: tuple[str, ...] | list[str]) -> None:
    """A ConfigError for an ``optim.<name>`` section that names no phase of the method."""
    unknown = sorted(set(cfg.optim) - set(phase_names))
    if unknown:
        raise ConfigError(f"config key 'optim.{unknown[0]}' is not a phase of method '{cfg.method}' "
                          f"(its phases: {', '.join(phase_names)})")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --- discovery: every key with its type, default and help ---------------------------------------------------------
@dataclass
class KeyInfo:
    """One config key as ``stepdistill config show`` and the docs' key tables present it."""

    name: str
    type: str
    default: Any
    help: str

    @property
    def summary(self) -> str:
        """The help's first sentence."""
        return re.split(r"(?<=[a-z0-9)\]])\. (?=[A-Z])", self.help, maxsplit=1)[0].rstrip(".") + "."


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text: the comment block above it in ``cls``'s source (the style's "a comment per field").

    Fields listed together under one comment share it (``beta1`` / ``beta2`` under "AdamW betas ..."). Read from the
    source so the help has one copy, the comment a reader of the code sees.
    """
    out: dict[str, str] = {}
    for base in cls.__mro__[1:][::-1]:  # a config subclass inherits its base's keys, with their help
        if dataclasses.is_dataclass(base):
            out.update(field_help(base))
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    field_re = re.compile(r"^    (\w+)\s*:")
    block: list[str] = []
    current = ""
    for line in lines[1:]:
        stripped = line.strip()
        if line.startswith("    #") and not line.startswith("     "):
            if not block:
                current = ""
            block.append(stripped.lstrip("#").strip())
            continue
        m = field_re.match(line)
        if m:
            if block:
                current = " ".join(block)
                block = []
            out[m.group(1)] = current
        elif stripped and not line.startswith("     "):
            block = []  # a docstring or method ends a comment block
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def describe(cls: type) -> list[KeyInfo]:
    """Every field of dataclass ``cls`` (nested dataclass fields are not expanded)."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    return [KeyInfo(f.name, _type_name(hints[f.name]), to_dict(_default_of(f)), helps.get(f.name, ""))
            for f in dataclasses.fields(cls)]


def markdown_table(keys: list[KeyInfo], prefix: str = "") -> str:
    """A markdown table of ``keys`` (key, type, default, meaning): the docs' generated key tables."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in keys:
        default = yaml.safe_dump(k.default, default_flow_style=True, width=10**6).strip()
        default = default.removesuffix("\n...").removesuffix("...").strip()
        text = k.help.replace("|", "\\|")
        rows.append(f"| `{prefix}{k.name}` | {k.type} | `{default}` | {text} |")
    return "\n".join(rows)
