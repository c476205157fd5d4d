"""The ``stepdistill`` command: train / sample / eval / bench.

User mistakes (bad config, missing folder, existing output, ...) are reported as one line on stderr with exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# --- train ------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from stepdistill.config import load_config
    from stepdistill.trainers import get_method

    get_method(args.method)  # unknown method: one-line error before reading anything else
    if args.config is None:
        raise UserError(f"train {args.method} needs --config FILE or a shipped recipe's name (stepdistill config "
                        "list)")
    cfg = load_config(args.config, args.overrides, method=args.method)
    if args.dry_run:
        return _dry_run(cfg, args)
    from stepdistill.trainers.loop import train

    run_dir = train(cfg, args.out, resume=not args.no_resume, overwrite=args.overwrite,
                    allow_changes=args.allow_changes)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process
        print(f"run folder: {run_dir}\npipeline:   {Path(run_dir) / 'pipeline'}")
    return 0


def _dry_run(cfg, args: argparse.Namespace) -> int:
    """Print the resolved config (file + overrides + defaults) and what would happen to --out; write nothing."""
    import yaml

    from stepdistill.config import to_dict
    from stepdistill.trainers.run_folder import plan_out_dir

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
    from stepdistill.config import DataConfig, OptimConfig, RunConfig, TrainConfig, describe, markdown_table
    from stepdistill.trainers import get_method

    if name == "run":
        top = [k for k in describe(RunConfig) if k.name in ("method", "seed", "teacher")]
        return "\n\n".join([markdown_table(top), markdown_table(describe(DataConfig), "data."),
                             markdown_table(describe(TrainConfig), "train."),
                             markdown_table(describe(OptimConfig), "optim.PHASE.")])
    return markdown_table(describe(get_method(name).Config), "method_args.")


def cmd_config(args: argparse.Namespace) -> int:
    import textwrap

    from stepdistill.config import DataConfig, OptimConfig, RunConfig, TrainConfig, describe, list_recipes
    from stepdistill.trainers import METHODS, get_method

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
    """--steps N, or --timesteps T1,T2,... (then N = their number; both given must agree)."""
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
    from stepdistill.pipelines.diversity import load_teacher_for

    teacher = load_teacher_for(pipe, args.teacher, device=_device(args.device))
    return {"teacher": teacher, "teacher_steps": args.teacher_steps, "teacher_guidance": args.teacher_guidance}


# --- sample -----------------------------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    from stepdistill.eval.generation import generate, parse_timesteps, read_prompts, save_samples, swap_scheduler
    from stepdistill.pipelines import load_pipeline
    from stepdistill.utils import prepare_out_dir, save_grid

    _check_steps(args)
    prompts = read_prompts(args.prompts)
    pipe = swap_scheduler(load_pipeline(args.pipeline, device=_device(args.device), base=args.base), args.scheduler)
    timesteps = parse_timesteps(args.timesteps, pipe)
    hybrid = _diversity_args(args, pipe)
    out = prepare_out_dir(args.out, args.overwrite)
    res = generate(pipe, args.num_samples, args.steps, args.guidance, args.seed, args.batch_size, prompts=prompts,
                   timesteps=timesteps, **hybrid)
    save_samples(out / "samples.npz", res, pipeline=args.pipeline, steps=args.steps, guidance=args.guidance,
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
    from stepdistill.trajectories import write_trajectories

    out = write_trajectories(args.teacher, args.out, args.num, steps=args.steps, w_min=args.w_min, w_max=args.w_max,
                             shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed,
                             prompts_file=args.prompts, resolution=args.resolution, dtype=args.dtype,
                             overwrite=args.overwrite, device=_device(args.device) if args.device else None)
    print(f"trajectories -> {out}")
    return 0


# --- average ----------------------------------------------------------------------------------------------------
def cmd_average(args: argparse.Namespace) -> int:
    from stepdistill.pipelines import average_pipelines

    out = average_pipelines(args.pipelines, args.out, overwrite=args.overwrite)
    print(f"averaged the networks of {len(args.pipelines)} pipelines -> {out}")
    return 0


# --- eval -------------------------------------------------------------------------------------------------------
def _degrain(images):
    from stepdistill.eval.grain import degrain

    return degrain(images)


def cmd_eval(args: argparse.Namespace) -> int:
    from stepdistill.eval import generation as gen
    from stepdistill.eval.harness import check_request, evaluate, format_table
    from stepdistill.utils import check_out_dir, prepare_out_dir, save_grid

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
            samples["images"] = _degrain(samples["images"])
    else:
        from stepdistill.pipelines import load_pipeline

        _check_steps(args)
        prompts = gen.read_prompts(args.prompts)
        pipe = gen.swap_scheduler(load_pipeline(source, device=device, base=args.base), args.scheduler)
        timesteps = gen.parse_timesteps(args.timesteps, pipe)
        if args.degrain and (getattr(pipe, "vae", None) is not None
                             or getattr(getattr(pipe, "unet", None), "config", {}).get("sample_size") != 16):
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
            samples["images"] = _degrain(samples["images"])  # samples.npz keeps the samples as generated
    if args.degrain:
        row["degrain"] = True
    result = evaluate(samples["images"], samples["labels"], samples["prompts"], ref=args.ref, metrics=metrics,
                      device=device, clip_model=args.clip_model)
    row.update(result)
    if raw is not None and hasattr(pipe, "router"):  # a MultiStudentPipeline: each student's samples on their own
        from stepdistill.eval.harness import per_student

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
    from stepdistill.eval.harness import save_reference_stats

    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise UserError(f"--out '{out}' must be a .npz file (e.g. stats.npz)")
    if out.exists() and not args.overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite to replace it or choose another --out")
    if not Path(args.folder).is_dir():
        raise UserError(f"image folder '{args.folder}' does not exist")
    if args.resolution < 1:
        raise UserError(f"--resolution must be a positive number of pixels, got {args.resolution}")
    path = save_reference_stats(args.folder, out, args.resolution, device=_device(args.device))
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
}
# Rows of another method trained beside a benchmark's own for comparison (kept when --config replaces the latter).
COMPARISON_ROWS = {"vsd": [("dmd2 student", "digits16_dmd2")]}
# Teacher step counts of diversity-distillation rows (the teacher's first K steps, then the student).
DIVERSITY_ROWS = {"vsd": (1, 2)}


# Benchmarks that train their own recipes: name -> (module of stepdistill.eval, its run function, the recipes).
OWN_RECIPE_BENCHES = {
    "msd": ("bench_msd", "run_msd_bench", "digits16_dmd2, digits16_msd, digits16_msd_small"),
    "agd": ("bench_agd", "run_agd_bench", "digits16_agd"),
}


def cmd_bench(args: argparse.Namespace) -> int:
    from stepdistill.eval import bench

    device = _device(args.device)
    if args.which == "real":
        bench.run_real_floor(args.out, num_samples=args.num_samples, overwrite=args.overwrite, device=device)
        return 0
    if args.which == "memory":
        if args.overrides or args.config:
            raise UserError("bench memory takes no --config or key=value overrides")
        from stepdistill.eval.bench_memory import run_memory_bench

        run_memory_bench(args.out, overwrite=args.overwrite)
        return 0
    if args.which == "teacher":
        if args.overrides or args.config:
            raise UserError("bench teacher takes no --config or key=value overrides")
        bench.run_teacher_baseline(args.out, num_samples=args.num_samples, overwrite=args.overwrite, device=device,
                                   pipeline=args.pipeline)
        return 0
    if args.which in OWN_RECIPE_BENCHES:
        module, fn, recipes = OWN_RECIPE_BENCHES[args.which]
        if args.config or args.curve or args.student_steps:
            raise UserError(f"bench {args.which} trains its own recipes ({recipes}): drop --config, --curve and "
                            "--student-steps")
        import importlib

        run = getattr(importlib.import_module(f"stepdistill.eval.{module}"), fn)
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
                                  diversity_steps=DIVERSITY_ROWS.get(args.which, ()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepdistill", description="Diffusion step distillation toolkit.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a method from a YAML config",
                       description="Train METHOD; the run folder gets config.yaml, checkpoints/, logs.jsonl, "
                                   "tensorboard/, samples/ and the final pipeline/.")
    t.add_argument("method", help="training method (teacher, ...)")
    t.add_argument("--config", help="YAML config file, or a shipped recipe's name, e.g. digits16_dmd2 "
                                    "(`stepdistill config list`)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--no-resume", action="store_true", help="do not resume from the run folder's checkpoints")
    t.add_argument("--allow-changes", action="store_true",
                   help="continue the run in --out from its last checkpoint although learning rates (optim.PHASE.lr) "
                        "or the method's loss weights / noise ranges changed, e.g. method_args.gan_weight_student "
                        "for dmd2 (a new training stage; recorded in config_changes.jsonl)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (file + overrides + defaults) and what would happen to --out, "
                        "then exit without writing anything")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="list methods and shipped recipes; show every config key with its help",
                       description="list: the methods and the shipped recipes. show METHOD: every method_args key "
                                   "with its type, default and help; show run: the keys every run has (data, "
                                   "train, optim).")
    c.add_argument("action", choices=["list", "show"])
    c.add_argument("name", nargs="?", help="method name (dmd2, consistency, teacher) or 'run'")
    c.add_argument("--long", action="store_true", help="full help text instead of its first sentence")
    c.add_argument("--markdown", action="store_true", help="markdown tables (what docs/methods/*.md hold)")
    c.set_defaults(func=cmd_config)

    def add_gen(q: argparse.ArgumentParser) -> None:
        q.add_argument("--steps", type=int, help="sampler steps (a student's recorded schedule for that many steps "
                                                 "is used if it has one)")
        q.add_argument("--timesteps", help="explicit descending sampler timesteps instead of --steps, e.g. "
                                           "999,699,399,19 (LCM students sample at any points of their grid)")
        q.add_argument("--num-samples", type=int, default=1000, help="number of samples (default 1000)")
        q.add_argument("--guidance", type=float, default=1.0, help="CFG scale, uncond + w (cond - uncond); 1 = off")
        q.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
        q.add_argument("--batch-size", type=int, default=100)
        q.add_argument("--scheduler", help="swap in another diffusers scheduler class, e.g. EulerDiscreteScheduler")
        q.add_argument("--prompts", help="prompt file (text-to-image pipelines)")
        q.add_argument("--base", help="base pipeline of a LoRA export (default: the base it records)")
        q.add_argument("--teacher-steps", type=int, default=0,
                       help="diversity distillation: the teacher takes the first K steps (CFG --teacher-guidance) of "
                            "a trailing schedule of K + the student's steps, the student the rest (default 0: off)")
        q.add_argument("--teacher", help="teacher pipeline for --teacher-steps (default: the one the student records)")
        q.add_argument("--teacher-guidance", type=float, default=2.0,
                       help="the teacher's CFG scale for --teacher-steps (default 2.0, the digits16 teacher's)")
        q.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    s = sub.add_parser("sample", help="sample from a pipeline",
                       description="Write OUT/samples.npz (images uint8 NHWC, labels or prompts) and OUT/grid.png.")
    s.add_argument("pipeline", help="pipeline folder, LoRA export folder, hub id or 'digits16' (the shipped teacher)")
    add_gen(s)
    s.set_defaults(func=cmd_sample)

    tr = sub.add_parser("trajectories", help="CFG-guided teacher trajectories (the training data of agd)",
                        description="Sample NUM trajectories of the teacher's deterministic sampler under CFG, each "
                                    "at its own guidance scale w ~ U[w-min, w-max], and store every state with the "
                                    "guided prediction as safetensors shards in OUT. Rerunning with the same "
                                    "arguments completes an interrupted folder; under `accelerate launch` every "
                                    "process writes its own shards.")
    tr.add_argument("--teacher", default="digits16", help="teacher pipeline: 'digits16', a folder or a hub id")
    tr.add_argument("--out", required=True, help="trajectory folder")
    tr.add_argument("--num", type=int, required=True, help="number of trajectories")
    tr.add_argument("--steps", type=int, default=50, help="sampler steps per trajectory (default 50)")
    tr.add_argument("--w-min", type=float, default=1.0, help="lowest guidance scale (default 1)")
    tr.add_argument("--w-max", type=float, default=4.0, help="highest guidance scale (default 4; the AGD paper: 12 "
                                                             "for SD, 6 for DiT)")
    tr.add_argument("--prompts", help="prompt file of a text teacher (trajectory i takes prompt i mod their number)")
    tr.add_argument("--resolution", type=int, help="image side of a latent teacher (default: its sample size)")
    tr.add_argument("--shard-size", type=int, default=64, help="trajectories per shard (default 64)")
    tr.add_argument("--batch-size", type=int, default=64, help="trajectories sampled together (default 64)")
    tr.add_argument("--dtype", default="float32", help="storage dtype of states and targets: float32, float16, "
                                                       "bfloat16 (default float32)")
    tr.add_argument("--seed", type=int, default=0, help="trajectory i uses a seed derived from (seed, i)")
    tr.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing folder of other settings")
    tr.set_defaults(func=cmd_trajectories)

    a = sub.add_parser("average", help="average the weights of snapshots of one student (post-hoc EMA)",
                       description="Average the denoiser weights of several exported pipelines of the same network "
                                   "(e.g. snapshots of one run at several steps); the other components and the model "
                                   "card are copied from the last pipeline given.")
    a.add_argument("pipelines", nargs="+", help="two or more local pipeline folders")
    a.add_argument("--out", required=True, help="output pipeline folder")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a.set_defaults(func=cmd_average)

    from stepdistill.eval.harness import METRICS

    e = sub.add_parser("eval", help="FID / KID / precision / recall / FD-digits / accuracy / grain / CLIP score",
                       description="Evaluate a pipeline (sampled here) or a samples.npz; writes OUT/metrics.json.")
    e.add_argument("source", help="pipeline folder, 'digits16', or a samples .npz")
    e.add_argument("--ref", default="digits16", help="digits16, a stats .npz (mu, sigma) or an image folder")
    e.add_argument("--metrics", default=",".join(m for m in METRICS if m != "clip"),
                   help=f"comma list of {', '.join(METRICS)} (precision/recall: Kynkaenniemi et al. 2019, k = 3, in "
                        "Inception space; *_digits: in the digits classifier's)")
    e.add_argument("--clip-model", help="local CLIP model folder for the clip metric")
    e.add_argument("--degrain", action="store_true",
                   help="digits16 diagnostic: evaluate the samples with their grain (the part off the space of "
                        "upsampled 8x8 digits) removed, to see how much of a FID gap is grain")
    add_gen(e)
    e.set_defaults(func=cmd_eval)

    st = sub.add_parser("stats", help="FID reference statistics of your own image folder (for eval --ref)",
                        description="Compute the Inception mu/sigma of every image in FOLDER, resized and "
                                    "center-cropped to --resolution (the size of your samples), and save them as "
                                    "an .npz for `stepdistill eval --ref`.")
    st.add_argument("folder", help="image folder (searched recursively)")
    st.add_argument("--resolution", type=int, required=True, help="side length of the generated samples, e.g. 512")
    st.add_argument("--out", required=True, help="output .npz file")
    st.add_argument("--device", help="torch device")
    st.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    st.set_defaults(func=cmd_stats)

    b = sub.add_parser("bench", help="benchmarks: the digits16 teacher baseline, distillation reports",
                       description="teacher: sample the shipped digits16 teacher at 50 steps + CFG, at 8/4/2/1 "
                                   "steps + CFG and at 50 steps without CFG, evaluate each at equal N and print the "
                                   "baseline table. dmd2 / consistency: "
                                   "distill the teacher (configs/digits16_dmd2.yaml; configs/digits16_lcm*.yaml and "
                                   "digits16_multiphase.yaml), evaluate the students against the teacher at equal N, "
                                   "write report.md, metrics.json, grids and loss plots.")
    b.add_argument("which", help="benchmark: real (the metrics' floor: real digits at the same N), teacher, dmd2, "
                                 "consistency (LCM, LCM-LoRA and multiphase), vsd (beside a DMD2 student), msd "
                                 "(4 students vs one DMD2 student, smaller students, parallel training), agd "
                                 "(adapter guidance vs CFG at equal steps, a sweep over w) or memory "
                                 "(peak memory of one DMD2 and one LCM step with float32 vs bfloat16 frozen parts)")
    b.add_argument("--config", help="training config of a distillation benchmark (one student instead of the "
                                    "defaults)")
    b.add_argument("--student-steps", help="comma list of student step counts (default: the trained timesteps; "
                                           "1,2,4 for consistency)")
    b.add_argument("--curve", help="comma list of training steps: evaluate the student after each (one resumed run) "
                                   "and plot FID against training time, e.g. 250,500,1000,2000")
    b.add_argument("overrides", nargs="*", help="dotted key=value overrides of the training config")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--num-samples", type=int, default=500, help="samples per configuration (default 500)")
    b.add_argument("--pipeline", default="digits16", help="teacher pipeline (default: the shipped digits16)")
    b.add_argument("--device", help="torch device")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand anywhere after the subcommand (argparse would bind them before the options).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("train", "bench") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except UserError as e:
        print(f"stepdistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stepdistill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
