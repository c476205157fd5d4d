"""The training loop: exact resume after SIGKILL, atomic checkpoints, a 2-process run, output-folder safety."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # _toy_method lives beside this file; tests/ need not be a package
    sys.path.insert(0, str(HERE))

from _toy_method import main, student_network  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from stepdistill.config import OptimConfig, from_dict  # noqa: E402
from stepdistill.errors import UserError  # noqa: E402
from stepdistill.loop import checkpoint as ckpt  # noqa: E402
from stepdistill.loop import train  # noqa: E402
from stepdistill.loop.data_stream import ShardedInfiniteBatchSampler  # noqa: E402
from stepdistill.trainers import METHODS, load_config  # noqa: E402

MAX_STEPS = 20
# The exported student's weights (the toy exports a ClassConditionalPipeline around its generator UNet).
EXPORTED = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"
# What a checkpoint holds: the generator's and the critic's tensors under the method's own names.
STUDENT_KEYS = {f"student.{k}" for k in student_network().state_dict()}
TRAINED_KEYS = STUDENT_KEYS | {"critic.0.weight", "critic.0.bias", "critic.2.weight", "critic.2.bias"}
# Two phases (student every 2 steps, critic every step), grad accumulation, EMA with warm-up, a cosine schedule with
# warm-up, 5-step checkpoints: everything resume has to get right.
OVERRIDES = [
    "method=toy",
    "seed=3",
    f"train.max_steps={MAX_STEPS}",
    "train.grad_accum=2",
    "train.ema_decay=0.9",
    "train.ema_warmup=true",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=2",
    "train.log_every=1",
    "train.sample_every=10",
    "data.batch_size=16",
    "optim.student.lr=0.001",
    "optim.student.lr_schedule=cosine",
    "optim.student.warmup_steps=3",
    "optim.critic.lr=0.002",
    "optim.critic.max_grad_norm=0.5",
]


@pytest.fixture(autouse=True)
def _toy_registered(monkeypatch, one_thread):
    # One thread (conftest's fixture): fast on a shared 2-core machine, and the same float results in-process and
    # in subprocesses.
    monkeypatch.setitem(METHODS, "toy", "_toy_method:ToyMethod")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _cmd(out: Path, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, str(HERE / "_toy_method.py"), "--out", str(out), *OVERRIDES, *(extra or [])]


def _cfg(extra: list[str] | None = None):
    return load_config(None, OVERRIDES + (extra or []))


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with code {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.02)


def _logged_steps(run: Path) -> list[int]:
    if not (run / "logs.jsonl").is_file():
        return []
    steps = []
    for line in (run / "logs.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def _assert_same_final_state(a: Path, b: Path, steps: int = MAX_STEPS) -> None:
    """Weights, EMA, optimizer and scheduler states of the final checkpoints and the exports are bitwise equal."""
    ca, cb = a / "checkpoints" / f"step-{steps}", b / "checkpoints" / f"step-{steps}"
    wa, wb = load_file(ca / "model.safetensors"), load_file(cb / "model.safetensors")
    assert wa.keys() == wb.keys() and any("student" in k for k in wa)
    assert not any(k.startswith("teacher.") for k in wa), "frozen teacher weights should not be checkpointed"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert not list(ca.glob("custom_checkpoint_*")), "no pickled custom state"
    with safe_open(str(ca / "ema.safetensors"), "pt") as fa, safe_open(str(cb / "ema.safetensors"), "pt") as fb:
        # The EMA steps with its network's phase (the toy's student updates every 2nd step), not every loop step.
        assert json.loads(fa.metadata()["ema"])["optimization_step"] == steps // 2
        assert fa.metadata() == fb.metadata() and fa.keys() == fb.keys() and len(fa.keys()) == len(STUDENT_KEYS)
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k))
    for name in ("optimizer.bin", "optimizer_1.bin"):
        sa, sb = torch.load(ca / name, weights_only=False)["state"], torch.load(cb / name, weights_only=False)["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (name, i, k)
    for name in ("scheduler.bin", "scheduler_1.bin"):
        assert torch.load(ca / name, weights_only=False)["last_epoch"] == torch.load(cb / name, weights_only=False)[
            "last_epoch"]
    ea, eb = load_file(a / EXPORTED), load_file(b / EXPORTED)
    assert ea.keys() == eb.keys() and len(ea) == len(STUDENT_KEYS)
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
    # The logged losses of every step match too (a resumed run replays nothing and skips nothing).
    la = [json.loads(s) for s in (a / "logs.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (b / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, steps + 1))
    for ra, rb in zip(la, lb):
        assert {k: v for k, v in ra.items() if "/" in k} == {k: v for k, v in rb.items() if "/" in k}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run (in-process, so the test pays the import cost only once)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    METHODS["toy"] = "_toy_method:ToyMethod"
    try:
        assert train(_cfg(), out) == out
    finally:
        METHODS.pop("toy", None)
        torch.set_num_threads(threads)
    return out


def test_reference_run_layout(reference_run):
    run = reference_run
    assert (run / "config.yaml").is_file() and (run / EXPORTED).is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-10.png", f"step-{MAX_STEPS}.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-15", f"step-{MAX_STEPS}"]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{MAX_STEPS}"
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    rows = [json.loads(s) for s in (run / "logs.jsonl").read_text().splitlines()]
    assert rows[0].keys() >= {"step", "student/loss", "critic/loss", "lr/student", "lr/critic", "samples_per_sec"}
    assert "student/loss" not in rows[1]  # the student phase runs on even step indices only
    state = ckpt.read_loop_state(run / "checkpoints" / f"step-{MAX_STEPS}")
    # student: 10 updates x 2 micro-batches, critic: 20 x 2
    assert state["step"] == MAX_STEPS and state["batches_consumed"] == 60


def test_exact_resume_after_sigkill(reference_run, tmp_path):
    run = tmp_path / "run"
    kill_at = random.randint(7, MAX_STEPS - 2)  # past the first checkpoint (step 5)
    proc = subprocess.Popen(_cmd(run), env=_env(TOY_SLEEP="0.03"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(s >= kill_at for s in _logged_steps(run)), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "pipeline").exists(), f"the run finished before the kill at step {kill_at}"
    assert ckpt.latest_checkpoint(run / "checkpoints") is not None

    train(_cfg(), run)  # resume=True is the default
    _assert_same_final_state(reference_run, run)


def test_kill_during_checkpoint_write(reference_run, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run), env=_env(TOY_CHECKPOINT_SLEEP="120@10"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = run / "checkpoints" / ".tmp-step-10"
    _wait_for(lambda: (partial / "loop_state.json").is_file(), proc)
    time.sleep(0.2)  # now sleeping inside the save: state files written, no COMPLETE marker, not renamed
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    ckpts = run / "checkpoints"
    assert partial.is_dir() and not (partial / ckpt.COMPLETE_MARKER).exists()
    assert [s for s, _ in ckpt.list_checkpoints(ckpts)] == [5]
    assert (ckpts / "latest").read_text().strip() == "step-5"
    # A step folder without its marker (e.g. copied by hand) is ignored as well.
    (ckpts / "step-12").mkdir()
    assert ckpt.latest_checkpoint(ckpts) == ckpts / "step-5"

    train(_cfg(), run)
    assert not partial.exists() and not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-15", f"step-{MAX_STEPS}"]
    _assert_same_final_state(reference_run, run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_cmd(run: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *_cmd(run, extra)[1:]]


def test_two_process_run_killed_and_resumed(tmp_path, capsys):
    """2 processes, killed past a checkpoint, resumed on 2: identical to the uninterrupted 2-process run; its
    checkpoints hold only trained tensors under unwrapped names; and the finished run resumes on 1 process."""
    steps = 12
    extra = [f"train.max_steps={steps}", "train.checkpoint_every=3", "train.tracker=none"]
    ref, hashes = tmp_path / "ref", tmp_path / "hashes"
    hashes.mkdir()
    res = subprocess.run(_two_process_cmd(ref, extra), env=_env(TOY_HASH_DIR=str(hashes)), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (hashes / "rank0.txt").read_text() == (hashes / "rank1.txt").read_text()  # DDP kept the ranks equal
    assert _logged_steps(ref) == list(range(1, steps + 1))  # logged once, by the main process
    last = ref / "checkpoints" / f"step-{steps}"
    assert ckpt.read_loop_state(last)["world_size"] == 2
    names = sorted(p.name for p in last.iterdir())
    assert "random_states_0.pkl" in names and "random_states_1.pkl" in names  # each rank's own RNG state
    keys = set(load_file(last / "model.safetensors"))
    assert keys == TRAINED_KEYS  # no frozen teacher, no "module."

    run = tmp_path / "run"
    proc = subprocess.Popen(_two_process_cmd(run, extra), env=_env(TOY_SLEEP="0.05"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(lambda: any(s >= 7 for s in _logged_steps(run)), proc, timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    assert not (run / "pipeline").exists() and ckpt.latest_checkpoint(run / "checkpoints") is not None
    res = subprocess.run(_two_process_cmd(run, extra), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming from" in res.stderr
    _assert_same_final_state(ref, run, steps)

    capsys.readouterr()
    train(_cfg([*extra, f"train.max_steps={steps + 2}"]), run)  # the same run, continued on one process
    assert "resuming a 2-process run on 1 processes" in capsys.readouterr().err
    assert _logged_steps(run)[-3:] == [steps, steps + 1, steps + 2]
    assert (run / EXPORTED).is_file()


def test_existing_output_folder_is_not_touched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        train(_cfg(), out)
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        train(_cfg(), out, resume=False)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    assert main(["--out", str(out), *OVERRIDES]) == 2


def test_resume_refuses_a_different_config(reference_run):
    before = sorted(p.relative_to(reference_run) for p in reference_run.rglob("*"))
    with pytest.raises(UserError, match=r"different config \(optim.critic.lr: 0.002 -> 0.1\)"):
        train(_cfg(["optim.critic.lr=0.1"]), reference_run)
    with pytest.raises(UserError, match="--resume"):
        train(_cfg(), reference_run, resume=False)
    assert sorted(p.relative_to(reference_run) for p in reference_run.rglob("*")) == before


def test_allow_changes_continues_with_new_learning_rates(reference_run, tmp_path, capsys):
    # The first half of the reference run, then the second half as a new stage with both learning rates changed.
    run = tmp_path / "run"
    train(_cfg([f"train.max_steps={MAX_STEPS // 2}"]), run)
    new = ["optim.student.lr=0.003", "optim.critic.lr=0.1"]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(UserError, match=r"optim.critic.lr: 0.002 -> 0.1; optim.student.lr: 0.001 -> 0.003\); pass "
                                        r"--allow-changes"):
        train(_cfg(new), run)
    with pytest.raises(UserError, match=r"different config \(seed: 3 -> 4\); cannot --resume"):
        train(_cfg([*new, "seed=4"]), run, allow_changes=True)  # only stage keys may change, even when allowed
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    capsys.readouterr()
    train(_cfg(new), run, allow_changes=True)
    assert f"continuing at step {MAX_STEPS // 2} with changed settings" in capsys.readouterr().err
    record = [json.loads(s) for s in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record == [{"step": MAX_STEPS // 2, "changes": {"optim.critic.lr": {"from": 0.002, "to": 0.1},
                                                           "optim.student.lr": {"from": 0.001, "to": 0.003}}}]
    assert load_config(run / "config.yaml").optim["critic"].lr == 0.1  # later resumes compare against the new values
    ref = {r["step"]: r for r in map(json.loads, (reference_run / "logs.jsonl").read_text().splitlines())}
    got = {r["step"]: r for r in map(json.loads, (run / "logs.jsonl").read_text().splitlines())}
    assert sorted(got) == sorted(ref)
    for step in range(1, MAX_STEPS // 2 + 1):  # the first stage ran at the old rates
        assert got[step]["lr/critic"] == ref[step]["lr/critic"] == 0.002
    for step in range(MAX_STEPS // 2 + 1, MAX_STEPS + 1):  # the new base rates on the same schedule position
        assert got[step]["lr/critic"] == pytest.approx(0.1)
        assert got[step]["lr/student"] == pytest.approx(3 * ref[step]["lr/student"])  # cosine with warm-up
    assert got[MAX_STEPS // 2 + 1]["lr/student"] > 0
    # Resuming the finished run again with the same (new) config is a plain resume: nothing more is recorded.
    train(_cfg(new), run)
    assert len((run / "config_changes.jsonl").read_text().splitlines()) == 1


def test_new_rates_hold_after_an_interrupted_stage(tmp_path, monkeypatch):
    """A new rate must reach the optimizer even when the checkpoint predates the stage that introduced it, and a
    phase that trained on OptimConfig's defaults (no optim section) may get one."""
    base = [o for o in OVERRIDES if not o.startswith("optim.critic.")]
    run = tmp_path / "run"
    train(load_config(None, [*base, f"train.max_steps={MAX_STEPS // 2}"]), run)
    new = [*base, "optim.critic.lr=0.1"]
    # The new stage writes its config but trains no step (as if killed before its first checkpoint) ...
    train(load_config(None, [*new, f"train.max_steps={MAX_STEPS // 2}"]), run, allow_changes=True)
    assert list(json.loads((run / "config_changes.jsonl").read_text())["changes"]) == ["optim.critic.lr"]
    # ... then a plain resume: the checkpoint holds the old rate, the config the new one, and the config wins in
    # the optimizer itself, from the first update on.
    used = []
    adamw_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        used.append([g["lr"] for g in self.param_groups])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train(load_config(None, new), run)
    critic = [lrs for lrs in used if lrs[0] > 0.01]
    assert len(critic) == MAX_STEPS // 2 and all(lrs == [0.1] for lrs in critic)  # every critic update, new rate
    assert all(lrs[0] <= 0.001 for lrs in used if lrs not in critic)  # the student's unchanged cosine


def test_bookkeeping_keys_may_change_on_resume(reference_run, tmp_path):
    run = tmp_path / "run"
    train(_cfg([f"train.max_steps={MAX_STEPS // 2}"]), run)
    train(_cfg(["train.checkpoint_every=10", "train.log_every=2", "train.sample_every=20"]), run)
    assert not (run / "config_changes.jsonl").exists()
    steps = _logged_steps(run)
    assert steps[: MAX_STEPS // 2] == list(range(1, MAX_STEPS // 2 + 1))  # every step before, every 2nd after
    assert steps[MAX_STEPS // 2:] == list(range(MAX_STEPS // 2 + 2, MAX_STEPS + 1, 2))
    assert (run / "checkpoints" / f"step-{MAX_STEPS}").is_dir()


def test_a_run_saved_before_a_method_key_existed_resumes(tmp_path):
    """A config.yaml written by an older version lacks newer method_args keys; they take the method's defaults, so
    the run resumes as a plain resume (no "<unset>" change to allow)."""
    run = tmp_path / "run"
    train(_cfg([f"train.max_steps={MAX_STEPS // 2}"]), run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["method_args"]["student_every"]  # as if the key had been added after this run started
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    train(_cfg(), run)
    assert _logged_steps(run)[-1] == MAX_STEPS and not (run / "config_changes.jsonl").exists()
    # A value other than the default is still a change that needs --allow-changes.
    with pytest.raises(UserError, match=r"method_args.student_every: 2 -> 3"):
        train(_cfg(["method_args.student_every=3", f"train.max_steps={MAX_STEPS + 2}"]), run)


def test_unknown_optim_phase_is_a_user_error(tmp_path):
    cfg = _cfg()
    cfg.optim["genrator"] = from_dict(OptimConfig, {"lr": 0.1})
    with pytest.raises(UserError, match="optim.genrator.*phases: student, critic"):
        train(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # ... also through overwrite: the old folder survives a config mistake.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("x")
    with pytest.raises(UserError, match="optim.genrator"):
        train(cfg, tmp_path / "old", overwrite=True)
    assert (tmp_path / "old" / "x").is_file()


def test_sampler_restarts_exactly_and_shards_disjointly():
    full = ShardedInfiniteBatchSampler(50, 7, seed=1, rank=0, world_size=2)
    it = iter(full)
    stream = [next(it) for _ in range(20)]
    resumed = iter(ShardedInfiniteBatchSampler(50, 7, seed=1, rank=0, world_size=2, start=13))
    assert [next(resumed) for _ in range(7)] == stream[13:]
    other = iter(ShardedInfiniteBatchSampler(50, 7, seed=1, rank=1, world_size=2))
    first_epoch = lambda s: [i for b in [next(s) for _ in range(4)] for i, _ in b][:25]  # 25 items per rank-epoch
    a, b = first_epoch(iter(full)), first_epoch(other)
    assert len(set(a)) == 25 and not set(a) & set(b)


class _Boom:
    """Unpickling this runs code: it creates the file named by ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_resume_never_unpickles_code_from_a_run_folder(tmp_path, capsys):
    """A crafted run folder (pickles that run code in place of the EMA, the RNG states and an optimizer state)
    resumes without running any of it: the tampered newest checkpoint is skipped with a warning, the previous one
    used."""
    run = tmp_path / "run"
    train(_cfg(["train.max_steps=10"]), run)
    newest = run / "checkpoints" / "step-10"
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        torch.save({"state": _Boom(str(marker))}, newest / name)
    torch.load(newest / "optimizer.bin", weights_only=False)  # the crafted file is live: unpickling runs its code
    assert marker.exists()
    marker.unlink()
    capsys.readouterr()
    train(_cfg(["train.max_steps=12"]), run)
    err = capsys.readouterr().err
    assert not marker.exists(), "resume ran code from a pickle in the run folder"
    assert "checkpoint" in err and "step-10" in err and "pickled state" in err and "resuming from" in err
    assert "step-5" in err.split("resuming from")[1].splitlines()[0]
    assert _logged_steps(run)[-1] == 12


def test_truncated_newest_checkpoint_falls_back_to_the_previous(reference_run, tmp_path, capsys):
    """A cut-short model.safetensors in the newest checkpoint: resume from the one before it (with a warning line),
    and the result is still the uninterrupted run."""
    run = tmp_path / "run"
    train(_cfg(), run)  # checkpoints at 15 and 20
    weights = run / "checkpoints" / f"step-{MAX_STEPS}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    train(_cfg(), run)  # steps 16-20 again from step-15
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warning) == 1 and f"step-{MAX_STEPS}" in warning[0] and "trying the previous one" in warning[0]
    assert "step-15 (step 15)" in err
    _assert_same_final_state(reference_run, run)


def test_no_loadable_checkpoint_is_one_line_error(tmp_path):
    run = tmp_path / "run"
    train(_cfg(["train.max_steps=5", "train.keep_checkpoints=1"]), run)
    (run / "checkpoints" / "step-5" / "model.safetensors").write_bytes(b"not safetensors")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="no checkpoint of .* can be loaded \\(newest, 'step-5'"):
        train(_cfg(["train.max_steps=8"]), run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_diverging_loss_stops_with_one_line_error_and_exports_nothing(tmp_path):
    import _toy_method

    run = tmp_path / "run"

    orig = _toy_method.ToyMethod.loss

    def nan_at_step_6(self, phase, batch, step):
        loss, logs = orig(self, phase, batch, step)
        return (loss * float("nan") if step == 6 and phase == "critic" else loss), logs

    _toy_method.ToyMethod.loss = nan_at_step_6
    try:
        with pytest.raises(UserError, match=r"the critic loss is nan at step 7: training diverged, nothing was "
                                            r"exported; its last checkpoint is step 5"):
            train(_cfg(), run)
    finally:
        _toy_method.ToyMethod.loss = orig
    assert not (run / "pipeline").exists()
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [5]
    w = load_file(run / "checkpoints" / "step-5" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_failed_start_does_not_block_the_corrected_rerun(tmp_path, capsys):
    """A run that stopped before its first checkpoint is replaced by the corrected rerun instead of being refused
    as "a run with a different config"."""
    import _toy_method

    run = tmp_path / "run"
    orig = _toy_method.ToyMethod.loss
    _toy_method.ToyMethod.loss = lambda self, phase, batch, step: (torch.tensor(float("inf")), {})
    try:
        with pytest.raises(UserError, match="diverged"):
            train(_cfg(["optim.critic.lr=0.5"]), run)
    finally:
        _toy_method.ToyMethod.loss = orig
    assert (run / "config.yaml").is_file() and not ckpt.list_checkpoints(run / "checkpoints")
    capsys.readouterr()
    train(_cfg(["train.max_steps=6"]), run)
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert load_config(run / "config.yaml").optim["critic"].lr == 0.002
    assert _logged_steps(run) == list(range(1, 7))


def test_output_folder_that_cannot_be_written_is_refused_before_anything(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create output folder .*is a file"):
        train(_cfg(), blocker / "run")
    import tempfile

    # pytest's tmp folders are private to root; the unprivileged user needs a path it can traverse.
    ro = Path(tempfile.mkdtemp(prefix="stepdistill-ro-"))
    ro.chmod(0o555)
    try:
        # The unprivileged user must be able to read the checkout (a private clone folder hides it) and must not
        # be able to write into the read-only folder; otherwise this machine cannot show the case.
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                                f"open({str(HERE / '_toy_method.py')!r}).close(); import os; "
                                f"os.mkdir({str(ro / 'x')!r})"], capture_output=True, text=True)
        if "PermissionError" not in probe.stderr or str(ro) not in probe.stderr:
            pytest.skip("cannot run as an unprivileged user that reads this checkout here")
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *_cmd(ro / "run")],
                             env=_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "error: output folder" in res.stderr.strip().splitlines()[-1]
        assert "cannot be written" in res.stderr and "Traceback" not in res.stderr
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
        shutil.rmtree(ro)


def test_replace_dir_never_leaves_a_half_written_folder(tmp_path):
    from stepdistill.files import replace_dir

    final = tmp_path / "pipeline"
    replace_dir(final, lambda d: (d / "a.txt").write_text("v1"))
    assert (final / "a.txt").read_text() == "v1"

    def dies_halfway(d: Path) -> None:
        (d / "a.txt").write_text("v2-partial")
        raise KeyboardInterrupt  # stands in for a kill during the export

    with pytest.raises(KeyboardInterrupt):
        replace_dir(final, dies_halfway)
    assert (final / "a.txt").read_text() == "v1"  # the previous export is whole
    # A kill between the two renames leaves only .old-pipeline: the next export starts by restoring it.
    os.rename(final, tmp_path / ".old-pipeline")
    seen = []
    replace_dir(final, lambda d: seen.append((final / "a.txt").read_text()) or (d / "a.txt").write_text("v3"))
    assert seen == ["v1"] and (final / "a.txt").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    # The writer sees a folder with the final name (model cards quote it).
    names = []
    replace_dir(final, lambda d: names.append(d.name))
    assert names == ["pipeline"]


def test_failed_start_with_foreign_files_is_not_replaced(tmp_path):
    """A folder that holds anything besides a run's own files is never replaced without --overwrite."""
    import _toy_method

    run = tmp_path / "run"
    orig = _toy_method.ToyMethod.loss
    _toy_method.ToyMethod.loss = lambda self, phase, batch, step: (torch.tensor(float("nan")), {})
    try:
        with pytest.raises(UserError, match="diverged"):
            train(_cfg(["optim.critic.lr=0.5"]), run)
    finally:
        _toy_method.ToyMethod.loss = orig
    (run / "slurm-123.out").write_text("the user's log")
    with pytest.raises(UserError, match="holds a run with a different config"):
        train(_cfg(["train.max_steps=6"]), run)
    assert (run / "slurm-123.out").read_text() == "the user's log" and (run / "config.yaml").is_file()
