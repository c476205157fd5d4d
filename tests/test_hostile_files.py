"""Every file a command reads is input: exports, run folders and trajectory folders tampered with (by mistake or on
purpose) are refused with one line and exit code 2, no traceback and nothing written (a tampered checkpoint is
skipped for the previous one, with a warning); and the command-line values that used to give wrong results or late
refusals are refused before anything is written."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import refused
from _tiny import ROOT, run_overrides, save_class_teacher
from _tiny_sd import build_tiny_sd
from safetensors.torch import load_file, save_file

from stepdistill.cli import main
from stepdistill.loop import train
from stepdistill.pipelines.trajectories import write_trajectories
from stepdistill.trainers import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = ["train.max_steps=2", "data.batch_size=4", "method_args.fake_updates_per_student=1"]


def _agd(teacher: str, traj: Path) -> list[str]:
    """A short, quiet agd run on ``traj``."""
    return [f"teacher={teacher}", f"data.source={traj}", "train.max_steps=2", "data.batch_size=4",
            "method_args.hidden=8", "train.tracker=none", "train.checkpoint_every=0", "train.sample_every=0"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A tiny class teacher, a DMD2 student, a 2-student MSD export, trajectories and an AGD export of it."""
    root = tmp_path_factory.mktemp("made")
    teacher = save_class_teacher(root / "teacher")
    no_gan = ["method_args.gan_weight_student=0", "method_args.gan_weight_critic=0"]
    student = train(load_config("digits16_dmd2", run_overrides(teacher, *SHORT, *no_gan)), root / "dmd2")
    msd = train(load_config("digits16_msd", run_overrides(teacher, *SHORT, *no_gan, "method_args.num_students=2",
                                                          "method_args.stage=distribution_matching")), root / "msd")
    traj = write_trajectories(teacher, root / "traj", 8, steps=3, shard_size=4, batch_size=8, progress=False)
    agd = train(load_config("digits16_agd", _agd(teacher, traj)), root / "agd")
    return {"teacher": Path(teacher), "student": student / "pipeline", "msd": msd / "pipeline", "traj": traj,
            "agd": agd / "pipeline"}


@pytest.fixture
def work(tmp_path, made) -> Path:
    """A folder of copies to tamper with (the module's originals stay whole)."""
    for name in ("student", "msd", "agd", "traj"):
        shutil.copytree(made[name], tmp_path / name)
    return tmp_path


def _sample(src: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", str(src), "--steps", "1", "--num-samples", "4", "--out", str(out), *extra]


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- exports --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"subfolders": ["unet", "../outside/net"]}, "'../outside/net' is not a path inside"),
    ({"subfolders": ["unet", "/etc"]}, "'/etc' is not a path inside"),
    ({"subfolders": ["unet", "student_9"]}, "student folder 'student_9' does not exist"),
    ({"class_to_student": [0] * 5 + [1] * 4 + [2]}, "field 'class_to_student' must be a list of integers in [0, 1]"),
    ({"class_to_student": [0, 1, 0, 1, 0]}, "routes 5 classes, but the pipeline has 10 classes"),
    ({"class_to_student": [0] * 9 + [-1]}, "field 'class_to_student' must be a list of integers in [0, 1]"),
    ({"num_students": 12}, "student 2 owns no class of 'class_to_student'"),
    ({"num_students": "two"}, "field 'num_students' must be an integer in [1, 1024]"),
    ({"kind": "colours"}, "field 'kind' must be one of classes, prompts"),
])
def test_tampered_router_is_refused(work, capsys, change, match):
    _edit_json(work / "msd" / "router.json", **change)
    refused(_sample(work / "msd", work / "out"), work, capsys, match)


def test_router_of_more_students_than_classes_is_refused(work, capsys):
    (work / "msd" / "student_2").mkdir()
    _edit_json(work / "msd" / "router.json", num_students=3, subfolders=["unet", "student_1", "student_2"])
    refused(_sample(work / "msd", work / "out"), work, capsys, "student 2 owns no class")


def test_student_of_another_architecture_is_refused(work, capsys):
    _edit_json(work / "msd" / "student_1" / "config.json", block_out_channels=[4096, 4096])
    refused(_sample(work / "msd", work / "out"), work, capsys, "describes another network than student 0's")


def test_oversized_adapter_config_is_refused_before_any_memory_is_taken(work):
    """A 2 KB edit (hidden 12000) used to build an 11 GB module before failing: the module is now built on the meta
    device and checked against the weights file's header first. Measured in a fresh process."""
    _edit_json(work / "agd" / "guidance_adapter" / "adapter_config.json", hidden=12000)
    script = ("import sys; from stepdistill.cli import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", script, *_sample(work / "agd", work / "out")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "adapter_model.safetensors" in err[0] and "expected float32 [16, 12000]" in err[0], err
    assert peak < 3 * 2**30, f"peak resident memory {peak / 2**30:.1f} GiB"
    assert not (work / "out").exists()


def test_tampered_adapter_files_are_refused(work, capsys):
    adapter = work / "agd" / "guidance_adapter"
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes((10**9).to_bytes(8, "little") + weights[8:])
    refused(_sample(work / "agd", work / "out"), work, capsys, "header size 1000000000 does not fit")
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    for field, value, match in (("kind", "magic", "field 'kind' must be one of attention, additive"),
                                ("w_max", "four", "field 'w_max' must be a finite number"),
                                ("layers", {"a": [-1, 0]}, "field 'layers' must map block names")):
        good = (adapter / "adapter_config.json").read_text()
        _edit_json(adapter / "adapter_config.json", **{field: value})
        refused(_sample(work / "agd", work / "out"), work, capsys, match)
        (adapter / "adapter_config.json").write_text(good)


def test_tampered_model_index_and_teacher_record_are_refused(work, made, capsys):
    index = work / "student" / "model_index.json"
    good = index.read_text()
    _edit_json(index, _class_name=["diffusers", "X"])
    refused(_sample(work / "student", work / "out"), work, capsys, "field '_class_name' must be a pipeline class")
    index.write_text(good)
    _edit_json(index, unet=["diffusers", "UNet2DModel", "extra"])
    refused(_sample(work / "student", work / "out"), work, capsys, "component 'unet' must be [library, class]")
    index.write_text(good)
    sched = work / "student" / "scheduler" / "scheduler_config.json"
    good = sched.read_text()
    _edit_json(sched, distilled_from=["a", "b"])
    refused(_sample(work / "student", work / "out", "--teacher-steps", "1"), work, capsys,
            "records its teacher as ['a', 'b']")
    sched.write_text(good)
    _edit_json(sched, student_timesteps=["999"])
    refused(_sample(work / "student", work / "out"), work, capsys,
            "field 'student_timesteps' must be a list of integers in [0, 1000]")


# --- run folders ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory, made) -> tuple[Path, list[str]]:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    overrides = run_overrides(str(made["teacher"]), *SHORT, "train.max_steps=4", "train.checkpoint_every=2",
                              "method_args.gan_weight_student=0", "method_args.gan_weight_critic=0")
    assert main(["train", "dmd2", "--config", "digits16_dmd2", "--out", str(run), *overrides]) == 0
    return run, overrides


@pytest.mark.parametrize("tamper, why", [
    ("moment", "optimizer 0's 'exp_avg' of a parameter of shape"),
    ("int32", "tensor 'student.model.conv_in.weight' is int32"),
    ("shape", "tensor 'student.model.conv_in.weight' is float32 [1]"),
    ("step six", "field 'step' must be an integer >= 0, got 'six'"),
    ("step 1e6", "field 'step' must be an integer >= 0, got 1000000.0"),
    ("step 2", "field 'step' is 2, but the checkpoint is 'step-4'"),
])
def test_tampered_checkpoint_is_skipped_for_the_previous_one(run_with_checkpoints, tmp_path, capsys, tamper, why):
    src, overrides = run_with_checkpoints
    run = tmp_path / "run"
    shutil.copytree(src, run)
    last = run / "checkpoints" / "step-4"
    if tamper == "moment":  # an AdamW moment of the wrong shape (the file is a weights-only pickle of tensors)
        opt = torch.load(last / "optimizer.bin", weights_only=True)
        first = next(iter(opt["state"]))
        opt["state"][first]["exp_avg"] = opt["state"][first]["exp_avg"].flatten()[:3]
        torch.save(opt, last / "optimizer.bin")
    elif tamper in ("int32", "shape"):
        state = load_file(str(last / "model.safetensors"))
        w = state["student.model.conv_in.weight"]
        state["student.model.conv_in.weight"] = w.to(torch.int32) if tamper == "int32" else w.flatten()[:1]
        save_file(state, str(last / "model.safetensors"))
    else:
        _edit_json(last / "loop_state.json", step={"step six": "six", "step 1e6": 1e6, "step 2": 2}[tamper])
    capsys.readouterr()
    assert main(["train", "dmd2", "--config", "digits16_dmd2", "--out", str(run), *overrides,
                 "train.max_steps=6"]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint '{last}' cannot be loaded" in err and why in err, err
    assert f"resuming from {run / 'checkpoints' / 'step-2'} (step 2)" in err, err
    rows = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained again from step 2


# --- trajectory folders ---------------------------------------------------------------------------------------------
def _shard(folder: Path, k: int = 0) -> Path:
    return folder / f"shard_{k:05d}.safetensors"


def _rewrite(path: Path, **tensors) -> None:
    """Replace tensors of a shard, keeping its metadata (so it still claims to belong to the folder)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state.update(tensors)
    save_file(state, str(path), metadata=meta)


@pytest.mark.parametrize("tamper, match", [
    ("shape", "tensor 'x_t' is float32 [12, 1, 8, 8], expected float32 [12, 1, 16, 16]"),
    ("int16", "tensor 'x_t' is int16"),
    ("label", "data labels of"),
    ("shard_size 0", "field 'shard_size' must be an integer >= 1, got 0"),
    ("w_min string", "field 'w_min' must be a finite number >= 0.0, got 'one'"),
    ("teacher list", "field 'teacher' must be a string"),
])
def test_tampered_trajectories_are_refused(work, made, capsys, tamper, match):
    traj = work / "traj"
    shard = _shard(traj)
    x = load_file(str(shard))["x_t"]
    if tamper == "shape":  # every shard alike, so it is the teacher that does not fit
        for k in range(2):
            _rewrite(_shard(traj, k), x_t=torch.zeros(12, 1, 8, 8), target=torch.zeros(12, 1, 8, 8))
    elif tamper == "int16":
        _rewrite(shard, x_t=x.to(torch.int16))
    elif tamper == "label":
        labels = load_file(str(shard))["cond.class_labels"]
        _rewrite(shard, **{"cond.class_labels": torch.full_like(labels, 99)})
        match = f"data labels of '{traj}' go up to 99 but the teacher has 10 classes"
    else:
        field, value = {"shard_size 0": ("shard_size", 0), "w_min string": ("w_min", "one"),
                        "teacher list": ("teacher", ["x"])}[tamper]
        _edit_json(traj / "trajectories.json", **{field: value})
    if tamper == "shape":
        match = "hold states of shape [1, 8, 8]"
    refused(["train", "agd", "--config", "digits16_agd", "--out", str(work / "run"),
             *_agd(str(made["teacher"]), traj)], work, capsys, match)


def test_non_finite_state_is_a_one_line_data_error_when_read(work, made, capsys):
    from stepdistill.errors import DataError
    from stepdistill.trajectories import TrajectoryDataset

    x = load_file(str(_shard(work / "traj")))["x_t"]
    x[5] = float("nan")
    _rewrite(_shard(work / "traj"), x_t=x)
    ds = TrajectoryDataset(work / "traj")
    ds[4]
    with pytest.raises(DataError, match=r"state 5 of shard_00000.safetensors is damaged"):
        ds[5]


# --- values that gave wrong results or late refusals ---------------------------------------------------------------
def test_wrong_result_values_are_refused(work, made, capsys, tmp_path_factory):
    teacher, out = str(made["teacher"]), str(work / "out")
    traj = ["trajectories", "--teacher", teacher, "--out", out, "--num", "4", "--steps", "2"]
    refused([*traj, "--w-max", "inf"], work, capsys, "both finite, got [1.0, inf]")
    refused([*traj, "--resolution", "0"], work, capsys, "resolution 0: a pixel-space ClassConditionalPipeline")
    refused([*traj, "--resolution", "7"], work, capsys, "makes images of its network's size only, 16")
    refused(_sample(made["student"], work / "out", "--teacher-steps", "1000"), work, capsys,
            "--teacher-steps 1000: 1001 distinct timesteps do not fit")
    refused(_sample(made["student"], work / "out", "--teacher-steps", "1", "--teacher", "digits16-flow"), work,
            capsys, "teacher 'digits16-flow' cannot take this student's first steps")
    refused(_sample(made["student"], work / "out", "--guidance", "nan"), work, capsys, "--guidance must be a finite")
    refused(["average", str(made["msd"]), str(work / "msd"), "--out", out], work, capsys,
            "is a multi-student or guidance-adapter export")
    stats = work / "stats32.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), meta=np.array(json.dumps({"resolution": 32})))
    refused(["eval", str(made["student"]), "--steps", "1", "--num-samples", "10", "--ref", str(stats), "--metrics",
             "fid", "--out", out], work, capsys, "holds statistics of 32 px images, the samples are 16 px")
    partition = work / "partition.json"
    partition.write_text(json.dumps({"prompts": {"a cat": 0}}))
    refused(["train", "msd", "--config", "digits16_msd", "--out", str(work / "run"),
             *run_overrides(teacher, f"method_args.partition_file={partition}", "method_args.num_students=2")], work,
            capsys, "gives prompts, but this teacher is class-conditional")
    refused(["train", "vsd", "--config", "digits16_vsd", "--out", str(work / "run"),
             *run_overrides(teacher, "method_args.fake_score_lora_rank=-1")], work, capsys,
            "fake_score_lora_rank / fake_score_lora_alpha must be >= 0")
    refused(["train", "vsd", "--config", "digits16_vsd", "--out", str(work / "run"),
             *run_overrides(teacher, "method_args.guidance_max=.inf")], work, capsys,
            "config key 'method_args.guidance_max' must be a finite number, got inf")


def test_text_teacher_resolution_is_checked(tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("sdres")
    sd = build_tiny_sd(root / "sd")
    prompts = root / "p.txt"
    prompts.write_text("a red cat\n")
    refused(["trajectories", "--teacher", sd, "--prompts", str(prompts), "--out", str(root / "out"), "--num", "2",
             "--resolution", "5"], root, capsys, "makes images whose side is a positive multiple of 2")


def test_late_refusals_come_first(work, made, capsys):
    teacher, out = str(made["teacher"]), str(work / "out")
    refused(_sample(made["student"], work / "out", "--device", "tpu9"), work, capsys, "--device 'tpu9'")
    refused(["trajectories", "--teacher", teacher, "--out", out, "--num", "2", "--device", "tpu9"], work, capsys,
            "--device 'tpu9'")
    if not torch.cuda.is_available():
        refused(["trajectories", "--teacher", teacher, "--out", out, "--num", "2", "--device", "cuda"], work, capsys,
                "CUDA device(s)")
    (work / "afile").write_text("x")
    refused(["trajectories", "--teacher", teacher, "--out", str(work / "afile" / "t"), "--num", "2"], work, capsys,
            "is a file")
    refused(["stats", str(work / "traj"), "--resolution", "16", "--out", str(work / "afile" / "s.npz")], work,
            capsys, "exists and is not a folder")
    refused(["bench", "agd", "--out", out, "no_such_key=1"], work, capsys, "unknown config key 'no_such_key'")
    refused(_sample(made["student"], work / "out", "--num-samples", "0"), work, capsys, "--num-samples must be at")
    refused(["sample", str(made["student"]), "--steps", "-1", "--out", out], work, capsys, "--steps must be at least")


# --- a valid request that used to be refused ------------------------------------------------------------------------
def test_eval_of_a_multi_student_export_by_accuracy(made, tmp_path, capsys):
    assert main(["eval", str(made["msd"]), "--steps", "1", "--num-samples", "20", "--metrics", "accuracy", "--out",
                 str(tmp_path / "ev")]) == 0
    row = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0 <= row["accuracy"] <= 1 and [r["student"] for r in row["per_student"]] == [0, 1]
    # The pooled accuracy is the per-student accuracies weighted by their sample counts.
    pooled = sum(r["accuracy"] * r["num_samples"] for r in row["per_student"]) / 20
    assert row["accuracy"] == pytest.approx(pooled)


def test_diversity_with_a_text_teacher_needs_no_resolution(tmp_path, capsys):
    sd = build_tiny_sd(tmp_path / "sd")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    cfg = load_config("digits16_dmd2", run_overrides(sd, f"data.source={prompts}", "data.resolution=16", *SHORT,
                                                     "method_args.gan_weight_student=0",
                                                     "method_args.gan_weight_critic=0",
                                                     "method_args.sample_prompts=[a red cat]"))
    student = train(cfg, tmp_path / "run") / "pipeline"
    assert main(["sample", str(student), "--steps", "1", "--num-samples", "2", "--prompts", str(prompts),
                 "--teacher-steps", "1", "--teacher", sd, "--out", str(tmp_path / "s")]) == 0
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    assert images.shape == (2, 16, 16, 3)
