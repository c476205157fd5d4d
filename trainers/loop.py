"""The one training loop: every method trains through :func:`train`.

What to do with the run folder is decided in :mod:`.run_folder`, what a checkpoint holds in :mod:`.checkpoint`,
batches and seeds come from :mod:`.data_stream`; this module is the step loop around them.

The loop owns everything a :class:`~stepdistill.trainers.base.Method` must not: the accelerator (devices, DDP/FSDP,
mixed precision), one AdamW + LR schedule per phase, gradient accumulation, clipping, the EMA, exact resume from
atomic checkpoints, logging (accelerate trackers + ``logs.jsonl``), the progress bar, sample grids and the export.

Run folder::

    out_dir/
      config.yaml              resolved RunConfig (what resume compares against)
      config_changes.jsonl     the settings a resumed run changed (--allow-changes), with the step (if any)
      logs.jsonl               one JSON object per logged step
      tensorboard/             accelerate tracker output (unless train.tracker == "none")
      samples/step-N.png       sample grids (every train.sample_every steps and at the end)
      checkpoints/step-N/      accelerate state + loop_state.json + COMPLETE; checkpoints/latest names the newest
      pipeline/                the exported student (EMA weights when train.ema_decay > 0)

Randomness: before every micro-batch of every phase the global RNGs are reseeded from
``(seed, rank, step, phase index, micro-batch index)``. Each step is therefore a pure function of the weights,
optimizer states and data position in the checkpoint, which is what makes resume bit-exact, and every rank draws
its own noise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from stepdistill.config import (
    OptimConfig,
    RunConfig,
    check_optim_phases,
    check_values,
    resolve_launch_settings,
    save_config,
    to_dict,
)
from stepdistill.data import build_dataset
from stepdistill.errors import ConfigError, DataError, UserError, first_line
from stepdistill.utils import replace_dir, save_grid

from . import checkpoint as ckpt
from . import get_method, sharding
from .base import Method, Phase
from .data_stream import STEP_STREAM, SeededItems, ShardedInfiniteBatchSampler, derive_seed, seed_everything, to_device
from .run_folder import CHANGES_FILE, flatten, plan_out_dir, shown, truncate_logs, write_log_line

# Samples in the periodic grid (8 x 8).
SAMPLE_GRID_SIZE = 64
def _ema_phase(phases: list[Phase], ema_params: list[torch.nn.Parameter]) -> str:
    """The phase that trains the EMA network (all its trainable parameters are that phase's)."""
    trained = {id(p) for p in ema_params if p.requires_grad}
    for phase in phases:
        if trained and trained <= {id(p) for p in phase.params}:
            return phase.name
    raise ValueError("the method's ema_network() is not trained by a single phase")


def _enable_gradient_checkpointing(method: Method) -> None:
    """Switch on diffusers' gradient checkpointing in every network of ``method`` that has trainable parameters."""
    from diffusers import ModelMixin

    nets = [m for m in method.modules() if isinstance(m, ModelMixin) and any(p.requires_grad for p in m.parameters())]
    try:
        if not nets:
            raise ValueError
        for m in nets:
            m.enable_gradient_checkpointing()  # a ValueError where the network does not support it
    except ValueError:
        raise ConfigError(f"train.gradient_checkpointing: method '{method.name}' has no trainable diffusers network "
                          "that supports it; set it to false") from None


def _accelerate_launch_processes() -> int | None:
    """The ``--num_processes`` of an ``accelerate launch`` that started this process directly (its simple
    launcher, used for ``--cpu``, runs one process whatever was asked), or None; Linux only (reads /proc)."""
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    if "launch" not in args or not any(Path(a).name == "accelerate" for a in args[:3]):
        return None
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--num_processes=") else (
            args[i + 1] if a == "--num_processes" and i + 1 < len(args) else None)
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def _apply_config_lrs(optim_cfgs: list[OptimConfig], schedulers: list) -> None:
    """After a resume, give every phase whose restored base learning rate differs from its config the new one.

    The restored LR scheduler state holds the base rate the checkpoint was written with (``base_lrs``), which would
    silently win over the config. This compares with the checkpoint rather than with config.yaml, so a new rate also
    holds when the stage that introduced it was interrupted before its first checkpoint. The schedule's shape
    (warm-up, decay, its position) is kept and only rescaled.
    """
    for oc, sched in zip(optim_cfgs, schedulers):
        inner = getattr(sched, "scheduler", sched)  # accelerate's AcceleratedScheduler wraps a LambdaLR
        if all(b == oc.lr for b in inner.base_lrs):
            continue
        inner.base_lrs = [oc.lr] * len(inner.base_lrs)
        lrs = [oc.lr * lam(inner.last_epoch) for lam in inner.lr_lambdas]
        for group, lr in zip(inner.optimizer.param_groups, lrs):
            group["lr"], group["initial_lr"] = lr, oc.lr
        inner._last_lr = lrs


def _validate_phases(phases: list[Phase], cfg: RunConfig) -> list[OptimConfig]:
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
    declared = list(get_method(cfg.method).phase_names)
    if names != declared:
        raise ValueError(f"method '{cfg.method}' declares phase_names {declared} but phases() returns {names}")
    check_optim_phases(cfg, names)
    return [cfg.optim.get(n, OptimConfig()) for n in names]


def _make_scheduler(oc: OptimConfig, phase: Phase, optimizer: torch.optim.Optimizer, max_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    # The schedule counts this phase's optimizer updates, not loop steps.
    updates = math.ceil(max_steps / phase.every)
    return get_scheduler(oc.lr_schedule, optimizer, num_warmup_steps=oc.warmup_steps, num_training_steps=updates)


# --- outputs -----------------------------------------------------------------------------------------------------
class _EMASwap:
    """Context manager that swaps the EMA weights into ``params`` and restores the trained ones afterwards."""

    def __init__(self, ema: Any, params: list[torch.nn.Parameter]):
        self.ema, self.params = ema, params

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc: Any) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)


def _no_sync(accelerator: Any, model: torch.nn.Module, units: list[torch.nn.Module]) -> Any:
    """No gradient reduction for a micro-batch that is not the update's last (DDP's no_sync, FSDP2's own)."""
    return sharding.no_gradient_sync(units) if units else accelerator.no_sync(model)


class _Meter:
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


def _stop_if_not_finite(accelerator: Any, loss: torch.Tensor, phase: str, step: int, resume_point: list[int]) -> None:
    """Stop every process with a one-line error when any process's loss is NaN or infinite (before the update, so
    no non-finite value reaches the weights, a checkpoint or the export)."""
    bad = accelerator.reduce((~torch.isfinite(loss.detach().float())).float().reshape(1), reduction="sum")
    if bad.item() > 0:
        where = (f"its last checkpoint is step {resume_point[0]}: rerun with a lower learning rate and "
                 "--allow-changes to continue from it" if resume_point[0] else "no checkpoint was written")
        raise UserError(f"the {phase} loss is {float(loss.detach())} at step {step + 1}: training diverged, nothing "
                        f"was exported; {where}")


# --- the loop ----------------------------------------------------------------------------------------------------
def train(cfg: RunConfig, out_dir: str | Path, resume: bool = True, overwrite: bool = False,
          allow_changes: bool = False) -> Path:
    """Train ``cfg.method`` as configured and write the run folder (see the module docstring).

    Works unchanged under ``accelerate launch`` / ``torch.distributed.run`` on any number of processes: every
    process calls ``train`` with the same arguments, and only the main process writes files other than its
    own RNG state.

    Args:
        cfg: the resolved run configuration.
        out_dir: the run folder.
        resume: continue the run in ``out_dir`` if it holds one with the same config (``train.max_steps`` and the
            other :data:`RESUMABLE_CHANGES` may differ), from its newest complete checkpoint.
        overwrite: delete ``out_dir`` (once the method has been built) and start afresh; wins over ``resume``.
        allow_changes: resume even though learning rates or the method's ``stage_changes`` keys differ from the
            run's config: continue from its last checkpoint with the new values (a new training stage, appended
            to ``config_changes.jsonl``).

    Returns:
        The run folder.

    Raises:
        UserError: ``out_dir`` holds something that can neither be resumed nor (without ``overwrite``) replaced, or
            the config names an optimizer for a phase the method does not have.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, is_tensorboard_available
    from tqdm.auto import tqdm

    out = Path(out_dir)
    tc = cfg.train
    resolve_launch_settings(cfg)
    check_values(cfg)  # also for configs built in code, not through load_config
    # Every process decides from the same untouched folder; nothing is written before all have decided.
    mode, changes = plan_out_dir(cfg, out, resume, overwrite, allow_changes)

    has_device = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    if tc.mixed_precision == "fp16" and not has_device:
        raise ConfigError("config key 'train.mixed_precision' is 'fp16', which needs a GPU; use 'bf16' or 'no' on "
                          "the CPU")
    for key, value in (("mixed_precision", tc.mixed_precision), ("teacher_dtype", tc.teacher_dtype)):
        if value in ("bf16", "bfloat16") and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"config key 'train.{key}' is '{value}', which this GPU does not support; use float16 "
                              "or no reduced precision")
    if tc.teacher_dtype == "float16" and not has_device:
        raise ConfigError("config key 'train.teacher_dtype' is 'float16', which needs a GPU; use 'bfloat16' or "
                          "'float32' on the CPU")
    # Same seed on every rank for construction, so all ranks build identical weights (DDP also broadcasts them).
    seed_everything(cfg.seed)
    method: Method = get_method(cfg.method)(cfg)
    if tc.ema_decay > 0 and method.ema_network() is None:
        raise ConfigError(f"train.ema_decay={tc.ema_decay}: method '{cfg.method}' keeps no EMA of its student in this "
                          "configuration (e.g. a LoRA student, whose target EMA is method_args.target_ema_decay); set "
                          "train.ema_decay=0")
    if tc.gradient_checkpointing:
        _enable_gradient_checkpointing(method)
    phases = method.phases()
    optim_cfgs = _validate_phases(phases, cfg)
    # Data (also for data-free methods: their prompt file or labels), still before anything is written, so that
    # a bad data source cannot cost an --overwrite'd folder.
    dc = cfg.data
    dataset = build_dataset(dc.source, dc.resolution, dc.center_crop, dc.random_flip, dc.image_column,
                            dc.caption_column)
    try:
        dataset[0]  # the first item decodes (a corrupt file fails here, not after the run folder exists)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding error of the user's data is reported as one line
        raise DataError(f"data source '{dc.source}': its first item cannot be read ({first_line(e)})") from None

    log_with = None
    if tc.tracker == "tensorboard":
        if is_tensorboard_available():
            log_with = "tensorboard"
        else:
            print("warning: tensorboard is not installed; logging to logs.jsonl only", file=sys.stderr)
    # Each phase's loss reaches only part of the trainable parameters, so DDP must not wait for the rest. Buffers
    # are never broadcast: every rank computes the same ones (a consistency target, its step counter), and a
    # broadcast of a full target network in every forward would cost as much as the gradient all-reduce.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=len(phases) > 1, broadcast_buffers=False)]
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        accelerator = Accelerator(
            # accelerate ignores a torchrun/launcher world on a machine without an accelerator unless told to use
            # the CPU, and would then run WORLD_SIZE independent copies writing into the same folder.
            cpu=launched > 1 and not has_device,
            mixed_precision=tc.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)),
            # Our schedules count optimizer updates of one phase; by default accelerate steps a prepared scheduler
            # num_processes times per call, which would tie the schedule to the world size.
            step_scheduler_with_optimizer=False,
            kwargs_handlers=handlers,
        )
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        # accelerate keeps one mixed-precision setting per process (its state is process-wide).
        raise UserError(f"this process already ran accelerate with another mixed precision than "
                        f"train.mixed_precision={tc.mixed_precision!r}; run each setting in a new process") from None
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"accelerate was launched with {accelerator.distributed_type.value}, which stepdistill does "
                        "not use: launch with --multi_gpu and set train.sharding=fsdp2 to shard (stepdistill's own "
                        "FSDP2 path, trainable networks only)")
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(f"launched as {launched} processes (WORLD_SIZE) but accelerate set up "
                        f"{accelerator.num_processes}; check the accelerate config (on CPU-only machines set "
                        "ACCELERATE_USE_CPU=1)")
    sharded = tc.sharding == "fsdp2"
    units: list[torch.nn.Module] = []
    if sharded:
        if not method.shardable:
            raise ConfigError(f"train.sharding=fsdp2: method '{cfg.method}' cannot be sharded yet (it reads its "
                              "trainable weights outside the networks' forward); use train.sharding=none")
        if tc.mixed_precision == "fp16":
            raise ConfigError("train.sharding=fsdp2 with train.mixed_precision=fp16 needs a sharded gradient "
                              "scaler, which stepdistill lacks; use bf16")
        units = sharding.shard(method, accelerator.device, accelerator.num_processes)
        # accelerate's prepare, which moves a model to the device, is skipped: the replicated parts move here.
        method.to(accelerator.device)
        phases = method.phases()  # the sharded parameters replaced the module's own
        _validate_phases(phases, cfg)
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    asked = _accelerate_launch_processes()
    if main and asked is not None and asked > world:
        print(f"warning: `accelerate launch` was asked for {asked} processes but this run has {world}: its --cpu "
              "launcher starts a single process; for several processes on a CPU-only machine use `accelerate launch "
              "--multi_gpu --num_processes N` or `python -m torch.distributed.run --nproc_per_node N`",
              file=sys.stderr)
    ckpt_dir, log_file = out / "checkpoints", out / "logs.jsonl"
    if main:
        if mode == "restart":
            print(f"replacing the run in '{out}', which stopped before its first checkpoint, by this one "
                  f"({shown(changes)})", file=sys.stderr)
        if mode == "overwrite":
            shutil.rmtree(out)
        elif mode == "restart":  # only the failed start's own files (plan_out_dir checked there is nothing else)
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        if mode == "resume":
            ckpt.remove_partial(ckpt_dir)
        else:
            save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()

    # Optimizers on the phase parameters before prepare (they are the same Parameter objects after it).
    optimizers = [
        torch.optim.AdamW(p.params, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, weight_decay=oc.weight_decay)
        for p, oc in zip(phases, optim_cfgs)
    ]
    schedulers = [_make_scheduler(oc, p, o, tc.max_steps) for p, oc, o in zip(phases, optim_cfgs, optimizers)]
    if sharded:
        # Sharded networks reduce-scatter their own gradients; neither they nor their optimizers may be wrapped
        # by accelerate (its DDP would all-reduce DTensors, it would save each rank's optimizer shard as the whole).
        model, schedulers = method, list(accelerator.prepare(*schedulers))
    else:
        prepared = accelerator.prepare(method, *optimizers, *schedulers)
        model, optimizers = prepared[0], list(prepared[1 : 1 + len(phases)])
        schedulers = list(prepared[1 + len(phases) :])

    # Checkpoints hold the trained state only, under the unwrapped method's parameter names, whatever the process
    # count (so a run resumes on another number of processes). Frozen parameters (the teacher, LoRA base weights)
    # are rebuilt by the method's constructor and never saved: a checkpoint holds what training changes, not a copy
    # of a multi-GB teacher. accelerate's own model saving is wrapped by its state hooks because it would save
    # every parameter and load by the names of the wrapped (DDP) model. FSDP/DeepSpeed keep accelerate's format.
    # Sharded runs write the same model.safetensors themselves (gathered in full, see checkpoint() below).
    frozen = {n for n, p in method.named_parameters(remove_duplicate=False) if not p.requires_grad}
    accelerator.register_save_state_pre_hook(lambda models, weights, _: ckpt.keep_trained(weights, frozen))
    load = (lambda state: sharding.load_full_state(method, state)) if sharded else None
    accelerator.register_load_state_pre_hook(
        lambda models, folder: ckpt.load_trained(method, models, folder, frozen, load))

    # The EMA is saved by the loop as safetensors (ema.safetensors), not registered with accelerate, which would
    # pickle it and load the pickle with weights_only=False: a copied run folder could then run code on resume.
    # The EMA belongs to the phase that trains its network and steps right after that phase's optimizer step (so
    # its decay is per update of the network, whatever the other phases' update ratio).
    ema, ema_params, ema_phase = None, [], None
    if tc.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema_params = list(method.ema_network().parameters())
        ema_phase = _ema_phase(phases, ema_params)
        ema = EMAModel(ema_params, decay=tc.ema_decay, use_ema_warmup=tc.ema_warmup)

    # Resume. The loop keeps its own data position instead of using accelerate's prepared dataloader +
    # skip_first_batches: skipping re-iterates (and re-loads) every consumed batch, and accelerate's sharding of a
    # custom sampler is hard to make exact; our sampler jumps straight to batch k of this rank.
    start, consumed = 0, 0
    resume_from = None
    if mode == "resume":
        def load_sharded(folder: Path) -> None:
            sharding.load_optimizers(method, optimizers, folder)
            if ema is not None:  # loaded in full: cut into this process's shards of the parameters
                ema.shadow_params = sharding.shard_like(ema.shadow_params, ema_params)

        resume_from, state = ckpt.load_newest_checkpoint(accelerator, ckpt_dir, ema, main,
                                                         load_sharded if sharded else None)
    if resume_from is not None:
        if state.get("world_size", world) != world and main:
            print(f"warning: resuming a {state['world_size']}-process run on {world} processes; the data order "
                  "and per-rank noise will differ from an uninterrupted run", file=sys.stderr)
        if ema is not None:
            ema.to(accelerator.device)  # EMAModel.load_state_dict keeps the shadow weights on the CPU
        start, consumed = int(state["step"]), int(state["batches_consumed"])
        if main:
            print(f"resuming from {resume_from} (step {start})", file=sys.stderr)
        _apply_config_lrs(optim_cfgs, schedulers)
    if main and mode == "resume":
        truncate_logs(log_file, start)
        # Only now (the checkpoint loaded): config.yaml takes the new values of a new stage.
        save_config(cfg, out / "config.yaml")
    if main and changes and resume_from is not None:  # without a checkpoint the run simply starts afresh
        print(f"continuing at step {start} with changed settings: {shown(changes)}", file=sys.stderr)
        record = {"step": start, "changes": {k: {"from": a, "to": b} for k, a, b in changes}}
        with open(out / CHANGES_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.wait_for_everyone()

    sampler = ShardedInfiniteBatchSampler(len(dataset), dc.batch_size, cfg.seed, rank, world, start=consumed)
    loader = DataLoader(
        SeededItems(dataset),
        batch_sampler=sampler,
        num_workers=dc.num_workers,
        collate_fn=default_collate,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=dc.num_workers > 0,
    )
    batches = iter(loader)

    if log_with is not None:
        # TensorBoard's hparams accept scalars and strings only.
        flat = flatten(to_dict(cfg))
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
        accelerator.init_trackers("tensorboard", config=hparams)

    def sample(step: int) -> None:
        # Every process samples (with FSDP all ranks must take part in the forward passes); one writes the file.
        for u in units:
            # A root unit keeps its gathered weights after a no-grad forward; the EMA must go into the shards.
            u.reshard()
        with _EMASwap(ema, ema_params):
            images = method.sample_grid(SAMPLE_GRID_SIZE, cfg.seed)
        if main:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            save_grid(np.asarray(images), out / "samples" / f"step-{step}.png")

    def checkpoint(step: int) -> None:
        state = {"step": step, "batches_consumed": consumed, "world_size": world, "phases": [p.name for p in phases]}
        if sharded:  # gathered in full by every process, written by the main one
            weights = sharding.gather_units(method)
            trained = {k: v for k, v in weights.items() if k not in frozen}
            # The replicated rest of what an unsharded checkpoint holds (buffers outside the units, e.g. a teacher
            # network's persistent position embeddings), so both formats hold the same keys.
            trained.update(sharding.replicated_state(method, frozen, trained))
            optim_states = sharding.gather_optimizers(method, optimizers)
            shadow = sharding.full_ema(ema.shadow_params) if ema is not None else None

            def extra(folder: Path) -> None:
                ckpt.save_trained(trained, folder)
                sharding.write_optimizers(optim_states, folder)
                if ema is not None:
                    ckpt.save_ema(ema, folder, shadow)
        else:
            extra = (lambda folder: ckpt.save_ema(ema, folder)) if ema is not None else None
        ckpt.save_checkpoint(accelerator, ckpt_dir, step, state, tc.keep_checkpoints, write_extra=extra)
        resume_point[0] = step

    meters = {p.name: _Meter() for p in phases}
    ga = tc.grad_accum
    resume_point = [start]  # the newest checkpoint's step, for the divergence message
    bar = tqdm(total=tc.max_steps, initial=start, disable=not main, desc=f"train {cfg.method}", dynamic_ncols=True)
    t_log, consumed_at_log, t0 = time.perf_counter(), consumed, time.time()
    for step in range(start, tc.max_steps):
        for pi, (phase, opt, sched, oc) in enumerate(zip(phases, optimizers, schedulers, optim_cfgs)):
            if step % phase.every:
                continue
            for mi in range(ga):
                batch = to_device(next(batches), accelerator.device)
                consumed += 1
                seed_everything(derive_seed(STEP_STREAM, cfg.seed, rank, step, pi, mi))
                # Gradients are all-reduced only on the last micro-batch of the update.
                with _no_sync(accelerator, model, units) if mi < ga - 1 else nullcontext(), \
                        accelerator.autocast() if sharded else nullcontext():  # prepared models autocast themselves
                    loss, logs = model(phase.name, batch, step)
                    _stop_if_not_finite(accelerator, loss, phase.name, step, resume_point)
                    accelerator.backward(loss / ga)
                meters[phase.name].add(loss, logs)
            if oc.max_grad_norm > 0:
                accelerator.clip_grad_norm_(phase.params, oc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if phase.name == ema_phase:
                ema.step(ema_params)
            # A phase's loss may also reach other phases' trainable parameters (e.g. a generator loss through the
            # critic); those gradients must not leak into the next phase's update.
            method.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)

        if done % max(1, tc.log_every) == 0 or done == tc.max_steps:
            names, local = [], []
            for name, m in meters.items():
                if m.count:
                    names.append(f"{name}/loss")
                    local.append(m.loss_sum / m.count)
                    for k, v in sorted(m.logs.items()):
                        names.append(f"{name}/{k}")
                        local.append(torch.tensor(v / m.count, device=accelerator.device))
            values = accelerator.reduce(torch.stack(local), reduction="mean").tolist() if local else []
            now = time.perf_counter()
            row: dict[str, Any] = {"step": done, **dict(zip(names, values))}
            for p, s in zip(phases, schedulers):
                row[f"lr/{p.name}"] = s.get_last_lr()[0]
            row["samples_per_sec"] = (consumed - consumed_at_log) * dc.batch_size * world / max(now - t_log, 1e-9)
            row["wall_time"] = time.time() - t0
            t_log, consumed_at_log = now, consumed
            meters = {p.name: _Meter() for p in phases}
            if main:
                write_log_line(log_file, row)
                bar.set_postfix({k[: -len("/loss")]: f"{v:.4g}" for k, v in row.items() if k.endswith("/loss")})
            if log_with is not None:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=done)

        if tc.sample_every > 0 and done % tc.sample_every == 0 and done != tc.max_steps:
            sample(done)
        if tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0 and done != tc.max_steps:
            checkpoint(done)
    bar.close()

    final = ckpt.checkpoint_name(tc.max_steps)
    if not (resume_from is not None and resume_from.name == final):  # already saved by the run we resumed
        checkpoint(tc.max_steps)
    sample(tc.max_steps)
    with _EMASwap(ema, ema_params):
        full = sharding.gather_units(method) if sharded else {}
        if main:
            with sharding.full_weights(method, full) if sharded else nullcontext():
                # Written beside and swapped in: a kill never leaves a half-written pipeline/.
                replace_dir(out / "pipeline", accelerator.unwrap_model(model).export)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


