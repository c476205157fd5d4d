"""A tiny two-phase Method on digits16 for the loop tests (a one-step generator UNet and an MLP critic, plus a frozen
layer).

The generator ``student`` is a tiny class-conditional ``UNet2DModel`` that maps noise at t = 999 straight to an
image (it predicts the sample). It lives in a ``ClassConditionalPipeline`` built in code with a one-step DDIM
scheduler, which is the toy's own model family (``needs_teacher = False``, as the teacher method): the loop builds its
batches (``batch.real``, ``batch.labels``), samples its grids and exports it through that family; sampling the export
with one step from noise z is the generator applied to z.

Run as a script it is the loop's CLI with the toy registered, which is what the tests launch in subprocesses
(also under ``torch.distributed.run``)::

    python tests/_toy_method.py --out RUN method=toy train.max_steps=20 ...

Test-only environment variables: ``TOY_SLEEP`` (seconds slept in every loss call, so a test can kill a run part-way),
``TOY_HASH_DIR`` (after training, each rank writes the sha256 of its final weights to ``rank{RANK}.txt``) and
``TOY_CHECKPOINT_SLEEP`` = ``SECONDS@STEP`` (sleep inside the write of checkpoint STEP, after its state files and
before its COMPLETE marker, so a test can kill a run mid-save; done by wrapping
``stepdistill.loop.checkpoint.fsync_tree``, which the save calls right before it writes the marker).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from torch import nn

from stepdistill.batch import Batch
from stepdistill.pipelines.class_conditional import ClassConditionalPipeline
from stepdistill.pipelines.export import StudentSpec
from stepdistill.pipelines.families import family_of
from stepdistill.trainers.base import Method, Phase, Setup

NUM_CLASSES = 10
# The generator's input time step: pure noise of the trailing one-step DDIM schedule of T = 1000.
T_IN = 999


@dataclass
class ToyConfig:
    # Width of the critic's hidden layer.
    hidden: int = 32
    # Update interval of the generator phase (the critic updates every step).
    student_every: int = 2


def student_network() -> UNet2DModel:
    """The generator: a tiny class-conditional UNet (dropout on, so training draws random numbers there too)."""
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=NUM_CLASSES + 1, dropout=0.1)


class ToyMethod(Method):
    """Generator ``student`` (noise + label -> 16x16 image) against a ``critic``; a frozen ``teacher`` layer."""

    name = "toy"
    Config = ToyConfig
    phase_names = ("student", "critic")
    needs_teacher = False
    # The most recently built instance, so a script can inspect the weights after train() returns.
    last: ToyMethod | None = None

    def __init__(self, setup: Setup, cfg: ToyConfig):
        super().__init__(setup, cfg)
        h = cfg.hidden
        self.teacher = nn.Linear(256, 256).requires_grad_(False)
        self.student = student_network()
        self.critic = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, 1))
        scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing="trailing")
        # The toy's own family: the pipeline its student is sampled and exported as.
        self.family = family_of(ClassConditionalPipeline(unet=self.student, scheduler=scheduler), "toy")
        ToyMethod.last = self

    def phases(self) -> list[Phase]:
        return [
            Phase("student", list(self.student.parameters()), every=self.cfg.student_every, cond=False, real=True),
            Phase("critic", list(self.critic.parameters()), cond=False, real=True),
        ]

    def generate(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        t = torch.full((len(labels),), T_IN, device=z.device)
        return self.student(z, t, class_labels=labels).sample

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if os.environ.get("TOY_SLEEP"):
            time.sleep(float(os.environ["TOY_SLEEP"]))
        x, y = batch.real, batch.labels
        fake = self.generate(y, torch.randn_like(x))
        x, fake = x.flatten(1), fake.flatten(1)
        if phase == "student":
            # The critic term also sends gradients into the critic's parameters: the loop must not let them leak.
            loss = F.mse_loss(fake, x) + 0.01 * F.mse_loss(self.teacher(fake), self.teacher(x))
            loss = loss + 0.1 * F.softplus(-self.critic(fake)).mean()
        else:
            real = x + 0.1 * torch.randn_like(x)
            loss = F.softplus(-self.critic(real)).mean() + F.softplus(self.critic(fake.detach())).mean()
        return loss, {"fake_mean": float(fake.detach().mean())}

    def ema_network(self) -> nn.Module:
        return self.student

    def export_spec(self) -> StudentSpec:
        return StudentSpec(method=self.name, title="Toy generator", trained="a toy GAN-like objective",
                           networks=[self.student], scheduler=self.family.pipe.scheduler,
                           sampling={"num_inference_steps": 1}, guidance_scale=1.0, from_teacher=False)


def weights_hash(method: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(method.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def sleep_in_checkpoint_write(spec: str) -> None:
    """``SECONDS@STEP``: make the write of checkpoint STEP sleep after its state files, before its COMPLETE marker."""
    from stepdistill.loop import checkpoint

    seconds, step = spec.split("@")
    fsync_tree = checkpoint.fsync_tree

    def sleepy_fsync_tree(root: Path) -> None:
        fsync_tree(root)
        if Path(root).name == f"{checkpoint.TMP_PREFIX}{checkpoint.checkpoint_name(int(step))}":
            time.sleep(float(seconds))

    checkpoint.fsync_tree = sleepy_fsync_tree


def main(argv: list[str] | None = None) -> int:
    """``python tests/_toy_method.py [--config X] --out Y [key=value ...]``: train the toy, return an exit code."""
    import argparse

    from stepdistill.errors import UserError
    from stepdistill.loop import train
    from stepdistill.trainers import load_config

    parser = argparse.ArgumentParser(prog="_toy_method.py")
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        train(load_config(args.config, args.overrides), args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from stepdistill.trainers import METHODS

    METHODS["toy"] = "_toy_method:ToyMethod"
    if os.environ.get("TOY_CHECKPOINT_SLEEP"):
        sleep_in_checkpoint_write(os.environ["TOY_CHECKPOINT_SLEEP"])
    code = main()
    if code == 0 and os.environ.get("TOY_HASH_DIR"):
        import _toy_method  # the registry's copy of this module, not __main__

        rank = os.environ.get("RANK", "0")
        Path(os.environ["TOY_HASH_DIR"], f"rank{rank}.txt").write_text(weights_hash(_toy_method.ToyMethod.last))
    sys.exit(code)
