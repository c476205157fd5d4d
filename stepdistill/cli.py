"""The ``stepdistill`` command line: train / config / sample / trajectories / average / eval / stats / bench.

User mistakes (bad config, missing folder, existing output, ...) are reported as one line on stderr with exit
code 2; anything else is a bug and keeps its traceback. The parser imports nothing heavy, so ``--help`` answers at
once; a command's implementation (:mod:`stepdistill.commands`, which imports torch and diffusers) is imported when it
runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError
from .eval.metric_names import METRICS

# Benchmarks (`stepdistill bench WHICH`), for the parser's help.
BENCHES = ("real", "teacher", "dmd2", "consistency", "vsd", "scm", "msd", "agd", "memory")


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
    t.set_defaults(command="train")

    c = sub.add_parser("config", help="list methods and shipped recipes; show every config key with its help",
                       description="list: the methods and the shipped recipes. show METHOD: every method_args key "
                                   "with its type, default and help; show run: the keys every run has (data, "
                                   "train, optim).")
    c.add_argument("action", choices=["list", "show"])
    c.add_argument("name", nargs="?", help="method name (dmd2, consistency, teacher) or 'run'")
    c.add_argument("--long", action="store_true", help="full help text instead of its first sentence")
    c.add_argument("--markdown", action="store_true", help="markdown tables (what docs/methods/*.md hold)")
    c.set_defaults(command="config")

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
    s.set_defaults(command="sample")

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
    tr.set_defaults(command="trajectories")

    a = sub.add_parser("average", help="average the weights of snapshots of one student (post-hoc EMA)",
                       description="Average the denoiser weights of several exported pipelines of the same network "
                                   "(e.g. snapshots of one run at several steps); the other components and the model "
                                   "card are copied from the last pipeline given.")
    a.add_argument("pipelines", nargs="+", help="two or more local pipeline folders")
    a.add_argument("--out", required=True, help="output pipeline folder")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a.set_defaults(command="average")

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
    e.set_defaults(command="eval")

    st = sub.add_parser("stats", help="FID reference statistics of your own image folder (for eval --ref)",
                        description="Compute the Inception mu/sigma of every image in FOLDER, resized and "
                                    "center-cropped to --resolution (the size of your samples), and save them as "
                                    "an .npz for `stepdistill eval --ref`.")
    st.add_argument("folder", help="image folder (searched recursively)")
    st.add_argument("--resolution", type=int, required=True, help="side length of the generated samples, e.g. 512")
    st.add_argument("--out", required=True, help="output .npz file")
    st.add_argument("--device", help="torch device")
    st.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    st.set_defaults(command="stats")

    b = sub.add_parser("bench", help="benchmarks: the digits16 teacher baseline, distillation reports",
                       description="teacher: sample the shipped digits16 teacher at 50 steps + CFG, at 8/4/2/1 "
                                   "steps + CFG and at 50 steps without CFG, evaluate each at equal N and print the "
                                   "baseline table. dmd2 / consistency: "
                                   "distill the teacher (configs/digits16_dmd2.yaml; configs/digits16_lcm*.yaml and "
                                   "digits16_multiphase.yaml), evaluate the students against the teacher at equal N, "
                                   "write report.md, metrics.json, grids and loss plots.")
    b.add_argument("which", help="benchmark: real (the metrics' floor: real digits at the same N), teacher, dmd2, "
                                 "consistency (LCM, LCM-LoRA and multiphase), vsd (beside a DMD2 student), scm (sCM "
                                 "beside rCM, DMD2 and LCM at 1, 2, 4 steps, and the training-step cost of each), msd "
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
    b.set_defaults(command="bench")
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
        # The command's implementation, imported now: the parser alone must not pay torch's and diffusers' imports.
        commands = importlib.import_module("stepdistill.commands")
        return getattr(commands, f"cmd_{args.command}")(args)
    except UserError as e:
        print(f"stepdistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stepdistill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
