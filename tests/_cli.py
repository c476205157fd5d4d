"""Running the command line in-process and checking how it refuses bad input."""

from __future__ import annotations

from pathlib import Path

from stepdistill.cli import main


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv: list[str], root: Path, capsys, match: str) -> str:
    """Run the CLI in-process: exit 2, one line naming the problem (``match``), no traceback, and ``root`` exactly
    as before (no file or folder created, changed or removed). Returns the line."""
    before = snapshot(root)
    dirs = sorted(str(p) for p in root.rglob("*") if p.is_dir())
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and err.startswith("stepdistill: error: "), err
    assert match in err, err
    assert snapshot(root) == before and sorted(str(p) for p in root.rglob("*") if p.is_dir()) == dirs
    return err
