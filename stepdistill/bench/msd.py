"""``stepdistill bench msd``: multi-student distillation against the single DMD2 student, side by side in one run.

Rows: the teacher (50-step CFG, 1-step), the single DMD2 student (``digits16_dmd2``, S steps), 4 same-size students
(``digits16_msd``) at equal total student updates (S steps: each student gets a quarter) and at equal updates per
student (4 S steps), 4 smaller students (``digits16_msd_small``: score matching, then distribution matching at equal
updates per student), each pooled and per student (against the real digits of the student's classes; the single
student's samples are split by the same classes). Then the parallel-training ratio: 2 students on 2 processes
against the same 2 students trained in turn on 1 process, at equal updates per student, both as fresh
``stepdistill train`` processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stepdistill.errors import UserError
from stepdistill.eval.harness import per_student
from stepdistill.files import prepare_out_dir
from stepdistill.loop import train
from stepdistill.pipelines import family_of, load_pipeline
from stepdistill.trainers import load_config

from .report import METRICS, _check_num_samples, _teacher_rows, _write, measure, plot_losses

PER_STUDENT_METRICS = ["fid", "kid", "precision", "recall", "accuracy", "recall_digits"]


def _train(cfg, run: Path, stages: list[dict] | None = None) -> float:
    """Train ``cfg`` into ``run`` (then each of ``stages``: dotted overrides of a continuation with
    --allow-changes); returns the wall seconds."""
    t = time.perf_counter()
    train(cfg, run)
    for stage in stages or []:  # the run's resolved config.yaml with the stage's new values
        train(load_config(run / "config.yaml", [f"{k}={v}" for k, v in stage.items()]), run, allow_changes=True)
    return time.perf_counter() - t


def _split(row: dict, images: np.ndarray, router, device) -> list[dict]:
    """Per-student rows of one measured row: its samples split by ``router``'s classes."""
    labels = np.arange(len(images)) % len(router.class_to_student)
    owners = router.route_labels(labels)
    classes_of = [router.classes_of(k) for k in range(router.num_students)]
    rows = per_student(owners, classes_of, images, labels, None, "digits16", PER_STUDENT_METRICS, device)
    return [{"name": f"{row['name']} / student {r['student']} {classes_of[r['student']]}", "steps": row["steps"],
             "guidance": 1.0, "nfe": row["nfe"], **{k: v for k, v in r.items() if k not in ("student", "reference")}}
            for r in rows]


def parallel_ratio(out_dir: Path, steps: int, overrides: list[str], repeats: int = 3) -> dict:
    """Wall time of 2 students on 2 processes (``steps`` steps) and on 1 process (2 x ``steps``), fresh processes;
    and, as the machine's own limit, two independent single-student runs started together against one alone.

    Every process computes on one thread, i.e. one core stands for one device: a single process would otherwise
    spread its tensor ops over all the cores that the two processes have to share, and the ratio would measure
    torch's intra-op threading instead of students trained side by side (on GPUs each process has its own). Two
    processes that never communicate still slow each other down where cores share caches and memory bandwidth; the
    control run measures that floor on this machine, so the ratio can be read against it. Each is the median of
    ``repeats`` interleaved measurements."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    common = ["--config", "digits16_msd", "--overwrite", "method_args.num_students=2", "train.sample_every=0",
              "train.checkpoint_every=0", "train.tracker=none", *overrides]
    train_cmd = [sys.executable, "-m", "stepdistill", "train", "msd"]

    def timed(name: str, cmds: list[list[str]]) -> float:
        t = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for cmd in cmds]
        outs = [p.communicate() for p in procs]
        seconds = time.perf_counter() - t
        for p, (_, err) in zip(procs, outs):
            if p.returncode:
                raise RuntimeError(f"{name} run failed: {err[-2000:]}")
        return seconds

    def loop_seconds(run: str) -> float:  # the training loop alone, as the run logged it (no start-up, no export)
        return json.loads((out_dir / run / "logs.jsonl").read_text().splitlines()[-1])["wall_time"]

    runs = {"1 process": [[*train_cmd, "--out", str(out_dir / "parallel_1proc"), *common,
                           f"train.max_steps={2 * steps}"]],
            "2 processes": [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "stepdistill", "train", "msd", "--out", str(out_dir / "parallel_2proc"), *common,
                             f"train.max_steps={steps}"]]}
    one = ["method_args.train_students=[0]", f"train.max_steps={steps}"]
    controls = {"alone": [[*train_cmd, "--out", str(out_dir / "control_alone"), *common, *one]],
                "side by side": [[*train_cmd, "--out", str(out_dir / f"control_{i}"), *common, *one]
                                 for i in range(2)]}
    # Interleaved repeats, medians: this machine's speed drifts over minutes (shared hosts), which would otherwise
    # land on one side of a ratio.
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, cmds in (*runs.items(), *controls.items()):
            samples.setdefault(name, []).append(timed(name, cmds))
        for name in runs:
            samples.setdefault(f"loop {name}", []).append(loop_seconds(f"parallel_{name[0]}proc"))
    med = {k: float(np.median(v)) for k, v in samples.items()}
    return {"steps_1proc": 2 * steps, "steps_2proc": steps, "threads_per_process": 1, "repeats": repeats,
            "seconds": {k: med[k] for k in runs}, "ratio": med["2 processes"] / med["1 process"],
            "loop_seconds": {k: med[f"loop {k}"] for k in runs},
            "loop_ratio": med["loop 2 processes"] / med["loop 1 process"],
            "control_seconds": {k: med[k] for k in controls},
            "control_ratio": med["side by side"] / (2 * med["alone"]), "all": samples}


def run_msd_bench(out: str | Path, overrides: list[str] | None = None, num_samples: int = 500,
                  overwrite: bool = False, device=None, seed: int = 0, parallel_steps: int = 200,
                  small_sm_steps: int = 400, base_steps: int | None = None) -> list[dict]:
    """Run the benchmark (module docstring); ``base_steps`` replaces S, the DMD2 recipe's steps (for quick checks)."""
    _check_num_samples(num_samples)
    overrides = list(overrides or [])
    if any(o.split("=")[0] in ("train.max_steps", "method_args.stage") for o in overrides):
        raise UserError("bench msd sets train.max_steps and method_args.stage itself (from the DMD2 recipe's steps)")
    single = load_config("digits16_dmd2", overrides, method="dmd2")
    if base_steps:
        single.train.max_steps = base_steps
    S = single.train.max_steps
    msd_total = load_config("digits16_msd", [*overrides, f"train.max_steps={S}"], method="msd")
    K = msd_total.method_args.num_students
    msd_each = load_config("digits16_msd", [*overrides, f"train.max_steps={K * S}"], method="msd")
    small = load_config("digits16_msd_small", [*overrides, f"train.max_steps={small_sm_steps}"], method="msd")
    small_dm = {"method_args.stage": msd_each.method_args.stage, "method_args.fake_updates_per_student":
                msd_each.method_args.fake_updates_per_student, "optim.student.lr": msd_each.optim["student"].lr,
                "train.max_steps": small_sm_steps + K * S}
    out_dir = prepare_out_dir(out, overwrite)
    t0 = time.perf_counter()
    runs = [("dmd2 single", single, None), (f"msd x{K} equal total updates", msd_total, None),
            (f"msd x{K} equal updates per student", msd_each, None), (f"msd x{K} small", small, [small_dm])]
    students, train_seconds = [], {}
    for label, cfg, stages in runs:
        run = out_dir / label.replace(" ", "_")
        train_seconds[label] = _train(cfg, run, stages)
        plot_losses(run / "logs.jsonl", out_dir / f"losses_{label.replace(' ', '_')}.png")
        students.append((label, load_pipeline(str(run / "pipeline"), device=device)))
    teacher = load_pipeline(single.teacher, device=device)
    rows, _ = _teacher_rows(teacher, (50, 1), num_samples, out_dir, seed, device, METRICS)
    router = students[1][1].router
    by_label = {}
    for label, pipe in students:
        row, images = measure(pipe, label, 1, 1.0, num_samples, out_dir, seed, device=device)
        row["train_minutes"] = train_seconds[label] / 60
        row["parameters_per_student"] = sum(p.numel() for p in family_of(pipe).network.parameters())
        rows.append(row)
        by_label[label] = row
        rows.extend(_split(row, images, router, device))
    parallel = parallel_ratio(out_dir, parallel_steps, overrides)
    wall = time.perf_counter() - t0

    one, tot, each, sm = (by_label[label] for label, _, _ in runs)

    def cmp(a: dict, b: dict) -> str:
        return ", ".join(f"{k} {a[k]:.4g} vs {b[k]:.4g}" for k in ("fid", "kid", "precision", "recall", "accuracy"))

    goals = [
        f"- {K} students at equal updates per student vs the single student: {cmp(each, one)} "
        f"(target: lower FID: {'met' if each['fid'] < one['fid'] else 'missed'})",
        f"- {K} students at equal total updates vs the single student: {cmp(tot, one)} "
        f"(target: FID no worse: {'met' if tot['fid'] <= one['fid'] else 'missed'})",
        f"- small students ({sm['parameters_per_student']} vs {each['parameters_per_student']} parameters each, "
        f"{sm['parameters_per_student'] / each['parameters_per_student']:.2f}x): sampling "
        f"{sm['samples_per_s'] / each['samples_per_s']:.2f}x the same-size students' samples/s (target >= 1.8x), "
        f"FID {sm['fid'] / each['fid']:.2f}x theirs (target <= 1.3x)",
        f"- parallel training (one thread per process), 2 students with {parallel['steps_2proc'] // 5} updates "
        f"each: 2 processes "
        f"{parallel['seconds']['2 processes']:.0f} s vs 1 process {parallel['seconds']['1 process']:.0f} s: "
        f"{parallel['ratio']:.2f}x the wall time (target <= 0.6x; the training loops alone "
        f"{parallel['loop_ratio']:.2f}x; two independent single-student runs side by side take "
        f"{parallel['control_ratio']:.2f}x the time of the two one after the other on this machine, the floor of "
        "any two processes)",
    ]
    trained = "; ".join(f"{label}: {c.train.max_steps} steps ({train_seconds[label] / 60:.1f} min)"
                        for label, c, _ in runs)
    notes = (f"`stepdistill bench msd --out {out} --num-samples {num_samples}"
             f"{' ' + ' '.join(overrides) if overrides else ''}`. Teacher `{single.teacher}`. Runs: {trained}; "
             f"the small students: {small_sm_steps} steps of score matching, then distribution matching to step "
             f"{small_dm['train.max_steps']}. N = {num_samples} samples per pooled row (equal per class, sample i "
             f"from seed {seed} + i); per-student rows are that row's samples of the student's classes against the "
             f"real digits of those classes. Total wall time {wall / 60:.1f} min.\n\n" + "\n".join(goals))
    table = _write(out_dir, f"digits16: multi-student distillation ({K} students) vs one DMD2 student", rows, notes,
                   {"num_samples": num_samples, "seed": seed, "overrides": overrides, "train_seconds": train_seconds,
                    "parallel": parallel, "wall_seconds": wall})
    print(table)
    print("\n".join(goals))
    print(f"-> {out_dir / 'report.md'}")
    (out_dir / "parallel.json").write_text(json.dumps(parallel, indent=1))
    return rows
