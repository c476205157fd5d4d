"""One phase of training as the loop runs it: its optimizer and LR schedule, its own data-parallel synchronisation
(DDP over exactly the parameters it trains, among the ranks that train them), its update (clipping, step, EMA), and
the copying of split parameters (one student per group of ranks) to every rank before a checkpoint or a sample."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stepdistill.config import OptimConfig, RunConfig, check_optim_phases
from stepdistill.trainers.base import Method, Phase

from .sharding import no_gradient_sync

# AdamW's per-parameter state, copied with a split parameter from the rank that trains it.
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def validate_phases(phases: list[Phase], method: Method, cfg: RunConfig) -> list[OptimConfig]:
    """The optimizer config of each phase, after checking the phases a method declared."""
    names = [p.name for p in phases]
    if not phases or len(set(names)) != len(names):
        raise ValueError(f"method '{cfg.method}' must declare phases with unique names, got {names}")
    seen: set[int] = set()
    for p in phases:
        if p.every < 1 or not p.params:
            raise ValueError(f"phase '{p.name}' of method '{cfg.method}' needs every >= 1 and at least one parameter")
        if any(not q.requires_grad for q in p.params):
            raise ValueError(f"phase '{p.name}' of method '{cfg.method}' lists frozen parameters")
        ids = {id(q) for q in p.params}
        if ids & seen:
            raise ValueError(f"phase '{p.name}' of method '{cfg.method}' shares parameters with another phase")
        seen |= ids
    if names != list(method.phase_names):
        raise ValueError(f"method '{cfg.method}' declares phase_names {list(method.phase_names)} but phases() "
                         f"returns {names}")
    check_optim_phases(cfg, names)
    return [cfg.optim.get(n, OptimConfig()) for n in names]


def make_optimizer(phase: Phase, oc: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(phase.params, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps,
                             weight_decay=oc.weight_decay)


def make_scheduler(oc: OptimConfig, phase: Phase, optimizer: torch.optim.Optimizer, max_steps: int) -> Any:
    # The schedule counts this phase's optimizer updates, not loop steps.
    updates = math.ceil(max_steps / phase.every)
    return get_scheduler(oc.lr_schedule, optimizer, num_warmup_steps=oc.warmup_steps, num_training_steps=updates)


def apply_config_lrs(optim_cfgs: list[OptimConfig], schedulers: list) -> None:
    """After a resume, give every phase whose restored base learning rate differs from its config the new one.

    The restored LR scheduler state holds the base rate the checkpoint was written with (``base_lrs``), which would
    silently win over the config. This compares with the checkpoint rather than with config.yaml, so a new rate also
    holds when the stage that introduced it was interrupted before its first checkpoint. The schedule's shape
    (warm-up, decay, its position) is kept and only rescaled; the rate in force is the param groups' ``lr`` (what the
    loop logs), the next scheduler step computes it from ``base_lrs`` again.
    """
    for oc, sched in zip(optim_cfgs, schedulers):
        inner = getattr(sched, "scheduler", sched)  # accelerate's AcceleratedScheduler wraps a LambdaLR
        if all(b == oc.lr for b in inner.base_lrs):
            continue
        inner.base_lrs = [oc.lr] * len(inner.base_lrs)
        for group, lam in zip(inner.optimizer.param_groups, inner.lr_lambdas):
            group["lr"], group["initial_lr"] = oc.lr * lam(inner.last_epoch), oc.lr


def ema_phase(phases: list[Phase], ema_params: list[nn.Parameter]) -> str:
    """The phase that trains the EMA network (all its trainable parameters are that phase's)."""
    trained = {id(p) for p in ema_params if p.requires_grad}
    for phase in phases:
        if trained and trained <= {id(p) for p in phase.params}:
            return phase.name
    raise ValueError("the method's ema_network() is not trained by a single phase")


def my_part(phase: Phase, rank: int) -> tuple[list[nn.Parameter], list[int] | None]:
    """(the parameters this rank trains in ``phase``, the ranks it synchronises them with; None = all)."""
    if phase.parts is None:
        return phase.params, None
    mine = [(params, ranks) for params, ranks in phase.parts if rank in ranks]
    groups = {tuple(ranks) for _, ranks in mine}
    if len(groups) > 1:
        raise ValueError(f"phase '{phase.name}': rank {rank} trains parts of several rank groups {sorted(groups)}")
    return [p for params, _ in mine for p in params], list(groups.pop()) if groups else [rank]


class _PhaseModule(nn.Module):
    """What DDP wraps for one phase: exactly the parameters the phase trains on this rank (registered here, so DDP
    synchronises them and nothing else) and, as its forward, the method's loss of that phase."""

    def __init__(self, method: Method, phase: str, params: list[nn.Parameter]):
        super().__init__()
        self.held = nn.ParameterList(params)
        self.loss = lambda batch, step: method.loss(phase, batch, step)

    def forward(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(batch, step)


class PhaseRunner:
    """One phase in the loop: forward (through its DDP when it has one), no-sync for accumulated micro-batches."""

    def __init__(self, method: Method, phase: Phase, device: torch.device, world: int, rank: int,
                 groups: dict[tuple[int, ...], Any], units: list[nn.Module]):
        self.method, self.phase, self.units, self.ddp = method, phase, units, None
        params, ranks = my_part(phase, rank)
        group_size = world if ranks is None else len(ranks)
        if world > 1 and group_size > 1 and not units:
            ids = [device.index] if device.type == "cuda" else None
            # Buffers are never broadcast: every rank computes the same ones (a consistency target, its step
            # counter). A phase's loss may leave some of its parameters without a gradient (a GAN head on steps
            # without real data), so DDP looks for them.
            self.ddp = DistributedDataParallel(_PhaseModule(method, phase.name, params), device_ids=ids,
                                               process_group=None if ranks is None else groups[tuple(ranks)],
                                               broadcast_buffers=False, find_unused_parameters=True)

    def forward(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ddp is not None:
            return self.ddp(batch, step)
        return self.method.loss(self.phase.name, batch, step)

    def no_sync(self):
        """No gradient reduction for a micro-batch that is not the update's last (DDP's no_sync, FSDP2's own)."""
        if self.units:
            return no_gradient_sync(self.units)
        return self.ddp.no_sync() if self.ddp is not None else nullcontext()


def part_groups(phases: list[Phase], world: int) -> dict[tuple[int, ...], Any]:
    """A process group for every group of ranks that shares a split phase's part (created collectively: every rank
    calls this with the same phases)."""
    groups: dict[tuple[int, ...], Any] = {}
    for phase in phases:
        for _, ranks in phase.parts or []:
            key = tuple(ranks)
            if world > 1 and 1 < len(key) < world and key not in groups:
                groups[key] = dist.new_group(list(key))
            elif len(key) == world:
                groups.setdefault(key, None)
    return groups


@torch.no_grad()
def share_parts(phases: list[Phase], optimizers: list, ema: Any, ema_params: list[nn.Parameter],
                device: torch.device) -> None:
    """Copy every part of the split phases (weights, AdamW state, EMA shadow) from the first rank that trains it to
    all ranks, so that any rank holds every student as trained (collective; a no-op on one process)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    shadow = {id(p): s for p, s in zip(ema_params, ema.shadow_params)} if ema is not None else {}
    for phase, opt in zip(phases, optimizers):
        for params, ranks in phase.parts or []:
            if not ranks:
                continue
            src = ranks[0]
            for p in params:
                _broadcast(p.data, src, device)
                state = opt.state[p]
                flag = torch.tensor([1.0 if state else 0.0], device=device)
                dist.broadcast(flag, src)
                if flag.item():
                    for key in ADAMW_STATE:
                        if key not in state:
                            state[key] = torch.zeros((), dtype=torch.float32) if key == "step" else torch.zeros_like(p)
                        _broadcast(state[key], src, device)
                if id(p) in shadow:
                    _broadcast(shadow[id(p)], src, device)


def _broadcast(t: torch.Tensor, src: int, device: torch.device) -> None:
    """Broadcast ``t`` in place from rank ``src``, through ``device`` (NCCL needs the tensor there)."""
    buf = t.to(device)
    dist.broadcast(buf, src)
    t.copy_(buf)


class EMASwap:
    """Context manager that swaps the EMA weights into ``params`` and restores the trained ones afterwards."""

    def __init__(self, ema: Any, params: list[nn.Parameter]):
        self.ema, self.params = ema, params

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc: Any) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)


class Meter:
    """Sums of a phase's loss and logs since the last log line."""

    def __init__(self):
        self.loss_sum: torch.Tensor | None = None
        self.logs: dict[str, float] = {}
        self.count = 0

    def add(self, loss: torch.Tensor, logs: dict[str, Any]) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        for k, v in (logs or {}).items():
            self.logs[k] = self.logs.get(k, 0.0) + float(v)
        self.count += 1
