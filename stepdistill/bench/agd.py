"""``stepdistill bench agd``: adapter guidance distillation against classifier-free guidance, side by side in one run.

Writes CFG trajectories of the digits16 teacher (``stepdistill trajectories``), trains the adapters
(``configs/digits16_agd.yaml``), then samples the teacher with CFG (two network calls per step) and with the
adapters (one call) at equal sampler steps (50 and 10) at the recipe's default w, and a sweep over w at 10 steps;
every row with FID, KID, precision / recall, accuracy and measured samples/s. Writes report.md, metrics.json,
sweep.png and the grids.
"""

from __future__ import annotations

import time
from pathlib import Path

from stepdistill.errors import UserError
from stepdistill.files import prepare_out_dir
from stepdistill.loop import train
from stepdistill.pipelines import family_of, load_pipeline
from stepdistill.pipelines.trajectories import write_trajectories
from stepdistill.trainers import load_config

from .report import _check_num_samples, _write, measure, plot_losses, plt

SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)


def _plot_sweep(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for kind in ("CFG", "AGD"):
        pts = sorted((r["guidance"], r) for r in rows if r.get("sweep") == kind)
        for ax, key in zip(axes, ("fid", "accuracy")):
            ax.plot([w for w, _ in pts], [r[key] for _, r in pts], marker="o", label=kind)
            ax.set_xlabel("guidance scale w")
            ax.set_ylabel(key)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_agd_bench(out: str | Path, overrides: list[str] | None = None, num_samples: int = 500,
                  overwrite: bool = False, device=None, seed: int = 0, num_trajectories: int = 2000,
                  trajectory_steps: int = 50, sweep: tuple[float, ...] = SWEEP,
                  steps: tuple[int, ...] = (50, 10)) -> list[dict]:
    """Run the benchmark (module docstring)."""
    _check_num_samples(num_samples)
    overrides = list(overrides or [])
    if any(o.split("=")[0] == "data.source" for o in overrides):
        raise UserError("bench agd writes its own trajectories: drop the data.source override")
    traj = Path(out) / "trajectories"
    cfg = load_config("digits16_agd", [*overrides, f"data.source={traj}"], method="agd")  # errors before --out
    out_dir = prepare_out_dir(out, overwrite)
    w_default = cfg.method_args.default_guidance
    t0 = time.perf_counter()
    write_trajectories(cfg.teacher, traj, num_trajectories, steps=trajectory_steps, w_min=min(sweep),
                       w_max=max(sweep), seed=seed, device=device)
    traj_seconds = time.perf_counter() - t0
    run = out_dir / "agd_run"
    t1 = time.perf_counter()
    train(cfg, run)
    train_seconds = time.perf_counter() - t1
    plot_losses(run / "logs.jsonl", out_dir / "losses_agd.png")
    teacher = load_pipeline(cfg.teacher, device=device)
    agd = load_pipeline(str(run / "pipeline"), device=device)
    base_params = sum(p.numel() for p in family_of(teacher).network.parameters())
    adapter_params = agd.adapters.num_parameters()

    rows, pairs = [], []
    for n in steps:
        cfg_row, _ = measure(teacher, f"teacher {n} steps CFG w={w_default}", n, w_default, num_samples, out_dir, seed,
                             device=device)
        agd_row, _ = measure(agd, f"AGD {n} steps w={w_default}", n, w_default, num_samples, out_dir, seed,
                             device=device)
        rows += [cfg_row, agd_row]
        pairs.append((n, cfg_row, agd_row))
    sweep_rows = []
    n_sweep = min(steps)
    # The sweep's point at the default w was measured above already.
    done = {(kind, w_default): row for n, c, a in pairs if n == n_sweep for kind, row in (("CFG", c), ("AGD", a))}
    for w in sweep:
        for kind, pipe in (("CFG", teacher), ("AGD", agd)):
            if (kind, w) in done:
                row = dict(done[(kind, w)])
            else:
                row, _ = measure(pipe, f"{kind} sweep {n_sweep} steps w={w}", n_sweep, w, num_samples, out_dir, seed,
                                 device=device)
            row["sweep"] = kind
            sweep_rows.append(row)
    _plot_sweep(sweep_rows, out_dir / "sweep.png")
    rows += [r for r in sweep_rows if "sweep" in r["name"]]
    wall = time.perf_counter() - t0

    goals = []
    for n, c, a in pairs:
        goals.append(f"- {n} steps at w = {w_default}: FID {a['fid']:.2f} vs CFG {c['fid']:.2f} "
                     f"({a['fid'] / c['fid']:.3f}x, target <= 1.05x); accuracy {a['accuracy']:.3f} vs "
                     f"{c['accuracy']:.3f}; precision {a['precision']:.3f} vs {c['precision']:.3f}; recall "
                     f"{a['recall']:.3f} vs {c['recall']:.3f}; wall time per sample "
                     f"{c['samples_per_s'] / a['samples_per_s']:.2f}x CFG's (target <= 0.53x)")
    goals.append(f"- adapter parameters: {adapter_params:,} = {100 * adapter_params / base_params:.2f}% of the "
                 f"teacher's {base_params:,} (target <= 5%)")
    sweep_line = "; ".join(f"w={r['guidance']}: {r['sweep']} FID {r['fid']:.2f} acc {r['accuracy']:.3f}"
                           for r in sweep_rows)
    notes = (f"`stepdistill bench agd --out {out} --num-samples {num_samples}"
             f"{' ' + ' '.join(overrides) if overrides else ''}`. Teacher `{cfg.teacher}`. {num_trajectories} "
             f"trajectories of {trajectory_steps} DDIM steps at w ~ U[{min(sweep)}, {max(sweep)}] "
             f"({traj_seconds / 60:.1f} min), then {cfg.train.max_steps} adapter steps ({train_seconds / 60:.1f} "
             f"min, {cfg.method_args.kind} adapters, hidden {cfg.method_args.hidden}). N = {num_samples} samples per "
             f"row (equal per class, sample i from seed {seed} + i). NFE counts network calls per sample. Sweep at "
             f"{n_sweep} steps (sweep.png): {sweep_line}. Total wall time {wall / 60:.1f} min.\n\n" + "\n".join(goals))
    table = _write(out_dir, "digits16: adapter guidance distillation (one pass) vs CFG (two passes)", rows, notes,
                   {"num_samples": num_samples, "seed": seed, "overrides": overrides, "adapter_parameters":
                    adapter_params, "teacher_parameters": base_params, "trajectory_seconds": traj_seconds,
                    "train_seconds": train_seconds, "wall_seconds": wall, "sweep": sweep_rows})
    print(table)
    print("\n".join(goals))
    print(f"-> {out_dir / 'report.md'}")
    return rows
