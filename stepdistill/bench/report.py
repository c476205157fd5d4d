"""Benchmarks measured side by side in one run: the digits16 teacher baseline and the DMD2 main job.

Every row is sampled with the same seeds (sample i from seed + i, balanced classes) and evaluated at the same N
against all 1797 real digits16 images, so the rows can be compared with each other (not with other tools' FIDs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from stepdistill.errors import UserError
from stepdistill.eval.generation import generate
from stepdistill.eval.harness import digits16_uint8, evaluate
from stepdistill.files import prepare_out_dir
from stepdistill.images import make_grid, save_grid
from stepdistill.loop import train
from stepdistill.pipelines import AdapterGuidancePipeline, load_pipeline
from stepdistill.trainers import load_config

from .step_cost import step_cost, step_cost_table

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

# The teacher's CFG scale for every teacher row; 50 steps with CFG is its quality reference.
TEACHER_GUIDANCE = 2.0
TEACHER_STEPS = (50, 8, 4, 2, 1)
# `bench teacher` also samples the teacher without CFG at this many steps: CFG trades distribution coverage for
# sharper class-typical samples, and the unguided row shows what that costs in FID / KID (the distribution a
# student trained with DMD2's real_guidance = 1 is matched to).
TEACHER_UNGUIDED_STEPS = 50
# The report tables' metric columns, in order; by default every one is computed.
TABLE_METRICS = ("fid", "kid", "precision", "recall", "fd_digits", "accuracy", "precision_digits", "recall_digits",
                 "grain")
METRICS = list(TABLE_METRICS)
# Column titles of the report tables.
TABLE_HEADS = {"fid": "FID", "kid": "KID x1e3", "precision": "precision", "recall": "recall", "fd_digits": "FD-digits",
               "accuracy": "accuracy", "precision_digits": "precision (digits)", "recall_digits": "recall (digits)",
               "grain": "grain x1e3"}


def measure(pipe, name: str, steps: int, guidance: float, num_samples: int, out_dir: Path, seed: int = 0,
            batch_size: int = 250, device=None, metrics: list[str] = METRICS, teacher=None,
            teacher_steps: int = 0) -> tuple[dict, np.ndarray]:
    """Sample one configuration (a student at its recorded schedule for ``steps``, if any; with ``teacher_steps``
    the teacher's first steps at CFG ``TEACHER_GUIDANCE``, then the student), evaluate it, save its grid; returns
    (row, images)."""
    res = generate(pipe, num_samples, steps, guidance, seed, batch_size, teacher=teacher, teacher_steps=teacher_steps,
                   teacher_guidance=TEACHER_GUIDANCE)
    save_grid(res["images"][:100], out_dir / f"grid_{name.replace(' ', '_')}.png", nrow=10)
    values = evaluate(res["images"], res["labels"], None, ref="digits16", metrics=metrics, device=device)
    # CFG costs two network calls per step, except through guidance adapters (an AdapterGuidancePipeline: one).
    two = guidance != 1.0 and not isinstance(pipe, AdapterGuidancePipeline)
    nfe = steps * (2 if two else 1) + 2 * teacher_steps
    row = {"name": name, "steps": steps, "guidance": guidance, "nfe": nfe,
           "samples_per_s": num_samples / res["seconds"], "timesteps": res["timesteps"], **values}
    return row, res["images"]


def _cell(r: dict, key: str) -> str:
    """One metric cell of the report table ("-" when the metric was not computed)."""
    v = r.get(key)
    if v is None:
        return "-"
    if key == "kid":
        return f"{1e3 * v:.2f} ± {1e3 * r.get('kid_std', 0.0):.2f}"
    if key in ("accuracy", "precision", "recall", "precision_digits", "recall_digits"):
        return f"{100 * v:.1f}%"
    if key == "grain":
        return f"{1e3 * v:.1f}"
    return f"{v:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """Rows as a GitHub markdown table; speed-up is relative to the first row."""
    ref = rows[0]["samples_per_s"]
    heads = " | ".join(TABLE_HEADS[k] for k in TABLE_METRICS)
    lines = [f"| model | steps | NFE | {heads} | samples/s | speed-up |", "|---" * (len(TABLE_METRICS) + 5) + "|"]
    for r in rows:
        cells = " | ".join(_cell(r, k) for k in TABLE_METRICS)
        speed = (f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / ref:.1f}x" if "samples_per_s" in r
                 else "- | -")  # rows of a subset of another row's samples (e.g. one student's) have no speed
        lines.append(f"| {r['name']} | {r['steps']} | {r['nfe']} | {cells} | {speed} |")
    return "\n".join(lines)


def side_by_side(named_images: list[tuple[str, np.ndarray]], path: Path, per_model: int = 30) -> None:
    """One PNG with a block of samples per model, left to right (first ``per_model`` samples = 3 per class)."""
    blocks = [make_grid(imgs[:per_model], nrow=10, upscale=3) for _, imgs in named_images]
    h = max(b.shape[0] for b in blocks) + 14
    w = sum(b.shape[1] for b in blocks) + 8 * (len(blocks) - 1)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (name, _), b in zip(named_images, blocks):
        draw.text((x + 2, 0), name, fill="black")
        canvas.paste(Image.fromarray(b), (x, 14))
        x += b.shape[1] + 8
    canvas.save(path)


def plot_losses(logs_jsonl: Path, path: Path) -> None:
    """Plot every ``*loss*`` series of a run's logs.jsonl against the step, one panel per series."""
    rows = [json.loads(line) for line in logs_jsonl.read_text().splitlines() if line.strip()]
    keys = sorted({k for r in rows for k in r if "loss" in k or "grad_norm" in k})
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(out_dir: Path, title: str, rows: list[dict], notes: str, extra: dict) -> str:
    table = markdown_table(rows)
    (out_dir / "metrics.json").write_text(json.dumps({"rows": rows, **extra}, indent=2, default=_json_default))
    (out_dir / "report.md").write_text(f"# {title}\n\n{notes}\n\n{table}\n")
    return table


def _teacher_rows(pipe, steps_list, num_samples: int, out_dir: Path, seed: int, device,
                  metrics: list[str]) -> tuple[list[dict], list[tuple[str, np.ndarray]]]:
    """The teacher sampled at each step count with CFG ``TEACHER_GUIDANCE``: (rows, (name, images) for grids)."""
    rows, named = [], []
    for steps in steps_list:
        name = f"teacher {steps}-step" + (" CFG" if steps == 50 else "")
        row, images = measure(pipe, name, steps, TEACHER_GUIDANCE, num_samples, out_dir, seed, device=device,
                              metrics=metrics)
        rows.append(row)
        named.append((name, images))
    return rows, named


def run_teacher_baseline(out: str | Path, num_samples: int = 500, overwrite: bool = False, device=None,
                         pipeline: str = "digits16", seed: int = 0, metrics: list[str] = METRICS) -> list[dict]:
    """The teacher at 50 steps with CFG, at 8/4/2/1 steps with CFG and at 50 steps without CFG, evaluated at equal
    N; writes report + metrics."""
    _check_num_samples(num_samples)
    out_dir = prepare_out_dir(out, overwrite)
    pipe = load_pipeline(pipeline, device=device)
    t0 = time.perf_counter()
    rows, named = _teacher_rows(pipe, TEACHER_STEPS, num_samples, out_dir, seed, device, metrics)
    name = f"teacher {TEACHER_UNGUIDED_STEPS}-step no CFG"
    row, images = measure(pipe, name, TEACHER_UNGUIDED_STEPS, 1.0, num_samples, out_dir, seed, device=device,
                          metrics=metrics)
    rows.append(row)
    named.append((name, images))
    side_by_side(named, out_dir / "grids_side_by_side.png")
    wall = time.perf_counter() - t0
    notes = (f"N = {num_samples} samples per row (equal per class, sample i from seed {seed} + i), reference = all "
             f"1797 real digits16 images, CFG w = {TEACHER_GUIDANCE} on every row but the last (w = 1, no CFG), DDIM "
             f"(trailing) sampler. "
             f"Wall time {wall / 60:.1f} min.")
    table = _write(out_dir, "digits16 teacher baseline", rows, notes,
                   {"num_samples": num_samples, "seed": seed, "pipeline": pipeline, "wall_seconds": wall})
    print(table)
    print(f"-> {out_dir / 'report.md'}")
    return rows


def teacher_step_counts(student_steps: list[int] | None) -> tuple[int, ...]:
    """The teacher's few-step rows of a distillation report: 4 and 1 steps, plus every step count the students are
    sampled at (so each student row has the teacher at the same step count beside it)."""
    return tuple(sorted({4, 1} | set(student_steps or []), reverse=True))


def _student_rows(pipe, label: str, steps_list: list[int] | None) -> list[tuple[str, int]]:
    """(row name, steps) for a student pipeline: its trained step count, or each of ``steps_list``.

    ``generate`` applies the student's recorded schedule for each step count (trained ``student_timesteps``,
    recommended ``sample_timesteps``) when its pipeline and scheduler take timesteps.
    """
    if not steps_list:
        steps_list = [len(pipe.scheduler.config.get("student_timesteps") or [999])]
    return [(f"{label} {k}-step", k) for k in steps_list]


def run_real_floor(out: str | Path, num_samples: int = 500, overwrite: bool = False, device=None, seed: int = 0,
                   metrics: list[str] = METRICS) -> dict:
    """The metrics' small-N floor: ``num_samples`` real digits16 images (a seeded random subset) scored against all
    1797 exactly like generated samples. A model cannot be expected to score below this at the same N."""
    _check_num_samples(num_samples)
    images, labels = digits16_uint8()
    if num_samples > len(images):
        raise UserError(f"--num-samples must be at most {len(images)} for real digits16")
    out_dir = prepare_out_dir(out, overwrite)
    idx = np.random.default_rng(seed).choice(len(images), num_samples, replace=False)
    values = evaluate(images[idx], labels[idx], None, ref="digits16", metrics=metrics, device=device)
    row = {"name": f"real digits16 subset (seed {seed})", "steps": 0, "nfe": 0, "samples_per_s": float("nan"),
           **values}
    table = _write(out_dir, "digits16 real-data floor", [row],
                   f"N = {num_samples} real images drawn without replacement (seed {seed}) against all 1797.",
                   {"num_samples": num_samples, "seed": seed})
    print(table)
    return row


def run_distillation_report(method: str, configs: list[tuple[str, str]], out: str | Path,
                            overrides: list[str] | None = None, num_samples: int = 500, overwrite: bool = False,
                            device=None, seed: int = 0, student_steps: list[int] | None = None,
                            teacher_steps: tuple[int, ...] = (4, 1), metrics: list[str] = METRICS,
                            comparisons: list[tuple[str, str]] | None = None,
                            diversity_steps: tuple[int, ...] = (),
                            step_costs: list[tuple[str, str, list[str]]] | None = None) -> list[dict]:
    """The main job: distill the teacher with each ``(label, config)``, then evaluate every student against the
    teacher at equal N, side by side. ``comparisons`` are ``(label, config)`` rows of other methods (each config
    names its method), trained and evaluated the same way; each row reports its training wall time.
    ``diversity_steps``: extra rows of the method's own students sampled with diversity distillation (the teacher
    takes the first K steps at CFG ``TEACHER_GUIDANCE``), one per K. ``step_costs``: ``(label, recipe, overrides)``
    whose training-step cost :func:`~.step_cost.step_cost` measures side by side after the rows (ratios to the first).

    Students are sampled at their trained timesteps, or at each of ``student_steps`` (LCM-type schedulers).
    Writes ``out/<label>/`` (each training run), ``out/report.md``, ``out/metrics.json``, per-row grids, a
    side-by-side grid and ``out/losses_<label>.png``.
    """
    _check_num_samples(num_samples)
    cfgs = [(label, path, load_config(path, overrides, method=method)) for label, path in configs]  # errors first
    cfgs += [(label, path, load_config(path, overrides)) for label, path in comparisons or []]
    if len({c.teacher for _, _, c in cfgs}) != 1:
        raise UserError("all configs of one report must distill the same teacher")
    out_dir = prepare_out_dir(out, overwrite)
    t0 = time.perf_counter()
    students, train_seconds = [], {}
    for label, _, cfg in cfgs:
        t = time.perf_counter()
        run = train(cfg, out_dir / label.replace(" ", "_"))
        train_seconds[label] = time.perf_counter() - t
        plot_losses(run / "logs.jsonl", out_dir / f"losses_{label.replace(' ', '_')}.png")
        students.append((label, load_pipeline(str(run / "pipeline"), device=device)))
    teacher = load_pipeline(cfgs[0][2].teacher, device=device)
    rows, named = _teacher_rows(teacher, (50, *teacher_steps), num_samples, out_dir, seed, device, metrics)
    own_labels = {label for label, _ in configs}
    for label, pipe in students:
        for name, k in _student_rows(pipe, label, student_steps):
            row, images = measure(pipe, name, k, 1.0, num_samples, out_dir, seed, device=device, metrics=metrics)
            row["train_minutes"] = train_seconds[label] / 60
            rows.append(row)
            named.append((name, images))
            for kt in diversity_steps if label in own_labels else ():
                hname = f"{name} + teacher {kt}-step"
                row, images = measure(pipe, hname, k, 1.0, num_samples, out_dir, seed, device=device,
                                      metrics=metrics, teacher=teacher, teacher_steps=kt)
                row["train_minutes"] = train_seconds[label] / 60
                rows.append(row)
                named.append((hname, images))
    side_by_side(named, out_dir / "grids_side_by_side.png")
    wall = time.perf_counter() - t0
    ref = rows[0]
    goals = []
    for r in rows[1 + len(teacher_steps):]:
        parts = []
        for key, better in (("fid", "lower"), ("kid", "lower"), ("fd_digits", "lower"), ("accuracy", "higher"),
                            ("grain", "lower")):
            if r.get(key) is not None and ref.get(key) is not None:
                ok = r[key] <= ref[key] if better == "lower" else r[key] >= ref[key]
                parts.append(f"{key} {_cell(r, key)} vs {_cell(ref, key)} ({'beats or ties' if ok else 'worse'})")
        parts.append(f"{r['samples_per_s'] / ref['samples_per_s']:.1f}x faster")
        goals.append(f"- {r['name']}: " + ", ".join(parts))
    if comparisons:  # each of the method's own rows against each comparison row
        labels = {label for label, _ in comparisons}
        own = [r for r in rows[1 + len(teacher_steps):] if not any(r["name"].startswith(x) for x in labels)]
        other = [r for r in rows[1 + len(teacher_steps):] if any(r["name"].startswith(x) for x in labels)]
        for a in own:
            for b in other:
                parts = [f"train time {a['train_minutes']:.1f} / {b['train_minutes']:.1f} min "
                         f"({a['train_minutes'] / b['train_minutes']:.2f}x)"]
                for key in ("fid", "kid", "precision", "recall", "accuracy"):
                    if a.get(key) is not None and b.get(key) is not None:
                        ratio = f" ({a[key] / b[key]:.2f}x)" if key in ("fid", "kid") and b[key] else ""
                        parts.append(f"{key} {_cell(a, key)} vs {_cell(b, key)}{ratio}")
                goals.append(f"- {a['name']} vs {b['name']}: " + ", ".join(parts))
    schedules = "; ".join(f"{r['name']} {r['timesteps'] or 'scheduler rule'}" for r in rows[1 + len(teacher_steps):])
    costs = step_cost(step_costs, overrides) if step_costs else []
    cost_notes = ("\n\nTraining-step cost (every phase's loss and backward on one batch of the recipe's size, each "
                  "phase weighted by how often it runs, no optimizer update; median of 5 interleaved repeats, "
                  "ratio to the first row):\n\n" + step_cost_table(costs)) if costs else ""
    trained = "; ".join(f"{label}: `stepdistill train {c.method} --config {path}` ({c.train.max_steps} steps, "
                        f"{train_seconds[label] / 60:.1f} min)" for label, path, c in cfgs)
    notes = (f"Teacher `{cfgs[0][2].teacher}`. Students: {trained}"
             f"{'; overrides ' + ' '.join(overrides) if overrides else ''}. N = {num_samples} samples per row "
             f"(equal per class, sample i from seed {seed} + i), reference = all 1797 real digits16 images; teacher "
             f"rows use CFG w = {TEACHER_GUIDANCE} ({type(teacher.scheduler).__name__}), students none. Speed-up is "
             "relative to the "
             f"teacher's 50-step CFG row, measured in this run. Total wall time {wall / 60:.1f} min. Student "
             f"timesteps: {schedules}.\n\n"
             "Students vs the teacher's 50-step CFG row (and vs the comparison rows):\n" + "\n".join(goals)
             + cost_notes + "\n\nFiles: `grids_side_by_side.png`, "
             "`grid_*.png`, `losses_*.png`, one training run folder per student (its `pipeline/` is the student).")
    table = _write(out_dir, f"digits16: {method} students vs their teacher", rows, notes,
                   {"num_samples": num_samples, "seed": seed, "teacher": cfgs[0][2].teacher,
                    "configs": [p for _, p, _ in cfgs], "overrides": overrides or [],
                    "train_seconds": train_seconds, "wall_seconds": wall, "step_costs": costs})
    print(table)
    print("\n".join(goals))
    print(f"-> {out_dir / 'report.md'}")
    return rows


def run_training_curve(method: str, config: str, out: str | Path, milestones: list[int],
                       overrides: list[str] | None = None, num_samples: int = 500, overwrite: bool = False,
                       device=None, seed: int = 0, metrics: list[str] = METRICS) -> list[dict]:
    """Quality against training time: train one run to each milestone in turn (resuming, which the loop makes
    exactly equal to one uninterrupted run), evaluate the student after each, plot FID against training minutes."""
    _check_num_samples(num_samples)
    if not milestones or any(b <= a for a, b in zip(milestones, milestones[1:])) or milestones[0] < 1:
        raise UserError(f"--curve needs increasing positive step counts, got {milestones}")
    cfg = load_config(config, overrides, method=method)
    out_dir = prepare_out_dir(out, overwrite)
    rows, minutes = [], 0.0
    for m in milestones:
        t = time.perf_counter()
        step_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=m))
        run = train(step_cfg, out_dir / "train")
        minutes += (time.perf_counter() - t) / 60
        student = load_pipeline(str(run / "pipeline"), device=device)
        (name, k), = _student_rows(student, f"{method} student", None)
        row, _ = measure(student, f"{name} @ {m} steps", k, 1.0, num_samples, out_dir, seed, device=device,
                         metrics=metrics)
        row.update(train_steps=m, train_minutes=minutes)
        rows.append(row)
        print(f"step {m}: " + ", ".join(f"{key} {_cell(row, key)}" for key in metrics), flush=True)
    plot_losses(run / "logs.jsonl", out_dir / "losses.png")
    fig, ax = plt.subplots(figsize=(4.5, 3))
    key = "fid" if "fid" in metrics else metrics[0]
    ax.plot([r["train_minutes"] for r in rows], [r[key] for r in rows], "o-")
    for r in rows:
        ax.annotate(str(r["train_steps"]), (r["train_minutes"], r[key]), fontsize=7)
    ax.set_xlabel("training minutes (this machine)")
    ax.set_ylabel(key)
    ax.set_title(f"{method}: {key} vs training time (N={num_samples})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=110)
    plt.close(fig)
    lines = ["| steps | training min | " + " | ".join(TABLE_HEADS[k] for k in TABLE_METRICS) + " |",
             "|---" * (len(TABLE_METRICS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['train_steps']} | {r['train_minutes']:.1f} | " +
                     " | ".join(_cell(r, k) for k in TABLE_METRICS) + " |")
    table = "\n".join(lines)
    (out_dir / "curve.md").write_text(f"# {method}: quality vs training time\n\n`{config}`"
                                      f"{' ' + ' '.join(overrides) if overrides else ''}, N = {num_samples}.\n\n"
                                      f"{table}\n")
    (out_dir / "curve.json").write_text(json.dumps(rows, indent=2, default=_json_default))
    print(table)
    return rows


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _check_num_samples(n: int) -> None:
    if n < 10:
        raise UserError("--num-samples must be at least 10 (one per class)")
