"""Training methods and the one training loop. Import as ``stepdistill.trainers``."""

from __future__ import annotations

import importlib

from stepdistill.errors import UserError

# The method registry: one explicit dict, name -> "module:Class" (imported lazily so `--help` stays fast).
METHODS: dict[str, str] = {
    "teacher": "stepdistill.trainers.teacher:TeacherMethod",
    "dmd2": "stepdistill.trainers.dmd2:DMD2Method",
    "consistency": "stepdistill.trainers.consistency:ConsistencyMethod",
    "vsd": "stepdistill.trainers.vsd:VSDMethod",
    "msd": "stepdistill.trainers.multi_student:MultiStudentMethod",
    "agd": "stepdistill.trainers.guidance:AGDMethod",
}


def get_method(name: str) -> type:
    """The Method class registered as ``name``; an unknown name is a UserError listing the known ones."""
    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (available: {', '.join(sorted(METHODS))})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
