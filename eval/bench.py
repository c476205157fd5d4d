"""The digits16 teacher baseline: the numbers every student must beat, measured side by side in one run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stepdistill.utils import prepare_out_dir, save_grid

# (label, steps, guidance) of the baseline table. 50 steps with CFG is the teacher's quality reference; the few-step
# rows show what plain sampling of the teacher gives at a student's budget (same CFG scale).
TEACHER_GUIDANCE = 2.0
BASELINE_ROWS = [("teacher 50-step CFG", 50), ("teacher 8-step", 8), ("teacher 4-step", 4), ("teacher 2-step", 2),
                 ("teacher 1-step", 1)]
METRICS = ["fid", "kid", "fd_digits", "accuracy"]


def markdown_table(rows: list[dict]) -> str:
    """The baseline / report table as GitHub markdown."""
    head = "| model | steps | NFE | FID | KID x1e3 | FD-digits | accuracy | samples/s | speed-up |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} "
            f"| {r['fd_digits']:.3f} | {100 * r['accuracy']:.1f}% | {r['samples_per_s']:.1f} | {r['speedup']:.1f}x |"
        )
    return "\n".join(lines)


def run_teacher_baseline(out: str | Path, num_samples: int = 500, overwrite: bool = False, device=None,
                         pipeline: str = "digits16", seed: int = 0, batch_size: int = 250) -> list[dict]:
    """Sample the teacher at each baseline configuration, evaluate all at equal N, write report + metrics."""
    from stepdistill.eval.generation import generate
    from stepdistill.eval.harness import evaluate
    from stepdistill.pipelines import load_pipeline

    out_dir = prepare_out_dir(out, overwrite)
    pipe = load_pipeline(pipeline, device=device)
    rows = []
    t_start = time.perf_counter()
    for name, steps in BASELINE_ROWS:
        res = generate(pipe, num_samples, steps, TEACHER_GUIDANCE, seed, batch_size)
        slug = name.replace(" ", "_")
        save_grid(res["images"][:100], out_dir / f"grid_{slug}.png", nrow=10)
        metrics = evaluate(res["images"], res["labels"], None, ref="digits16", metrics=METRICS, device=device)
        nfe = steps * (2 if TEACHER_GUIDANCE != 1.0 else 1)
        rows.append({"name": name, "steps": steps, "guidance": TEACHER_GUIDANCE, "nfe": nfe,
                     "samples_per_s": num_samples / res["seconds"], **metrics})
    ref = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup"] = r["samples_per_s"] / ref
    table = markdown_table(rows)
    wall = time.perf_counter() - t_start
    (out_dir / "metrics.json").write_text(json.dumps({"rows": rows, "num_samples": num_samples, "seed": seed,
                                                      "pipeline": pipeline, "wall_seconds": wall},
                                                     indent=2, default=_json_default))
    (out_dir / "report.md").write_text(
        f"# digits16 teacher baseline\n\nN = {num_samples} samples per row (equal per class), reference = all "
        f"1797 real digits16 images, CFG w = {TEACHER_GUIDANCE}, DDIM (trailing) sampler.\n\n{table}\n\n"
        f"Wall time {wall / 60:.1f} min.\n")
    print(table)
    print(f"-> {out_dir / 'report.md'}")
    return rows


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
