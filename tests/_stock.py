"""Running a script in a process where stepdistill cannot be imported: what a user of stock diffusers has."""

from __future__ import annotations

import json
import subprocess
import sys

# Prepended to every script: any import of stepdistill fails in that process.
NO_STEPDISTILL = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "stepdistill":
            raise ImportError("stepdistill must not be needed to load an export")

sys.meta_path.insert(0, Block())
"""


def run_without_stepdistill(script: str, args: dict) -> None:
    """Run ``script`` (which reads its arguments as ``json.loads(sys.argv[1])``) with ``args``; assert it succeeded."""
    res = subprocess.run([sys.executable, "-c", NO_STEPDISTILL + script, json.dumps(args)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
