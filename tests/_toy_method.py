"""A tiny two-phase Method on digits16 for the loop tests (a generator and a critic, both MLPs, plus a frozen layer).

Run as a script it is the loop's CLI with the toy registered, which is what the tests launch in subprocesses
(also under ``torch.distributed.run``)::

    python tests/_toy_method.py --out RUN method=toy train.max_steps=20 ...

Test-only environment variables: ``TOY_SLEEP`` (seconds slept in every loss call, so a test can kill a run part-way)
and ``TOY_HASH_DIR`` (after training, each rank writes the sha256 of its final weights to ``rank{RANK}.txt``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.data import to_uint8
from stepdistill.trainers.base import Method, Phase

Z_DIM = 16


@dataclass
class ToyConfig:
    # Width of the hidden layers.
    hidden: int = 32
    # Update interval of the generator phase (the critic updates every step).
    student_every: int = 2


class ToyMethod(Method):
    """Generator ``student`` (noise + label -> 16x16 image) against a ``critic``; a frozen ``teacher`` layer."""

    name = "toy"
    Config = ToyConfig
    phase_names = ("student", "critic")
    # The most recently built instance, so a script can inspect the weights after train() returns.
    last: ToyMethod | None = None

    def __init__(self, run_config):
        super().__init__(run_config)
        h = self.cfg.hidden
        self.teacher = nn.Linear(256, 256).requires_grad_(False)
        self.student = nn.Sequential(nn.Linear(Z_DIM + 10, h), nn.SiLU(), nn.Dropout(0.1), nn.Linear(h, 256))
        self.critic = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, 1))
        ToyMethod.last = self

    def phases(self) -> list[Phase]:
        return [
            Phase("student", list(self.student.parameters()), every=self.cfg.student_every),
            Phase("critic", list(self.critic.parameters())),
        ]

    def generate(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.student(torch.cat([z, F.one_hot(labels, 10).to(z.dtype)], 1)))

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if os.environ.get("TOY_SLEEP"):
            time.sleep(float(os.environ["TOY_SLEEP"]))
        x, y = batch["image"].flatten(1), batch["label"]
        fake = self.generate(y, torch.randn(len(y), Z_DIM, device=x.device))
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

    @torch.no_grad()
    def sample_grid(self, num: int, seed: int) -> np.ndarray:
        was_training = self.student.training
        self.student.eval()
        device = next(self.student.parameters()).device
        z = torch.randn(num, Z_DIM, generator=torch.Generator().manual_seed(seed)).to(device)
        images = self.generate(torch.arange(num, device=device) % 10, z).view(num, 1, 16, 16)
        self.student.train(was_training)
        return to_uint8(images)

    def export(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.student.state_dict().items()},
                  str(out_dir / "student.safetensors"))


def weights_hash(method: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(method.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``python tests/_toy_method.py [--config X] --out Y [key=value ...]``: train the toy, return an exit code."""
    import argparse

    from stepdistill.config import load_config
    from stepdistill.errors import UserError
    from stepdistill.trainers.loop import train

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
    code = main()
    if code == 0 and os.environ.get("TOY_HASH_DIR"):
        import _toy_method  # the registry's copy of this module, not __main__

        rank = os.environ.get("RANK", "0")
        Path(os.environ["TOY_HASH_DIR"], f"rank{rank}.txt").write_text(weights_hash(_toy_method.ToyMethod.last))
    sys.exit(code)
