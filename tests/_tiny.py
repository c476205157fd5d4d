"""A tiny class-conditional teacher (random weights, digits16 size) and the small helpers the training tests share:
run overrides, a labelled digits batch, a run's log rows, a pipeline's UNet weights, a fixed-loss descent and a
2-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from stepdistill.batch import Batch
from stepdistill.pipelines import ClassConditionalPipeline
from stepdistill.pipelines.export import export_student, sample_grid

ROOT = Path(__file__).resolve().parent.parent


def save_class_teacher(out: Path, channels: tuple[int, int] = (8, 16), attention: bool = False,
                       flow: bool = False) -> str:
    """Save a tiny class-conditional v-prediction teacher (10 classes + null, 16x16x1) to ``out``; seed 0. With
    ``attention`` its second level has self-attention blocks (as the digits16 teacher has); with ``flow`` it is a
    flow-matching teacher (FlowMatchEulerDiscreteScheduler, as the digits16 flow teacher)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    torch.manual_seed(0)
    down, up = ("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"), \
        ("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D")
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=1,
                       down_block_types=down, up_block_types=up,
                       norm_num_groups=4, attention_head_dim=8, num_class_embeds=11)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0) if flow else DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ClassConditionalPipeline(unet=unet, scheduler=sched).save_pretrained(str(out), safe_serialization=True)
    return str(out)


def run_overrides(teacher: str, *extra: str) -> list[str]:
    """Config overrides of a short, quiet test run on ``teacher`` (no checkpoints, samples or tracker)."""
    return [f"teacher={teacher}", "data.batch_size=8", "train.tracker=none", "train.log_every=1",
            "train.checkpoint_every=0", "train.sample_every=0", "optim.student.lr=0.001", *extra]


def digits_batch(n: int = 8) -> dict:
    """The first ``n`` labelled digits16 images as a batch."""
    from stepdistill.data import load_digits16

    x, y = load_digits16()
    return {"image": x[:n], "label": y[:n]}


def log_rows(run: Path) -> list[dict]:
    """The rows of a run's logs.jsonl."""
    return [json.loads(s) for s in (run / "logs.jsonl").read_text().splitlines()]


def unet_weights(pipe_dir: Path) -> dict[str, torch.Tensor]:
    """The UNet state dict saved in a pipeline folder."""
    return load_file(str(pipe_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def typed(method, phase: str, raw: dict) -> Batch:
    """The typed batch the loop builds for ``phase`` of ``method`` from collated data items ``raw``."""
    p = next(p for p in method.phases() if p.name == phase)
    return method.family.batch(raw, cond=p.cond, real=p.real, device=method.device)


def loss(method, phase: str, raw: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
    """``phase``'s loss of ``method`` on collated data items ``raw`` at loop step ``step``, as the loop computes it."""
    return method.loss(phase, typed(method, phase, raw), step)


def export(method, out: Path, teacher: str | None = None) -> Path:
    """Write ``method``'s student as the loop's export does (the teacher it records: the method's)."""
    export_student(method.family, method.export_spec(), Path(out), teacher or method.teacher_name)
    return Path(out)


def grid(method, num: int, seed: int = 0):
    """The uint8 NHWC sample grid of ``method``'s student, as the loop draws it."""
    return sample_grid(method.family, method.export_spec(), num, seed)


def fixed_loss_descent(method, phase: str, batch: dict, opt: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
    """``phase``'s loss on ``batch`` (collated data items) at loop step 0 before and after ``steps`` optimizer steps
    (seed 0 each time)."""

    def fixed_loss() -> torch.Tensor:
        torch.manual_seed(0)  # the same noise, timesteps and samples at every evaluation
        return loss(method, phase, batch, 0)[0]

    before = fixed_loss().item()
    for _ in range(steps):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    return before, fixed_loss().item()


def free_port() -> int:
    """A free local TCP port for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_processes(config: Path, out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """Train ``config`` with ``overrides`` into ``out`` in 2 CPU processes (torch.distributed.run)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "stepdistill", "train", yaml.safe_load(Path(config).read_text())["method"], "--config", str(config),
           "--out", str(out), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@torch.no_grad()
def randomize_lora(model: torch.nn.Module, std: float) -> None:
    """Give a network's LoRA up-projections (zero at init) random weights, so the adapters change its output."""
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, std)


def save_captioned(folder: Path, n: int) -> str:
    """``n`` random 16x16 RGB images with ``.txt`` captions ("a picture i") in ``folder``; seed 0."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture {i}")
    return str(folder)
