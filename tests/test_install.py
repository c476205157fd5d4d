"""A real install, not only the editable checkout: build the wheel, install it into a fresh virtual environment
outside the checkout, and use it from a folder that has no configs/ (recipes and weights must come from the wheel).

The new environment borrows the already installed dependencies (torch, diffusers, ...) by a path entry, not by
reinstalling them (that would download gigabytes); stepdistill itself comes only from the wheel: the checkout's
editable hook lives in a .pth file of the borrowed folder, which a plain path entry does not run.
"""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    import shutil

    base = tmp_path_factory.mktemp("install")
    # Built from a copy: an in-tree build would leave build/ in the checkout, whose stale files later wheels ship.
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "__pycache__",
                                                             "*.egg-info", ".pytest_cache", ".ruff_cache"))
    wheels = base / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(src)], check=True, capture_output=True)
    wheel = next(wheels.glob("stepdistill-*.whl"))
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    work = base / "elsewhere"
    work.mkdir()
    return env_dir / "bin", work


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(bin_dir / "stepdistill"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_wheel_install_runs_outside_the_checkout(installed):
    bin_dir, work = installed
    where = subprocess.run([str(bin_dir / "python"), "-c", "import stepdistill; print(stepdistill.__file__)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout
    assert str(bin_dir.parent) in where and str(ROOT) not in where  # the wheel's copy, not the checkout

    r = _run(bin_dir, work, "--help")
    assert r.returncode == 0 and "train" in r.stdout and "config" in r.stdout

    r = _run(bin_dir, work, "config", "show", "dmd2")
    assert r.returncode == 0, r.stderr
    assert "method_args.real_guidance: float = 2.0" in r.stdout and "CFG scale of the teacher" in r.stdout

    # A 2-step training run from a recipe named, not found on disk: the recipe and the teacher come from the wheel.
    r = _run(bin_dir, work, "train", "dmd2", "--config", "digits16_dmd2", "--out", "run", "train.max_steps=2",
             "data.batch_size=4", "train.tracker=none", "train.checkpoint_every=0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "run" / "pipeline" / "model_index.json").is_file()
    assert (work / "run" / "checkpoints").is_dir()
