"""The training loop: exact resume after SIGKILL, atomic checkpoints, a 2-process run, output-folder safety."""

from __future__ import annotations

import json
import os
import random
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

from safetensors.torch import load_file  # noqa: E402

from stepdistill.config import OptimConfig, from_dict, load_config  # noqa: E402
from stepdistill.errors import UserError  # noqa: E402
from stepdistill.trainers import METHODS  # noqa: E402
from stepdistill.trainers import checkpoint as ckpt  # noqa: E402
from stepdistill.trainers.loop import ShardedInfiniteBatchSampler, main, train  # noqa: E402

MAX_STEPS = 20
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


def _assert_same_final_state(a: Path, b: Path) -> None:
    """Weights, EMA, optimizer and scheduler states of the final checkpoints and the exports are bitwise equal."""
    ca, cb = a / "checkpoints" / f"step-{MAX_STEPS}", b / "checkpoints" / f"step-{MAX_STEPS}"
    wa, wb = load_file(ca / "model.safetensors"), load_file(cb / "model.safetensors")
    assert wa.keys() == wb.keys() and any("student" in k for k in wa)
    assert not any(k.startswith("teacher.") for k in wa), "frozen teacher weights should not be checkpointed"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ema_a = torch.load(ca / "custom_checkpoint_0.pkl", weights_only=False)
    ema_b = torch.load(cb / "custom_checkpoint_0.pkl", weights_only=False)
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == MAX_STEPS
    for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"], strict=True):
        assert torch.equal(x, y)
    for name in ("optimizer.bin", "optimizer_1.bin"):
        sa, sb = torch.load(ca / name, weights_only=False)["state"], torch.load(cb / name, weights_only=False)["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (name, i, k)
    for name in ("scheduler.bin", "scheduler_1.bin"):
        assert torch.load(ca / name, weights_only=False)["last_epoch"] == torch.load(cb / name, weights_only=False)[
            "last_epoch"]
    ea, eb = load_file(a / "pipeline" / "student.safetensors"), load_file(b / "pipeline" / "student.safetensors")
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
    # The logged losses of every step match too (a resumed run replays nothing and skips nothing).
    la = [json.loads(s) for s in (a / "logs.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (b / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, MAX_STEPS + 1))
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
    assert (run / "config.yaml").is_file() and (run / "pipeline" / "student.safetensors").is_file()
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
    proc = subprocess.Popen(_cmd(run), env=_env(**{ckpt.TEST_SLEEP_ENV: "120@10"}),
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


def test_two_process_run(tmp_path):
    run, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    steps = 6
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           *_cmd(run, [f"train.max_steps={steps}", "train.checkpoint_every=3", "train.tracker=none"])[1:]]
    res = subprocess.run(cmd, env=_env(TOY_HASH_DIR=str(hashes)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    h0, h1 = (hashes / "rank0.txt").read_text(), (hashes / "rank1.txt").read_text()
    assert h0 == h1  # DDP kept both ranks' weights (incl. the frozen teacher) identical
    assert _logged_steps(run) == list(range(1, steps + 1))  # logged once, by the main process
    state = ckpt.read_loop_state(run / "checkpoints" / f"step-{steps}")
    assert state["world_size"] == 2 and state["step"] == steps
    # Each rank wrote its own RNG state into the shared checkpoint; nothing else is duplicated.
    names = sorted(p.name for p in (run / "checkpoints" / f"step-{steps}").iterdir())
    assert "random_states_0.pkl" in names and "random_states_1.pkl" in names
    assert (run / "pipeline" / "student.safetensors").is_file()


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
