"""Multi-process training as the README tells users to launch it, on 2 CPU processes: `accelerate launch
--multi_gpu --num_processes 2 -m stepdistill train ...` trains, checkpoints and resumes; accelerate's `--cpu`
launcher, which starts one process whatever --num_processes says, is named in a warning."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
RUN = ["-m", "stepdistill", "train", "dmd2", "--config", "digits16_dmd2", "data.batch_size=4", "train.tracker=none",
       "train.checkpoint_every=2", "train.log_every=1"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([ACCELERATE, "launch", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "--main_process_port", _port(), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "logs.jsonl").read_text().splitlines()]


def test_readme_multi_process_command_trains_and_resumes(tmp_path):
    run = tmp_path / "run"
    res = _launch("--multi_gpu", "--num_processes", "2", *RUN, "--out", str(run), "train.max_steps=2")
    assert res.returncode == 0, res.stderr[-4000:]
    state = json.loads((run / "checkpoints" / "step-2" / "loop_state.json").read_text())
    assert state["world_size"] == 2
    keys = load_file(run / "checkpoints" / "step-2" / "model.safetensors").keys()
    assert not any(k.startswith(("teacher.", "module.")) for k in keys)  # trained state only, unwrapped names
    res = _launch("--multi_gpu", "--num_processes", "2", *RUN, "--out", str(run), "train.max_steps=4")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming from" in res.stderr and "step-2" in res.stderr
    assert _steps(run) == [1, 2, 3, 4]
    assert (run / "pipeline" / "model_index.json").is_file()


def test_cpu_launcher_running_one_of_several_processes_warns(tmp_path):
    run = tmp_path / "run"
    res = _launch("--cpu", "--num_processes", "2", *RUN, "--out", str(run), "train.max_steps=1")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "was asked for 2 processes but this run has 1" in res.stderr
    assert json.loads((run / "checkpoints" / "step-1" / "loop_state.json").read_text())["world_size"] == 1
