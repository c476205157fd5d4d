"""The training methods, one file each, and their registry. Import as ``stepdistill.trainers``."""

from __future__ import annotations

import importlib
from pathlib import Path

from stepdistill.config import RunConfig, read_config, run_config
from stepdistill.errors import UserError

# The method registry: one explicit dict, name -> "module:Class" (imported when asked for, so that reading one
# recipe does not import every method).
METHODS: dict[str, str] = {
    "teacher": "stepdistill.trainers.teacher:TeacherMethod",
    "dmd2": "stepdistill.trainers.dmd2:DMD2Method",
    "consistency": "stepdistill.trainers.consistency:ConsistencyMethod",
    "vsd": "stepdistill.trainers.vsd:VSDMethod",
    "msd": "stepdistill.trainers.multi_student:MultiStudentMethod",
    "agd": "stepdistill.trainers.guidance:AGDMethod",
    "scm": "stepdistill.trainers.scm:SCMMethod",
    "rcm": "stepdistill.trainers.rcm:RCMMethod",
}


def get_method(name: str) -> type:
    """The Method class registered as ``name``; an unknown name is a UserError listing the known ones."""
    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (available: {', '.join(sorted(METHODS))})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_config(path: str | Path | None, overrides: list[str] | None = None, method: str | None = None) -> RunConfig:
    """A :class:`~stepdistill.config.RunConfig` from a YAML file (a path or a shipped recipe's name) and dotted
    ``key=value`` overrides, with ``method_args`` typed by the method's own dataclass."""
    data = read_config(path, overrides, method)
    method_cls = get_method(str(data.get("method", RunConfig.method)))
    return run_config(data, method_cls.Config, method_cls.phase_names)


__all__ = ["METHODS", "get_method", "load_config"]
