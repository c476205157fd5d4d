"""The ``stepdistill`` commands' implementations (train, config, sample, trajectories, average, eval, stats,
bench); :mod:`stepdistill.cli` parses the command line and calls them."""

from __future__ import annotations

import argparse
import json
import math
import os
import textwrap
from pathlib import Path

import torch
import yaml

from . import bench
from .config import DataConfig, OptimConfig, RunConfig, TrainConfig, describe, list_recipes, markdown_table, to_dict
from .errors import UserError
from .eval import generation as gen
from .eval.grain import degrain
from .eval.harness import check_ref_size, check_request, evaluate, format_table, per_student, save_reference_stats
from .files import check_out_dir, prepare_out_dir
from .images import save_grid
from .loop import train
from .loop.run_folder import plan_out_dir
from .pipelines import MultiStudentPipeline, family_of, load_pipeline, recorded_schedule
from .pipelines.average import average_pipelines
from .pipelines.diversity import hybrid_timesteps, load_teacher_for
from .pipelines.trajectories import write_trajectories
from .trainers import METHODS, get_method, load_config


def _device(name: str | None) -> torch.device:
    """--device as asked (checked: a device torch knows and this machine has), else cuda where there is one."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device '{name}' is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s); use cpu")
    if device.type not in ("cpu", "cuda") and not (hasattr(torch, "accelerator") and torch.accelerator.is_available()
                                                   and torch.accelerator.current_accelerator().type == device.type):
        raise UserError(f"--device '{name}': no {device.type} device on this machine; use cpu")
    return device


# --- train ------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    get_method(args.method)  # unknown method: one-line error before reading anything else
    if args.config is None:
        raise UserError(f"train {args.method} needs --config FILE or a shipped recipe's name (stepdistill config "
                        "list)")
    cfg = load_config(args.config, args.overrides, method=args.method)
    if args.dry_run:
        return _dry_run(cfg, args)
    run_dir = train(cfg, args.out, resume=not args.no_resume, overwrite=args.overwrite,
                    allow_changes=args.allow_changes)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        print(f"run folder: {run_dir}\npipeline:   {Path(run_dir) / 'pipeline'}")
    return 0


def _dry_run(cfg, args: argparse.Namespace) -> int:
    """Print the resolved config (file + overrides + defaults) and what would happen to --out; write nothing."""
    mode, changes = plan_out_dir(cfg, Path(args.out), resume=not args.no_resume, overwrite=args.overwrite,
                                 allow_changes=args.allow_changes)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    what = {"fresh": f"start a new run in '{args.out}'", "overwrite": f"replace the run folder '{args.out}'",
            "resume": f"resume the run in '{args.out}'",
            "restart": f"replace the run in '{args.out}', which stopped before its first checkpoint"}[mode]
    if changes and mode == "resume":
        what += " as a new stage changing " + ", ".join(k for k, _, _ in changes)
    print(f"# dry run: would {what}; nothing was written")
    return 0


# --- config -----------------------------------------------------------------------------------------------------
def config_tables(name: str) -> str:
    """The markdown key tables of ``name`` (a method, or "run" for the keys every run has): the docs' tables."""
    if name == "run":
        top = [k for k in describe(RunConfig) if k.name in ("method", "seed", "teacher")]
        return "\n\n".join([markdown_table(top), markdown_table(describe(DataConfig), "data."),
                             markdown_table(describe(TrainConfig), "train."),
                             markdown_table(describe(OptimConfig), "optim.PHASE.")])
    return markdown_table(describe(get_method(name).Config), "method_args.")


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "list":
        print("methods: " + ", ".join(sorted(METHODS)))
        print("shipped recipes (--config NAME): " + ", ".join(list_recipes()))
        return 0
    if args.name is None:
        raise UserError(f"config show needs a method ({', '.join(sorted(METHODS))}) or 'run'")
    if args.name != "run":
        get_method(args.name)  # unknown method: one-line error listing the known ones
    if args.markdown:
        print(config_tables(args.name))
        return 0

    def show(title: str, keys, prefix: str) -> None:
        print(title)
        for k in keys:
            print(f"  {prefix}{k.name}: {k.type} = {k.default!r}")
            text = k.help if args.long else k.summary
            print(textwrap.fill(text, width=116, initial_indent="      ", subsequent_indent="      "))

    if args.name == "run":
        show("run keys", [k for k in describe(RunConfig) if k.name in ("method", "seed", "teacher")], "")
        show("data", describe(DataConfig), "data.")
        show("train", describe(TrainConfig), "train.")
        show("optim (one section per phase of the method)", describe(OptimConfig), "optim.PHASE.")
        return 0
    cls = get_method(args.name)
    show(f"{args.name} method_args ({cls.Config.__name__}; set in a config file or as method_args.KEY=VALUE)",
         describe(cls.Config), "method_args.")
    print(f"phases: {', '.join(cls.phase_names)} (optimizer settings under optim.PHASE.*: "
          "`stepdistill config show run`)")
    if cls.stage_changes:
        print(f"may change at a new stage (train --allow-changes): {', '.join(cls.stage_changes)} and optim.PHASE.lr")
    return 0


def _check_steps(args: argparse.Namespace) -> None:
    """--steps N, or --timesteps T1,T2,... (then N = their number; both given must agree); the other sampling numbers
    in range. Before anything is loaded or written."""
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number, got {args.guidance}")
    if not math.isfinite(args.teacher_guidance):
        raise UserError(f"--teacher-guidance must be a finite number, got {args.teacher_guidance}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.timesteps is not None:
        n = len([v for v in args.timesteps.split(",") if v.strip()])
        if args.steps is not None and args.steps != n:
            raise UserError(f"--steps {args.steps} disagrees with the {n} values of --timesteps; pass only one")
        args.steps = n
    elif args.steps is None:
        raise UserError("sampling a pipeline needs --steps N (or --timesteps T1,T2,...)")


def _diversity_args(args: argparse.Namespace, pipe) -> dict:
    """The teacher and step count of diversity distillation (--teacher-steps), checked before anything is
    written; {} when it is off."""
    if not args.teacher_steps:
        if args.teacher:
            raise UserError("--teacher is used with --teacher-steps K (diversity distillation); pass both or neither")
        return {}
    if args.teacher_steps < 0:
        raise UserError(f"--teacher-steps must be 1 or more, got {args.teacher_steps}")
    if args.timesteps:
        raise UserError("--teacher-steps sets the schedule itself (K teacher steps + the student's); drop --timesteps")
    hybrid_timesteps(pipe, args.teacher_steps)  # a schedule that fits, before the teacher is loaded
    teacher = load_teacher_for(pipe, args.teacher, device=_device(args.device))
    return {"teacher": teacher, "teacher_steps": args.teacher_steps, "teacher_guidance": args.teacher_guidance}


# --- sample -----------------------------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    _check_steps(args)
    prompts = gen.read_prompts(args.prompts)
    pipe = gen.swap_scheduler(load_pipeline(args.pipeline, device=_device(args.device), base=args.base),
                              args.scheduler)
    timesteps = gen.parse_timesteps(args.timesteps, pipe)
    recorded_schedule(pipe, args.steps)  # the export's recorded schedules checked before anything is written
    hybrid = _diversity_args(args, pipe)
    out = prepare_out_dir(args.out, args.overwrite)
    res = gen.generate(pipe, args.num_samples, args.steps, args.guidance, args.seed, args.batch_size, prompts=prompts,
                   timesteps=timesteps, **hybrid)
    gen.save_samples(out / "samples.npz", res, pipeline=args.pipeline, steps=args.steps, guidance=args.guidance,
                 seed=args.seed, scheduler=type(pipe.scheduler).__name__,
                 timesteps=",".join(map(str, res["timesteps"] or [])))
    save_grid(res["images"][:100], out / "grid.png", nrow=10)
    when = (f"timesteps {res['timesteps']}" if res["timesteps"] else f"sigmas {res['sigmas']}" if res["sigmas"]
            else f"{args.steps} steps (scheduler's rule)")
    print(f"{args.num_samples} samples at {when} in {res['seconds']:.1f}s ({args.num_samples / res['seconds']:.1f}/s)"
          f" -> {out / 'samples.npz'}, {out / 'grid.png'}")
    return 0


# --- trajectories -----------------------------------------------------------------------------------------------
def cmd_trajectories(args: argparse.Namespace) -> int:
    # Under accelerate launch / torchrun every process writes its own shards.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = os.environ.get("LOCAL_RANK")
    device = (_device(args.device) if args.device else torch.device(f"cuda:{local}") if local and
              torch.cuda.is_available() else _device(None))
    out = write_trajectories(args.teacher, args.out, args.num, steps=args.steps, w_min=args.w_min, w_max=args.w_max,
                             shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed,
                             prompts_file=args.prompts, resolution=args.resolution, dtype=args.dtype,
                             overwrite=args.overwrite, device=device, rank=rank, world=world)
    print(f"trajectories -> {out}")
    return 0


# --- average ----------------------------------------------------------------------------------------------------
def cmd_average(args: argparse.Namespace) -> int:
    out = average_pipelines(args.pipelines, args.out, overwrite=args.overwrite)
    print(f"averaged the networks of {len(args.pipelines)} pipelines -> {out}")
    return 0


# --- eval -------------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    # Everything that needs no samples is checked first; the output folder is written only once the metrics are in.
    metrics = check_request(args.ref, args.metrics, args.clip_model)
    check_out_dir(args.out, args.overwrite)
    device = _device(args.device)
    source = args.source
    row: dict = {"source": source}
    raw = None  # the samples as generated, when --degrain changes what is evaluated
    if source.endswith(".npz"):
        if not Path(source).is_file():
            raise UserError(f"samples file '{source}' does not exist")
        if (args.steps is not None or args.timesteps is not None or args.base is not None or args.teacher_steps
                or args.teacher):
            raise UserError("--steps / --timesteps / --base / --teacher-steps apply when sampling a pipeline; a "
                            "samples file is evaluated as is")
        samples = gen.load_samples(source)
        if args.degrain:  # refuses non-digits16 samples before anything is written
            samples["images"] = degrain(samples["images"])
    else:
        _check_steps(args)
        prompts = gen.read_prompts(args.prompts)
        pipe = gen.swap_scheduler(load_pipeline(source, device=device, base=args.base), args.scheduler)
        timesteps = gen.parse_timesteps(args.timesteps, pipe)
        recorded_schedule(pipe, args.steps)  # the export's recorded schedules checked before anything is written
        family = family_of(pipe, source)
        if {"fid", "kid", "precision", "recall"} & set(metrics):
            check_ref_size(args.ref, family.resolution)  # before sampling
        if args.degrain and (family.kind != "class" or family.resolution != 16):
            raise UserError(f"--degrain is defined for 16x16 digits16 samples; '{source}' does not make them: "
                            "drop --degrain for other pipelines")
        hybrid = _diversity_args(args, pipe)
        samples = gen.generate(pipe, args.num_samples, args.steps, args.guidance, args.seed, args.batch_size,
                               prompts=prompts, timesteps=timesteps, **hybrid)
        if hybrid:
            row.update(teacher_steps=args.teacher_steps, teacher_guidance=args.teacher_guidance)
        raw = dict(samples)
        for key in ("timesteps", "sigmas"):
            if samples[key]:
                row[key] = samples[key]
        row.update(steps=args.steps, guidance=args.guidance,
                   samples_per_s=round(len(samples["images"]) / samples["seconds"], 2))
        if args.degrain:
            samples["images"] = degrain(samples["images"])  # samples.npz keeps the samples as generated
    if args.degrain:
        row["degrain"] = True
    result = evaluate(samples["images"], samples["labels"], samples["prompts"], ref=args.ref, metrics=metrics,
                      device=device, clip_model=args.clip_model)
    row.update(result)
    if raw is not None and isinstance(pipe, MultiStudentPipeline):  # each student's samples on their own
        router = pipe.router
        owners = pipe.route(samples["labels"] if router.kind == "classes" else samples["prompts"])
        classes_of = ([router.classes_of(k) for k in range(router.num_students)] if router.kind == "classes"
                      else None)
        row["per_student"] = per_student(owners, classes_of, samples["images"], samples["labels"],
                                         samples["prompts"], args.ref, metrics, device, args.clip_model)
    out = prepare_out_dir(args.out, args.overwrite)
    if raw is not None:
        gen.save_samples(out / "samples.npz", raw, pipeline=source, steps=args.steps, guidance=args.guidance,
                         seed=args.seed, timesteps=",".join(map(str, raw["timesteps"] or [])))
    save_grid(samples["images"][:100], out / "grid.png", nrow=10)
    (out / "metrics.json").write_text(json.dumps(row, indent=2, default=str))
    students = [{"source": f"  student {r['student']} ({r['reference']})",
                 **{k: v for k, v in r.items() if k in metrics}} for r in row.get("per_student", [])]
    print(format_table([row, *students]))
    print(f"-> {out / 'metrics.json'}")
    return 0


# --- stats ------------------------------------------------------------------------------------------------------
def cmd_stats(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise UserError(f"--out '{out}' must be a .npz file (e.g. stats.npz)")
    if out.exists() and not args.overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite to replace it or choose another --out")
    if not Path(args.folder).is_dir():
        raise UserError(f"image folder '{args.folder}' does not exist")
    if args.resolution < 1:
        raise UserError(f"--resolution must be a positive number of pixels, got {args.resolution}")
    check_out_dir(out.parent, overwrite=True)  # its folder can be made (no file in the way), before the features
    device = _device(args.device)
    path = save_reference_stats(args.folder, out, args.resolution, device=device)
    print(f"Inception statistics of '{args.folder}' at {args.resolution}px -> {path} (use it as --ref {path})")
    return 0


# --- bench ------------------------------------------------------------------------------------------------------
# Distillation benchmarks: method -> default (label, config) list and student step counts (None = trained ones).
# Recipes are shipped recipe names, resolved by load_config in any install.
DISTILL_BENCHES = {
    "dmd2": ("dmd2", [("dmd2 student", "digits16_dmd2")], None),
    "consistency": ("consistency", [("lcm", "digits16_lcm"), ("lcm-lora", "digits16_lcm_lora"),
                                    ("multiphase", "digits16_multiphase")], [1, 2, 4]),
    "vsd": ("vsd", [("vsd student", "digits16_vsd")], None),
    "scm": ("scm", [("scm", "digits16_scm")], [1, 2, 4]),
}
# Rows of another method trained beside a benchmark's own for comparison (kept when --config replaces the latter).
COMPARISON_ROWS = {"vsd": [("dmd2 student", "digits16_dmd2")],
                   "scm": [("rcm", "digits16_rcm"), ("dmd2", "digits16_dmd2"), ("lcm", "digits16_lcm")]}
# Benchmarks whose report ends with the training-step cost of their recipes, measured side by side (bench.step_cost):
# (label, recipe, overrides), the first the reference of the ratios.
STEP_COST_ROWS = {"scm": [("lcm", "digits16_lcm", []), ("scm", "digits16_scm", []),
                          ("scm, exact JVP", "digits16_scm", ["method_args.jvp=exact"]),
                          ("rcm", "digits16_rcm", []), ("dmd2", "digits16_dmd2", [])]}
# Teacher step counts of diversity-distillation rows (the teacher's first K steps, then the student).
DIVERSITY_ROWS = {"vsd": (1, 2)}


# Benchmarks that train their own recipes: name -> (its run function, the recipes).
OWN_RECIPE_BENCHES = {
    "msd": (bench.run_msd_bench, "digits16_dmd2, digits16_msd, digits16_msd_small"),
    "agd": (bench.run_agd_bench, "digits16_agd"),
}


def cmd_bench(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.which == "real":
        bench.run_real_floor(args.out, num_samples=args.num_samples, overwrite=args.overwrite, device=device)
        return 0
    if args.which == "memory":
        if args.overrides or args.config:
            raise UserError("bench memory takes no --config or key=value overrides")
        bench.run_memory_bench(args.out, overwrite=args.overwrite)
        return 0
    if args.which == "teacher":
        if args.overrides or args.config:
            raise UserError("bench teacher takes no --config or key=value overrides")
        bench.run_teacher_baseline(args.out, num_samples=args.num_samples, overwrite=args.overwrite, device=device,
                                   pipeline=args.pipeline)
        return 0
    if args.which in OWN_RECIPE_BENCHES:
        run, recipes = OWN_RECIPE_BENCHES[args.which]
        if args.config or args.curve or args.student_steps:
            raise UserError(f"bench {args.which} trains its own recipes ({recipes}): drop --config, --curve and "
                            "--student-steps")
        run(args.out, args.overrides, num_samples=args.num_samples, overwrite=args.overwrite, device=device)
        return 0
    if args.which not in DISTILL_BENCHES:
        raise UserError(f"unknown benchmark '{args.which}' (available: real, teacher, memory, msd, agd, "
                        f"{', '.join(DISTILL_BENCHES)})")
    method, configs, steps = DISTILL_BENCHES[args.which]
    if args.config:
        configs = [(f"{method} student", args.config)]
    if args.student_steps:
        try:
            steps = [int(k) for k in args.student_steps.split(",")]
        except ValueError:
            raise UserError(f"--student-steps must be a comma list of integers, got '{args.student_steps}'") from None
    if args.curve:
        if len(configs) != 1:
            raise UserError("--curve takes one config: pass --config FILE")
        try:
            milestones = [int(k) for k in args.curve.split(",")]
        except ValueError:
            raise UserError(f"--curve must be a comma list of step counts, got '{args.curve}'") from None
        bench.run_training_curve(method, configs[0][1], args.out, milestones, args.overrides,
                                 num_samples=args.num_samples, overwrite=args.overwrite, device=device)
        return 0
    bench.run_distillation_report(method, configs, args.out, args.overrides, num_samples=args.num_samples,
                                  overwrite=args.overwrite, device=device, student_steps=steps,
                                  teacher_steps=bench.teacher_step_counts(steps),
                                  comparisons=COMPARISON_ROWS.get(args.which, []),
                                  diversity_steps=DIVERSITY_ROWS.get(args.which, ()),
                                  step_costs=STEP_COST_ROWS.get(args.which, []))
    return 0
