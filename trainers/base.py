"""The Method contract every distillation method implements; the loop (loop.py) is the only thing that trains.

A method owns its networks (frozen teacher, student, critics), its timestep sampling and its losses. It declares
phases, each with the parameters it updates and its update interval; ``loss(phase, batch, step)`` returns a scalar
loss and detached logs. It never calls an optimizer, the accelerator, a logger or a progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


@dataclass
class Phase:
    """One optimizer's worth of training.

    Args:
        name: key of the phase's optimizer config in ``RunConfig.optim``.
        params: the parameters this phase updates (nothing else gets gradients from its loss).
        every: update interval; the phase runs on loop steps where ``step % every == 0``.
    """

    name: str
    params: list[nn.Parameter]
    every: int = 1


class Method(nn.Module):
    """Base class of a training method. Subclasses set ``name`` and ``Config`` (a dataclass of method_args).

    The loop calls the method through ``forward(phase, batch, step)`` so that data-parallel wrappers see every
    network call; ``forward`` just dispatches to :meth:`loss`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    # Names of the phases ``phases()`` returns, in order: the ``optim.<name>`` sections a config may hold, known
    # before any network is built (config checks, ``config show``, ``train --dry-run``).
    phase_names: ClassVar[tuple[str, ...]] = ()
    # Whether the method trains on a data source (False for data-free methods fed by a prompt file or labels only).
    needs_data: ClassVar[bool] = True
    # method_args keys a run may change when it continues as a new stage (``train --allow-changes``): values that
    # weigh or shape the losses but leave every checkpointed state (networks, optimizers) as it is.
    stage_changes: ClassVar[tuple[str, ...]] = ()
    # Whether the method trains under ``train.sharding: fsdp2`` (trainers/sharding.py): its networks must be used
    # through their forward only, and nothing may read a trainable network's weights directly (a consistency
    # target copied from the student's weights does).
    shardable: ClassVar[bool] = False

    def __init__(self, run_config: Any):
        super().__init__()
        self.run_config = run_config
        self.cfg = run_config.method_args

    @classmethod
    def check_stage_change(cls, saved: dict[str, Any], cfg: Any) -> None:
        """Raise ConfigError if continuing a run saved with config ``saved`` (flat dotted keys) under ``cfg`` would
        change what its checkpoints hold, although only ``stage_changes`` keys differ."""

    # --- what the loop asks of a method -------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def forward(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(phase, batch, step)

    def ema_network(self) -> nn.Module | None:
        """The network whose EMA is kept (and exported) when ``train.ema_decay > 0``; None for no EMA."""
        return None

    @torch.no_grad()
    def sample_grid(self, num: int, seed: int) -> np.ndarray:
        """``num`` samples as uint8 NHWC for the periodic sample grid."""
        raise NotImplementedError

    def export(self, out_dir: Path) -> None:
        """Write the trained student as a loadable pipeline folder."""
        raise NotImplementedError
