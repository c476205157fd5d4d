"""The method contract: what the loop hands a method (:class:`Setup`), what a method declares (:class:`Phase`, its
student as a :class:`~stepdistill.pipelines.export.StudentSpec`) and what it computes (numbered losses).

A method is composed over the networks it is given: the loop builds the setup (the teacher's model family, the frozen
teacher as a Denoiser, the world, a description of the data) and passes it with the method's own config only. A method
never reads the run config, the environment, the data source, an optimizer or the accelerator; the loop owns those
(``stepdistill.loop``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from stepdistill.batch import Batch
from stepdistill.denoiser import Denoiser
from stepdistill.pipelines.export import StudentSpec
from stepdistill.pipelines.families import Family
from stepdistill.trajectories import TrajectorySpec


@dataclass(frozen=True)
class World:
    """The processes of a run: this one's rank and their number."""

    rank: int = 0
    size: int = 1


@dataclass
class DataInfo:
    """What a method may know of its data before it trains (the loop reads the data; a method gets this).

    Args:
        source: the data source as the config names it (for messages).
        has_images: the items carry images.
        prompts: every prompt of the data in index order (captions, or a prompt file), or None.
        trajectories: the header of a trajectory folder, or None.
        state_shape: the shape of one state of a trajectory folder (from its shards), or None.
    """

    source: str = "digits16"
    has_images: bool = True
    prompts: list[str] | None = None
    trajectories: TrajectorySpec | None = None
    state_shape: tuple[int, ...] | None = None


@dataclass
class Setup:
    """What the loop builds for a method and hands it.

    Args:
        family: the teacher pipeline's model family (None for a method that trains a network from scratch).
        teacher: the frozen teacher network as a Denoiser on its schedule (None likewise).
        teacher_name: the teacher as the config names it (exports record it).
        world: the processes of the run.
        data: what the data holds.
        max_steps: the run's length in loop steps (progressive schedules end at it).
    """

    family: Family | None
    teacher: Denoiser | None
    teacher_name: str = "digits16"
    world: World = field(default_factory=World)
    data: DataInfo = field(default_factory=DataInfo)
    max_steps: int = 1000


@dataclass
class Phase:
    """One optimizer's worth of training.

    Args:
        name: key of the phase's optimizer config (``optim.<name>``).
        params: the parameters this phase updates (nothing else gets an update from its loss).
        every: update interval; the phase runs on loop steps where ``step % every == 0``.
        cond: its batches carry the items' conditioning (``Batch.cond`` / ``uncond``).
        real: its batches carry the items' real images in the networks' space (``Batch.real``).
        parts: for parameters split between groups of ranks (several students, each trained by its own ranks):
            ``[(parameters, ranks), ...]``. The loop synchronises a part's gradients among its ranks only and copies
            each part (weights, optimizer state, EMA) from its first rank to all before it saves, samples or
            exports. None: every rank trains every parameter.
    """

    name: str
    params: list[nn.Parameter]
    every: int = 1
    cond: bool = True
    real: bool = False
    parts: list[tuple[list[nn.Parameter], list[int]]] | None = None


class Method(nn.Module):
    """Base class of a training method. Subclasses set ``name``, ``Config`` (the dataclass of ``method_args``) and
    ``phase_names``, and write ``__init__(setup, cfg)``, :meth:`phases`, :meth:`loss` and :meth:`export_spec`.

    The networks a method trains are its registered submodules: the loop checkpoints their trainable parameters and
    persistent buffers under the method's names, and moves them to the device.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    # Names of the phases ``phases()`` returns, in order: the ``optim.<name>`` sections a config may hold, known
    # before any network is built (config checks, ``config show``, ``train --dry-run``).
    phase_names: ClassVar[tuple[str, ...]] = ()
    # Whether the method distils a teacher (False: it trains a network from scratch; its setup has no teacher).
    needs_teacher: ClassVar[bool] = True
    # method_args keys a run may change when it continues as a new stage (``train --allow-changes``): values that
    # weigh or shape the losses but leave every checkpointed state (networks, optimizers) as it is.
    stage_changes: ClassVar[tuple[str, ...]] = ()
    # Whether the method trains under ``train.sharding: fsdp2``: its networks must be used through their forward
    # only, and nothing may read a trainable network's weights directly (a consistency target copied from the
    # student's weights does).
    shardable: ClassVar[bool] = False
    # Why not, for the error (its end names the fix).
    not_shardable_because: ClassVar[str] = ("it reads its trainable weights outside the networks' forward; use "
                                            "train.sharding=none")
    # Why the method needs real images, for the error when the data has none ("" = it asks for them only through a
    # phase's ``real``; then the phase's name is given).
    images_needed_for: ClassVar[str] = ""

    def __init__(self, setup: Setup, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.world = setup.world
        self.family = setup.family
        self.teacher_name = setup.teacher_name

    @classmethod
    def check_stage_change(cls, saved: dict[str, Any], cfg: Any, lr_schedules: dict[str, str]) -> None:
        """Raise ConfigError if continuing a run saved with method_args ``saved`` (as a dict) under ``cfg`` (the
        new method config; ``lr_schedules``: each phase's new LR schedule name) would change what its checkpoints
        hold, although only ``stage_changes`` keys differ."""

    # --- what the loop asks of a method -------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of ``phase`` at loop step ``step`` on ``batch``, and detached float logs."""
        raise NotImplementedError

    def ema_network(self) -> nn.Module | None:
        """The network whose EMA is kept (and exported) when ``train.ema_decay > 0``; None for no EMA."""
        return None

    def export_spec(self) -> StudentSpec:
        """The trained student as the export, sample grid and model card need it."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.parameters())
