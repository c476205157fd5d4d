"""Hashes of short fixed training runs, to prove a refactor changed no number.

Runs every method's digits16 recipe (and tiny SD / SD3 / Flux pipelines built in code) for 6 loop steps through the
`stepdistill train` command, then hashes what the run wrote: every tensor of the step-3 and step-6 checkpoints
(trained weights, EMA, optimizer states), every tensor of the exported pipeline, and the logged losses. Run it on
two commits and compare the JSON files:

    .venv/bin/python .ci/refactor_hashes.py --out /tmp/before.json            # on the old commit
    .venv/bin/python .ci/refactor_hashes.py --out /tmp/after.json             # on the new one
    .venv/bin/python .ci/refactor_hashes.py --compare /tmp/before.json /tmp/after.json

Tensors are compared by content under their names and, separately, as a multiset of contents (so a renamed module
shows up as "same contents, other names" rather than as a change of numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["train.max_steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.sample_every=0",
         "train.tracker=none", "train.log_every=1", "data.batch_size=16"]
NO_GAN = ["method_args.gan_weight_student=0", "method_args.gan_weight_critic=0"]


def runs(tiny: dict[str, str]) -> list[tuple[str, str, str, list[str]]]:
    """(name, method, recipe, overrides) of every run."""
    sd, sd3, flux, cap, prompts, traj, traj_sd = (tiny[k] for k in ("sd", "sd3", "flux", "captioned", "prompts",
                                                                     "traj", "traj_sd"))
    text = ["data.resolution=16", "method_args.sample_prompts=[a picture 1]"]
    return [
        ("teacher", "teacher", "digits16_teacher", []),
        ("flow_teacher", "teacher", "digits16_flow_teacher", []),
        ("dmd2", "dmd2", "digits16_dmd2", []),
        ("dmd2_4step", "dmd2", "digits16_dmd2_4step", []),
        ("dmd2_flow", "dmd2", "digits16_flow_dmd2", []),
        ("dmd2_lora_karras_reg_ema", "dmd2", "digits16_dmd2",
         [*NO_GAN, "method_args.fake_score_lora_rank=4", "method_args.timestep_sampling=karras",
          "method_args.regression_weight=0.5", "method_args.regression_steps=3", "train.ema_decay=0.9",
          "method_args.student_timesteps=[999,749,499,249]", "method_args.fake_updates_per_student=2"]),
        ("lcm", "consistency", "digits16_lcm", []),
        ("lcm_lora", "consistency", "digits16_lcm_lora", []),
        ("multiphase", "consistency", "digits16_multiphase", ["method_args.segment_starts=[0,2,4]"]),
        ("flow_lcm", "consistency", "digits16_flow_lcm", []),
        ("vsd", "vsd", "digits16_vsd", []),
        ("msd", "msd", "digits16_msd", ["method_args.fake_updates_per_student=1"]),
        ("msd_small", "msd", "digits16_msd_small", []),
        ("msd_shared_dm", "msd", "digits16_msd", ["method_args.fake_score=shared", "method_args.num_students=2",
                                                  "method_args.stage=distribution_matching",
                                                  "method_args.fake_updates_per_student=2"]),
        ("agd", "agd", "digits16_agd", [f"data.source={traj}", "method_args.hidden=8"]),
        ("sd_dmd2_gan", "dmd2", "digits16_dmd2", [f"teacher={sd}", f"data.source={cap}", *text,
                                                  "method_args.fake_updates_per_student=2"]),
        ("sd_lcm_lora", "consistency", "digits16_lcm_lora", [f"teacher={sd}", f"data.source={cap}", *text,
                                                              "method_args.sample_timesteps=[]",
                                                              "method_args.lora_rank=4", "method_args.lora_alpha=4"]),
        ("sd_lcm_full", "consistency", "digits16_lcm", [f"teacher={sd}", f"data.source={cap}", *text,
                                                         "method_args.sample_timesteps=[]",
                                                         "method_args.guidance_min=2", "method_args.guidance_max=6"]),
        ("sd_vsd", "vsd", "digits16_vsd", [f"teacher={sd}", f"data.source={prompts}", *text,
                                           "method_args.fake_score_lora_rank=4"]),
        ("sd_msd_prompts", "msd", "digits16_msd", [f"teacher={sd}", f"data.source={prompts}", *text, *NO_GAN,
                                                   "method_args.num_students=2",
                                                   "method_args.stage=distribution_matching",
                                                   "method_args.fake_updates_per_student=1"]),
        ("sd_agd", "agd", "digits16_agd", [f"teacher={sd}", f"data.source={traj_sd}", "method_args.hidden=8",
                                           "data.resolution=16"]),
        ("sd3_dmd2", "dmd2", "digits16_dmd2", [f"teacher={sd3}", f"data.source={prompts}", *text, *NO_GAN,
                                               "method_args.student_timesteps=[1000]",
                                               "method_args.fake_updates_per_student=2"]),
        ("flux_lcm_lora", "consistency", "digits16_lcm_lora",
         [f"teacher={flux}", f"data.source={cap}", *text, "method_args.sample_timesteps=[]", "method_args.lora_rank=4",
          "method_args.lora_alpha=4"]),
    ]


def build_tiny(root: Path) -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny import save_captioned
    from _tiny_sd import build_tiny_flux, build_tiny_sd, build_tiny_sd3

    cap = root / "captioned"
    cap.mkdir(parents=True)
    out = {"sd": build_tiny_sd(root / "sd"), "sd3": build_tiny_sd3(root / "sd3"),
           "flux": build_tiny_flux(root / "flux"), "captioned": save_captioned(cap, 6)}
    (root / "prompts.txt").write_text("a picture 1\na red cat\na blue dog\na green picture 2\n")
    out["prompts"] = str(root / "prompts.txt")
    out["traj"], out["traj_sd"] = str(root / "traj"), str(root / "traj_sd")
    sd_args = ["--prompts", out["prompts"], "--resolution", "16"]
    for teacher, folder, extra in (("digits16", out["traj"], []), (out["sd"], out["traj_sd"], sd_args)):
        subprocess.run([sys.executable, "-m", "stepdistill", "trajectories", "--teacher", teacher, "--out", folder,
                        "--num", "16", "--steps", "4", "--shard-size", "8", "--batch-size", "8", *extra],
                       check=True, env=_env(), capture_output=True)
    return out


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def _tensor_digests(path: Path) -> dict[str, str]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:  # accelerate's optimizer / scheduler pickles of tensors (weights_only)
        obj = torch.load(str(path), weights_only=True, map_location="cpu")
        tensors = {}

        def walk(o, key: str) -> None:
            if torch.is_tensor(o):
                tensors[key] = o
            elif isinstance(o, dict):
                for k, v in o.items():
                    walk(v, f"{key}.{k}")
            elif isinstance(o, (list, tuple)):
                for i, v in enumerate(o):
                    walk(v, f"{key}.{i}")
            elif isinstance(o, (int, float, str, bool)) or o is None:
                tensors[key] = torch.tensor(float(o)) if isinstance(o, (int, float)) else None

        walk(obj, "")
        tensors = {k: v for k, v in tensors.items() if v is not None}
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        out[k] = hashlib.sha256(str(v.dtype).encode() + str(tuple(v.shape)).encode()
                                + v.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def summarize(run: Path) -> dict:
    """Digests of what a run wrote (see the module docstring)."""
    res: dict = {}
    for step in (3, 6):
        ck = run / "checkpoints" / f"step-{step}"
        for f in sorted(ck.glob("*")):
            if f.suffix in (".safetensors", ".bin") and not f.name.startswith("random_states"):
                res[f"ckpt{step}/{f.name}"] = _tensor_digests(f)
    pipe = run / "pipeline"
    for f in sorted(pipe.rglob("*.safetensors")):
        res[f"pipeline/{f.relative_to(pipe)}"] = _tensor_digests(f)
    for f in sorted(pipe.rglob("*.json")):
        # Where diffusers loaded a network from, and where the tiny teachers lie (recorded as `distilled_from`), are
        # paths of the machine, not content.
        text = f.read_text().replace(str(run.parent.resolve()), "<RUNS>")
        data = {k: v for k, v in json.loads(text).items() if k != "_name_or_path"}
        res[f"pipeline/{f.relative_to(pipe)}"] = {"sha": hashlib.sha256(json.dumps(data, sort_keys=True)
                                                                        .encode()).hexdigest()[:16]}
    losses = []
    for line in (run / "logs.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses.append({k: v for k, v in row.items() if k.endswith("loss")})
    res["losses"] = {"sha": hashlib.sha256(json.dumps(losses, sort_keys=True).encode()).hexdigest()[:16],
                     "values": losses}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the digests of every run here (JSON)")
    ap.add_argument("--only", help="comma list of run names")
    ap.add_argument("--keep", help="keep the run folders here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--summarize", help="only digest the run folders kept in this folder (--keep of an earlier call)")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.summarize:
        runs_kept = sorted(p for p in Path(args.summarize).iterdir() if (p / "logs.jsonl").is_file())
        Path(args.out).write_text(json.dumps({p.name: summarize(p) for p in runs_kept}, indent=1, sort_keys=True))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        tiny = build_tiny(root / "tiny")
        for name, method, recipe, overrides in runs(tiny):
            if args.only and name not in args.only.split(","):
                continue
            out = root / name
            cmd = [sys.executable, "-m", "stepdistill", "train", method, "--config", recipe, "--out", str(out),
                   "--overwrite", *SHORT, *overrides]
            r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}: FAILED\n{r.stderr[-2000:]}", file=sys.stderr)
                results[name] = {"failed": r.stderr[-500:]}
                continue
            results[name] = summarize(out)
            print(f"{name}: ok", file=sys.stderr)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


def compare(before: str, after: str) -> int:
    a, b = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        ra, rb = a.get(name), b.get(name)
        if ra is None or rb is None or "failed" in ra or "failed" in rb:
            print(f"{name}: missing or failed on one side")
            bad += 1
            continue
        notes = []
        for key in sorted(set(ra) | set(rb)):
            da, db = ra.get(key), rb.get(key)
            if da == db:
                continue
            if da is None or db is None:
                notes.append(f"{key}: only in {'after' if da is None else 'before'}")
            elif key == "losses" or "sha" in da:
                notes.append(f"{key}: differs")
            elif sorted(da.values()) == sorted(db.values()):
                notes.append(f"{key}: same tensors under other names")
            else:
                changed = [k for k in da if k in db and da[k] != db[k]]
                notes.append(f"{key}: {len(changed)} tensors differ (e.g. {changed[:2]}), "
                             f"{len(set(da) ^ set(db))} names differ")
        status = "identical" if not notes else "; ".join(notes)
        bad += bool(notes)
        print(f"{name}: {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
