"""The one training loop: every method trains through :func:`train`.

What to do with the run folder is decided in :mod:`.run_folder`, what a checkpoint holds in :mod:`.checkpoint`,
batches and seeds come from :mod:`.data_stream`, a phase's optimizer and synchronisation from :mod:`.phases`, the
method from :mod:`.setup`; this module is the step loop around them.

The loop owns everything a :class:`~stepdistill.trainers.base.Method` must not: the accelerator (devices, mixed
precision), data parallelism per phase (DDP over the parameters a phase trains, or FSDP2 with
``train.sharding=fsdp2``), one AdamW + LR schedule per phase, gradient accumulation, clipping, the EMA, exact resume
from atomic checkpoints, logging (accelerate trackers + ``logs.jsonl``), the progress bar, sample grids and the export.

Run folder::

    out_dir/
      config.yaml              resolved RunConfig (what resume compares against)
      config_changes.jsonl     the settings a resumed run changed (--allow-changes), with the step (if any)
      logs.jsonl               one JSON object per logged step
      tensorboard/             accelerate tracker output (unless train.tracker == "none")
      samples/step-N.png       sample grids (every train.sample_every steps and at the end)
      checkpoints/step-N/      accelerate state + model.safetensors + loop_state.json + COMPLETE
      pipeline/                the exported student (EMA weights when train.ema_decay > 0)

Randomness: before every micro-batch of every phase the global RNGs are reseeded from
``(seed, rank, step, phase index, micro-batch index)``. Each step is therefore a pure function of the weights,
optimizer states and data position in the checkpoint, which is what makes resume bit-exact, and every rank draws
its own noise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available
from diffusers import ModelMixin
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from stepdistill.config import RunConfig, check_values, resolve_launch_settings, save_config, to_dict
from stepdistill.data import dataset_has_images
from stepdistill.errors import ConfigError, DataError, UserError, first_line
from stepdistill.files import replace_dir
from stepdistill.images import save_grid
from stepdistill.pipelines.export import export_student, sample_grid
from stepdistill.seeding import derive_seed, seed_everything
from stepdistill.trainers.base import Method, World

from . import checkpoint as ckpt
from . import sharding
from .data_stream import STEP_STREAM, SeededItems, ShardedInfiniteBatchSampler, to_device
from .phases import (
    EMASwap,
    Meter,
    PhaseRunner,
    apply_config_lrs,
    ema_phase,
    make_optimizer,
    make_scheduler,
    part_groups,
    share_parts,
    validate_phases,
)
from .run_folder import CHANGES_FILE, flatten, plan_out_dir, shown, truncate_logs, write_log_line
from .setup import build_method, open_dataset

# Samples in the periodic grid (8 x 8).
SAMPLE_GRID_SIZE = 64


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
            other :data:`~.run_folder.RESUMABLE_CHANGES` may differ), from its newest complete checkpoint.
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
    out, tc, dc = Path(out_dir), cfg.train, cfg.data
    resolve_launch_settings(cfg)
    check_values(cfg)  # also for configs built in code, not through load_config
    # 1. What to do with the run folder, decided by every process from the same untouched folder.
    mode, changes = plan_out_dir(cfg, out, resume, overwrite, allow_changes)
    check_precision(tc)
    accelerator = make_accelerator(cfg, out)
    main, device = accelerator.is_main_process, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes

    # 2. The method over its setup, the same seed on every rank so all build identical weights; then everything
    # that can be refused is checked, still before anything is written.
    dataset = open_dataset(dc)
    seed_everything(cfg.seed)
    method = build_method(cfg, World(rank, world), dataset)
    check_method(method, cfg, dataset)
    phases = method.phases()
    optim_cfgs = validate_phases(phases, method, cfg)
    sharded, units = tc.sharding == "fsdp2", []
    if sharded:
        check_shardable(method, cfg)
        units = sharding.shard(method, device, world)
        phases = method.phases()  # the sharded parameters replaced the module's own
        validate_phases(phases, method, cfg)
    method.to(device)
    for module in method.family.frozen_modules().values():
        module.to(device)
    accelerator.wait_for_everyone()
    warn_cpu_launcher(main, world)

    # 3. The run folder.
    ckpt_dir, log_file = out / "checkpoints", out / "logs.jsonl"
    if main:
        prepare_run_folder(cfg, out, mode, changes)
    accelerator.wait_for_everyone()

    # 4. One optimizer, LR schedule and synchronisation per phase; the EMA; resume.
    optimizers = [make_optimizer(p, oc) for p, oc in zip(phases, optim_cfgs)]
    schedulers = [make_scheduler(oc, p, o, tc.max_steps) for p, oc, o in zip(phases, optim_cfgs, optimizers)]
    # Sharded networks reduce-scatter their own gradients: neither they nor their optimizers are wrapped by
    # accelerate (it would save each rank's optimizer shard as the whole).
    optimizers = optimizers if sharded else prepare_each(accelerator, optimizers)
    schedulers = prepare_each(accelerator, schedulers)
    groups = part_groups(phases, world)
    runners = [PhaseRunner(method, p, device, world, rank, groups, units) for p in phases]
    frozen = {n for n, p in method.named_parameters(remove_duplicate=False) if not p.requires_grad}
    # The EMA is saved by the loop as safetensors (ema.safetensors), never pickled. It belongs to the phase that
    # trains its network and steps right after that phase's optimizer step (so its decay is per update of the
    # network, whatever the other phases' update ratio).
    ema, ema_params, ema_name = None, [], None
    if tc.ema_decay > 0:
        ema_params = list(method.ema_network().parameters())
        ema_name = ema_phase(phases, ema_params)
        ema = EMAModel(ema_params, decay=tc.ema_decay, use_ema_warmup=tc.ema_warmup)
    start, consumed, resume_from = 0, 0, None
    if mode == "resume":
        start, consumed, resume_from = resume_run(accelerator, method, optimizers, ema, ema_params, frozen, sharded,
                                                  ckpt_dir, world)
        if resume_from is not None:
            apply_config_lrs(optim_cfgs, schedulers)
    if main:
        record_stage(cfg, out, mode, changes, start, resume_from)
    accelerator.wait_for_everyone()

    # 5. Data: the loop's own sampler jumps straight to batch k of this rank (accelerate's skip_first_batches would
    # re-load every consumed batch, and its sharding of a custom sampler is hard to make exact).
    sampler = ShardedInfiniteBatchSampler(len(dataset), dc.batch_size, cfg.seed, rank, world, start=consumed)
    batches = iter(DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=dc.num_workers,
                              collate_fn=default_collate, pin_memory=device.type == "cuda",
                              persistent_workers=dc.num_workers > 0))
    if accelerator.log_with:
        flat = flatten(to_dict(cfg))  # TensorBoard's hparams accept scalars and strings only
        accelerator.init_trackers("tensorboard", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                         for k, v in flat.items()})

    def share() -> None:  # every student, as trained, on every rank
        share_parts(phases, optimizers, ema, ema_params, device)

    def sample(step: int) -> None:
        # Every process samples (with FSDP all ranks take part in the forward passes); one writes the file.
        share()
        for u in units:  # a root unit keeps its gathered weights after a no-grad forward; the EMA goes into shards
            u.reshard()
        with EMASwap(ema, ema_params):
            images = sample_grid(method.family, method.export_spec(), SAMPLE_GRID_SIZE, cfg.seed)
        if main:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            save_grid(np.asarray(images), out / "samples" / f"step-{step}.png")

    def checkpoint(step: int) -> None:
        share()
        save_run_checkpoint(accelerator, method, optimizers, ema, frozen, sharded, ckpt_dir, step,
                            {"step": step, "batches_consumed": consumed, "world_size": world,
                             "phases": [p.name for p in phases]}, tc.keep_checkpoints)
        resume_point[0] = step

    # 6. The steps.
    meters = {p.name: Meter() for p in phases}
    ga, resume_point = tc.grad_accum, [start]  # the newest checkpoint's step, for the divergence message
    bar = tqdm(total=tc.max_steps, initial=start, disable=not main, desc=f"train {cfg.method}", dynamic_ncols=True)
    t_log, consumed_at_log, t0 = time.perf_counter(), consumed, time.time()
    for step in range(start, tc.max_steps):
        for pi, (runner, opt, sched, oc) in enumerate(zip(runners, optimizers, schedulers, optim_cfgs)):
            phase = runner.phase
            if step % phase.every:
                continue
            for mi in range(ga):
                raw = to_device(next(batches), device)
                consumed += 1
                seed_everything(derive_seed(STEP_STREAM, cfg.seed, rank, step, pi, mi))
                # Gradients are reduced only on the last micro-batch of the update.
                with runner.no_sync() if mi < ga - 1 else nullcontext(), accelerator.autocast():
                    batch = method.family.batch(raw, cond=phase.cond, real=phase.real, device=device)
                    loss, logs = runner.forward(batch, step)
                    stop_if_not_finite(accelerator, loss, phase.name, step, resume_point)
                    accelerator.backward(loss / ga)
                meters[phase.name].add(loss, logs)
            if oc.max_grad_norm > 0:
                accelerator.clip_grad_norm_(phase.params, oc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if phase.name == ema_name:
                ema.step(ema_params)
            # A phase's loss may also reach other phases' trainable parameters (e.g. a generator loss through the
            # critic); those gradients must not leak into the next phase's update.
            method.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        if done % max(1, tc.log_every) == 0 or done == tc.max_steps:
            now = time.perf_counter()
            row = log_row(accelerator, meters, optimizers, phases, done)
            row["samples_per_sec"] = (consumed - consumed_at_log) * dc.batch_size * world / max(now - t_log, 1e-9)
            row["wall_time"], t_log, consumed_at_log = time.time() - t0, now, consumed
            meters = {p.name: Meter() for p in phases}
            if main:
                write_log_line(log_file, row)
                bar.set_postfix({k[: -len("/loss")]: f"{v:.4g}" for k, v in row.items() if k.endswith("/loss")})
            if accelerator.log_with:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=done)
        if tc.sample_every > 0 and done % tc.sample_every == 0 and done != tc.max_steps:
            sample(done)
        if tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0 and done != tc.max_steps:
            checkpoint(done)
    bar.close()

    # 7. The final checkpoint, sample grid and export (written beside and swapped in: a kill never leaves half of it).
    if not (resume_from is not None and resume_from.name == ckpt.checkpoint_name(tc.max_steps)):
        checkpoint(tc.max_steps)
    sample(tc.max_steps)
    with EMASwap(ema, ema_params):
        full = sharding.gather_units(method) if sharded else {}
        if main:
            with sharding.full_weights(method, full) if sharded else nullcontext():
                originals = method.needs_teacher and tc.teacher_dtype != "float32"
                spec = method.export_spec()
                replace_dir(out / "pipeline",
                            lambda folder: export_student(method.family, spec, folder, cfg.teacher, originals))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


# --- before the run ----------------------------------------------------------------------------------------------
def check_precision(tc: Any) -> None:
    """A ConfigError for a precision this machine cannot run."""
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


def make_accelerator(cfg: RunConfig, out: Path) -> Accelerator:
    """The run's accelerator, refusing launches stepdistill does not use (accelerate's FSDP / DeepSpeed)."""
    tc = cfg.train
    log_with = None
    if tc.tracker == "tensorboard":
        if is_tensorboard_available():
            log_with = "tensorboard"
        else:
            print("warning: tensorboard is not installed; logging to logs.jsonl only", file=sys.stderr)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
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
    return accelerator


def check_method(method: Method, cfg: RunConfig, dataset: Any) -> None:
    """What the built method asks of the run and its data, refused with one line before anything is written."""
    tc = cfg.train
    if tc.ema_decay > 0 and method.ema_network() is None:
        raise ConfigError(f"train.ema_decay={tc.ema_decay}: method '{cfg.method}' keeps no EMA of its student in this "
                          "configuration (e.g. a LoRA student, whose target EMA is method_args.target_ema_decay); set "
                          "train.ema_decay=0")
    if tc.gradient_checkpointing:
        nets = [m for m in method.modules() if isinstance(m, ModelMixin) and any(p.requires_grad
                                                                                for p in m.parameters())]
        try:
            if not nets:
                raise ValueError
            for m in nets:
                m.enable_gradient_checkpointing()  # a ValueError where the network does not support it
        except ValueError:
            raise ConfigError(f"train.gradient_checkpointing: method '{method.name}' has no trainable diffusers "
                              "network that supports it; set it to false") from None
    needs_images = [p.name for p in method.phases() if p.real]
    if needs_images and not dataset_has_images(dataset):
        why = method.images_needed_for or f"its {needs_images[0]} phase"
        raise ConfigError(f"method '{cfg.method}' needs real images for {why}: data source '{cfg.data.source}' has "
                          "none; set data.source to an image folder (with captions for a text teacher), a local HF "
                          "datasets folder or digits16")
    try:
        dataset[0]  # the first item decodes (a corrupt file fails here, not after the run folder exists)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding error of the user's data is reported as one line
        raise DataError(f"data source '{cfg.data.source}': its first item cannot be read ({first_line(e)})") from None


def check_shardable(method: Method, cfg: RunConfig) -> None:
    if not method.shardable:
        raise ConfigError(f"train.sharding=fsdp2: method '{cfg.method}' cannot be sharded: "
                          f"{method.not_shardable_because}")
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.sharding=fsdp2 with train.mixed_precision=fp16 needs a sharded gradient "
                          "scaler, which stepdistill lacks; use bf16")


def warn_cpu_launcher(main: bool, world: int) -> None:
    """Warn when ``accelerate launch --cpu --num_processes N`` started one process (its simple launcher runs one,
    whatever was asked), read from the parent process's command line."""
    try:
        args = psutil.Process(os.getppid()).cmdline()
    except (psutil.Error, OSError):
        return
    if not main or "launch" not in args or not any(Path(a).name == "accelerate" for a in args[:3]):
        return
    asked = None
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--num_processes=") else (
            args[i + 1] if a == "--num_processes" and i + 1 < len(args) else None)
        if value is not None and value.isdigit():
            asked = int(value)
    if asked is not None and asked > world:
        print(f"warning: `accelerate launch` was asked for {asked} processes but this run has {world}: its --cpu "
              "launcher starts a single process; for several processes on a CPU-only machine use `accelerate launch "
              "--multi_gpu --num_processes N` or `python -m torch.distributed.run --nproc_per_node N`",
              file=sys.stderr)


def prepare_run_folder(cfg: RunConfig, out: Path, mode: str, changes: list) -> None:
    """Replace, restart or create the run folder as planned (main process)."""
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
        ckpt.remove_partial(out / "checkpoints")
    else:
        save_config(cfg, out / "config.yaml")


def record_stage(cfg: RunConfig, out: Path, mode: str, changes: list, start: int, resume_from: Path | None) -> None:
    """After a resume: logs cut to the checkpoint, config.yaml with the new stage's values, the changes recorded."""
    if mode == "resume":
        truncate_logs(out / "logs.jsonl", start)
        save_config(cfg, out / "config.yaml")  # only now (the checkpoint loaded) it takes a new stage's values
    if changes and resume_from is not None:  # without a checkpoint the run simply starts afresh
        print(f"continuing at step {start} with changed settings: {shown(changes)}", file=sys.stderr)
        record = {"step": start, "changes": {k: {"from": a, "to": b} for k, a, b in changes}}
        with open(out / CHANGES_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def prepare_each(accelerator: Accelerator, objects: list) -> list:
    """``accelerator.prepare`` of each object (it returns a lone object unwrapped, several as a tuple)."""
    return [accelerator.prepare(o) for o in objects]


# --- checkpoints -------------------------------------------------------------------------------------------------
def save_run_checkpoint(accelerator: Accelerator, method: Method, optimizers: list, ema: Any, frozen: set[str],
                        sharded: bool, ckpt_dir: Path, step: int, state: dict, keep: int) -> None:
    """Checkpoint ``step``: accelerate's state (optimizers, schedulers, RNG), the trained weights and the EMA (gathered
    in full by every process of a sharded run, written by the main one)."""
    if sharded:
        weights = sharding.gather_units(method)
        trained = {k: v for k, v in weights.items() if k not in frozen}
        # The replicated rest of what an unsharded checkpoint holds (buffers outside the units).
        trained.update(sharding.replicated_state(method, frozen, trained))
        optim_states = sharding.gather_optimizers(method, optimizers)
        shadow = sharding.full_ema(ema.shadow_params) if ema is not None else None
    else:
        trained, optim_states, shadow = ckpt.trained_state(method, frozen), None, None

    def extra(folder: Path) -> None:
        ckpt.save_trained(trained, folder)
        if optim_states is not None:
            sharding.write_optimizers(optim_states, folder)
        if ema is not None:
            ckpt.save_ema(ema, folder, shadow)

    ckpt.save_checkpoint(accelerator, ckpt_dir, step, state, keep, write_extra=extra)


def resume_run(accelerator: Accelerator, method: Method, optimizers: list, ema: Any, ema_params: list,
               frozen: set[str], sharded: bool, ckpt_dir: Path, world: int) -> tuple[int, int, Path | None]:
    """Load the newest loadable checkpoint; (its step, batches consumed, folder) or (0, 0, None) without one."""
    def load_extra(folder: Path) -> None:
        ckpt.load_trained(method, folder, frozen, (lambda s: sharding.load_full_state(method, s)) if sharded else None)
        ckpt.check_optimizer_states(optimizers)
        if sharded:
            sharding.load_optimizers(method, optimizers, folder)
            if ema is not None:  # loaded in full: cut into this process's shards of the parameters
                ema.shadow_params = sharding.shard_like(ema.shadow_params, ema_params)

    main = accelerator.is_main_process
    resume_from, state = ckpt.load_newest_checkpoint(accelerator, ckpt_dir, ema, main, load_extra)
    if resume_from is None:
        return 0, 0, None
    if state.get("world_size", world) != world and main:
        print(f"warning: resuming a {state['world_size']}-process run on {world} processes; the data order "
              "and per-rank noise will differ from an uninterrupted run", file=sys.stderr)
    if ema is not None:
        ema.to(accelerator.device)  # EMAModel.load_state_dict keeps the shadow weights on the CPU
    if main:
        print(f"resuming from {resume_from} (step {state['step']})", file=sys.stderr)
    return int(state["step"]), int(state["batches_consumed"]), resume_from


# --- during the run ----------------------------------------------------------------------------------------------
def stop_if_not_finite(accelerator: Accelerator, loss: torch.Tensor, phase: str, step: int,
                       resume_point: list[int]) -> None:
    """Stop every process with a one-line error when any process's loss is NaN or infinite (before the update, so
    no non-finite value reaches the weights, a checkpoint or the export)."""
    bad = accelerator.reduce((~torch.isfinite(loss.detach().float())).float().reshape(1), reduction="sum")
    if bad.item() > 0:
        where = (f"its last checkpoint is step {resume_point[0]}: rerun with a lower learning rate and "
                 "--allow-changes to continue from it" if resume_point[0] else "no checkpoint was written")
        raise UserError(f"the {phase} loss is {float(loss.detach())} at step {step + 1}: training diverged, nothing "
                        f"was exported; {where}")


def log_row(accelerator: Accelerator, meters: dict[str, Meter], optimizers: list, phases: list,
            done: int) -> dict[str, Any]:
    """The log line of step ``done``: each phase's mean loss and logs since the last line, averaged over the
    processes, and each phase's learning rate."""
    names, local = [], []
    for name, m in meters.items():
        if m.count:
            names.append(f"{name}/loss")
            local.append(m.loss_sum / m.count)
            for k, v in sorted(m.logs.items()):
                names.append(f"{name}/{k}")
                local.append(torch.tensor(v / m.count, device=accelerator.device))
    values = accelerator.reduce(torch.stack(local), reduction="mean").tolist() if local else []
    row: dict[str, Any] = {"step": done, **dict(zip(names, values))}
    for p, opt in zip(phases, optimizers):
        row[f"lr/{p.name}"] = opt.param_groups[0]["lr"]
    return row
