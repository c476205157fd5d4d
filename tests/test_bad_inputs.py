"""Bad input across the commands: each is refused with one line on stderr ("stepdistill: error: ..."), exit code 2,
no traceback, and nothing created or changed on disk (an existing output folder keeps its bytes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _cli import refused

DMD2 = ["train", "dmd2", "--config", "digits16_dmd2"]


def _refused(argv: list[str], tmp_path: Path, capsys, match: str) -> str:
    return refused(argv, tmp_path, capsys, match)


# --- train: the values the issue found accepted or ending in a traceback ------------------------------------------
@pytest.mark.parametrize("override, match", [
    ("data.batch_size=0", "'data.batch_size' must be a positive integer"),
    ("optim.student.lr=nan", "'optim.student.lr' must be a finite number > 0, got nan"),
    ("optim.student.lr=-1e-4", "'optim.student.lr' must be a finite number > 0, got -0.0001"),
    ("optim.fake_score.lr=.inf", "'optim.fake_score.lr' must be a finite number > 0, got inf"),
    ("train.max_steps=0", "'train.max_steps' must be at least 1"),
    ("train.checkpoint_every=-3", "'train.checkpoint_every' must be 0 (only at the end) or a positive"),
    ("optim.student.beta2=1.5", "'optim.student.beta2' must be in [0, 1)"),
    ("train.ema_decay=1", "'train.ema_decay' must be in [0, 1)"),
    ("train.keep_checkpoints=0", "'train.keep_checkpoints' must be at least 1"),
    ("train.mixed_precision=fp8", "'train.mixed_precision' must be no / fp16 / bf16"),
    ("train.mixed_precision=fp16", "needs a GPU"),
    ("optim.student.lr_schedule=cosin", "'optim.student.lr_schedule' must be one of"),
    ("method_args.nope=1", "unknown config key 'method_args.nope'"),
    ("train.max_steps=abc", "'train.max_steps' expects an integer"),
    ("optim.critic.lr=1e-4", "'optim.critic' is not a phase of method 'dmd2'"),
])
def test_train_bad_values(override, match, tmp_path, capsys):
    _refused([*DMD2, "--out", str(tmp_path / "run"), override], tmp_path, capsys, match)


def test_train_bad_values_do_not_touch_an_existing_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: dmd2\n")
    (run / "notes.txt").write_text("keep")
    _refused([*DMD2, "--out", str(run), "--overwrite", "optim.student.lr=nan"], tmp_path, capsys,
             "'optim.student.lr' must be a finite number")


def test_train_bad_data_and_teacher(tmp_path, capsys):
    out = str(tmp_path / "run")
    _refused([*DMD2, "--out", out, "data.source=/no/such/folder"], tmp_path, capsys,
             "data source '/no/such/folder' does not exist")
    corrupt = tmp_path / "images"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"not a png")
    _refused([*DMD2, "--out", out, f"data.source={corrupt}"], tmp_path, capsys, "a.png")
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    _refused([*DMD2, "--out", out, f"data.source={empty}", "method_args.gan_weight_student=0",
              "method_args.gan_weight_critic=0"], tmp_path, capsys, "prompts.txt")
    # A prompt file has no images: the GAN term (on in the recipe) is refused by the loop, naming the source.
    prompts = tmp_path / "cats.txt"
    prompts.write_text("a cat\n")
    err = _refused([*DMD2, "--out", out, f"data.source={prompts}"], tmp_path, capsys,
                   "method 'dmd2' needs real images for the GAN term")
    assert "cats.txt" in err
    _refused([*DMD2, "--out", out, "teacher=/no/such/teacher"], tmp_path, capsys, "/no/such/teacher")


def test_train_bad_command_lines(tmp_path, capsys):
    out = str(tmp_path / "run")
    _refused(["train", "dmd3", "--config", "digits16_dmd2", "--out", out], tmp_path, capsys, "unknown method 'dmd3'")
    _refused(["train", "dmd2", "--out", out], tmp_path, capsys, "needs --config")
    _refused(["train", "dmd2", "--config", "nothing_here", "--out", out], tmp_path, capsys,
             "no shipped recipe has that name")
    _refused(["train", "consistency", "--config", "digits16_dmd2", "--out", out], tmp_path, capsys,
             "config is for method 'dmd2'")
    (tmp_path / "file").write_text("x")
    _refused([*DMD2, "--out", str(tmp_path / "file")], tmp_path, capsys, "is a file")
    _refused([*DMD2, "--out", str(tmp_path / "file" / "run")], tmp_path, capsys, "is a file")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: dmd2\ntrain: [unclosed\n")
    _refused(["train", "dmd2", "--config", str(bad_yaml), "--out", out], tmp_path, capsys, "is not valid YAML")


# --- sample / eval / average / bench / stats / config ------------------------------------------------------------
@pytest.fixture
def existing_out(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    return out


def test_sample_bad_inputs(tmp_path, existing_out, capsys):
    new = str(tmp_path / "new")
    _refused(["sample", str(tmp_path / "nope"), "--steps", "1", "--out", new], tmp_path, capsys, "does not exist")
    _refused(["sample", "digits16", "--out", new], tmp_path, capsys, "needs --steps")
    _refused(["sample", "digits16", "--timesteps", "19,399", "--out", new], tmp_path, capsys, "descending")
    _refused(["sample", "digits16", "--steps", "2", "--timesteps", "999,499,99", "--out", new], tmp_path, capsys,
             "disagrees")
    _refused(["sample", "digits16", "--steps", "1", "--num-samples", "2", "--out", str(existing_out)], tmp_path,
             capsys, "already exists")
    _refused(["sample", "digits16", "--steps", "1", "--base", "digits16", "--out", new], tmp_path, capsys,
             "--base applies to LoRA exports")
    _refused(["sample", "digits16", "--steps", "1", "--scheduler", "NoSuchScheduler", "--out", new], tmp_path,
             capsys, "NoSuchScheduler")


def test_eval_bad_inputs(tmp_path, existing_out, capsys):
    new = str(tmp_path / "new")
    _refused(["eval", "digits16", "--steps", "1", "--metrics", "fid,sharpness", "--out", new], tmp_path, capsys,
             "unknown metric 'sharpness'")
    _refused(["eval", str(tmp_path / "missing.npz"), "--out", new], tmp_path, capsys, "does not exist")
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.zeros(4, np.int64))
    _refused(["eval", str(samples), "--steps", "1", "--out", new], tmp_path, capsys, "a samples file is evaluated")
    _refused(["eval", str(samples), "--ref", str(tmp_path / "nowhere"), "--metrics", "fid", "--out", new], tmp_path,
             capsys, "neither 'digits16'")
    _refused(["eval", str(samples), "--metrics", "clip", "--out", new], tmp_path, capsys, "--clip-model")
    _refused(["eval", str(samples), "--metrics", "accuracy", "--out", str(existing_out)], tmp_path, capsys,
             "already exists")


def test_average_bench_stats_config_bad_inputs(tmp_path, existing_out, capsys):
    new = str(tmp_path / "new")
    _refused(["average", "digits16", "--out", new], tmp_path, capsys, "")
    _refused(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", new], tmp_path, capsys, "")
    _refused(["bench", "fastest", "--out", new], tmp_path, capsys, "unknown benchmark 'fastest'")
    _refused(["bench", "dmd2", "--curve", "100,x", "--out", new], tmp_path, capsys, "--curve must be a comma list")
    _refused(["bench", "teacher", "--config", "digits16_dmd2", "--out", new], tmp_path, capsys, "takes no --config")
    _refused(["stats", str(tmp_path), "--resolution", "16", "--out", str(tmp_path / "stats.txt")], tmp_path, capsys,
             "must be a .npz file")
    _refused(["stats", str(tmp_path / "nope"), "--resolution", "16", "--out", str(tmp_path / "x.npz")], tmp_path,
             capsys, "does not exist")
    _refused(["config", "show", "dmd3"], tmp_path, capsys, "unknown method 'dmd3'")
    _refused(["config", "show"], tmp_path, capsys, "needs a method")
