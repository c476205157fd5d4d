"""Multi-student distillation: partitions (class ranges, k-means), the router pipeline (each sample to its student,
one network call per student per step, the caller's order), runs on digits16 and on the tiny SD pipeline, teacher
score matching of a smaller student, exact resume, one student per rank on 2 processes, the export round trip and
the bad inputs. Teachers are built in code."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tiny import ROOT, export, fixed_loss_descent, free_port, log_rows, run_overrides, save_class_teacher
from _tiny_sd import build_tiny_sd
from safetensors.torch import load_file

from stepdistill.errors import ConfigError
from stepdistill.loop import build_method, train
from stepdistill.pipelines import MultiStudentPipeline, load_pipeline, rebuild_pipeline
from stepdistill.pipelines.multi_student import (
    Router,
    check_class_partition,
    contiguous_partition,
    kmeans_partition,
)
from stepdistill.trainers import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = "digits16_msd"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return save_class_teacher(tmp_path_factory.mktemp("teacher") / "pipe")


def _overrides(teacher: str, *extra: str) -> list[str]:
    return run_overrides(teacher, "method_args.num_students=2", "method_args.fake_updates_per_student=2", *extra)


def _method(teacher: str, *extra: str):
    return build_method(load_config(CONFIG, _overrides(teacher, *extra)))


def _students(state: dict) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith("students."):
            i, rest = k[len("students."):].split(".", 1)
            out.setdefault(int(i), {})[rest.removeprefix("model.")] = v
    return out


# --- partitions and routing -----------------------------------------------------------------------------------------
def test_class_partitions_and_their_errors():
    assert contiguous_partition(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert check_class_partition([[0, 2], [1]], 3, "p") == [0, 1, 0]
    with pytest.raises(ValueError, match="class 2 has no student"):
        check_class_partition([[0], [1]], 3, "p")
    with pytest.raises(ValueError, match="class 1 is given to students 0 and 1"):
        check_class_partition([[0, 1], [1, 2]], 3, "p")
    with pytest.raises(ValueError, match="student 1 owns no class"):
        check_class_partition([[0, 1, 2], []], 3, "p")


def test_kmeans_partition_recovers_separated_groups_with_a_fixed_seed():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 10
    groups = np.repeat([0, 1, 2], 20)
    feats = centers[groups] + 0.1 * rng.normal(size=(60, 8))
    owner, centroids = kmeans_partition(feats, 3, seed=0)
    assert all(len(set(owner[groups == g])) == 1 for g in range(3)) and len(set(owner)) == 3
    again, _ = kmeans_partition(feats, 3, seed=0)
    assert (again == owner).all()
    router = Router(3, centroids=centroids)
    assert router.route_features(torch.tensor(centers[[2, 0, 1]])).tolist() == owner[[40, 0, 20]].tolist()


def test_router_pipeline_batches_by_student_and_keeps_the_callers_order(teacher_dir):
    base = load_pipeline(teacher_dir)
    other = copy.deepcopy(base.unet)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    students = [base, rebuild_pipeline(base, unet=other)]
    pipe = MultiStudentPipeline(students, Router(2, class_to_student=[0] * 5 + [1] * 5))
    calls: dict[int, list[int]] = {0: [], 1: []}
    for k, s in enumerate(students):
        s.unet.register_forward_hook(lambda m, a, out, k=k: calls[k].append(a[0].shape[0]))
    labels = [7, 1, 8, 2, 9]

    def gens(idx):
        return [torch.Generator().manual_seed(i) for i in idx]

    out = pipe(labels, generator=gens(range(5)), num_inference_steps=3, output_type="pt").images
    assert calls == {0: [2, 2, 2], 1: [3, 3, 3]}  # one call per student and step, with all of its samples
    for i, label in enumerate(labels):
        alone = students[int(label >= 5)](torch.tensor([label]), generator=gens([i]), num_inference_steps=3,
                                          output_type="pt").images
        torch.testing.assert_close(out[i: i + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no student owns class 10"):
        pipe([3, 10])


# --- training --------------------------------------------------------------------------------------------------------
def test_two_students_train_in_turn_and_export_a_routed_pipeline(teacher_dir, tmp_path):
    cfg = load_config(CONFIG, _overrides(teacher_dir, "train.max_steps=8", "train.checkpoint_every=4"))
    before = build_method(cfg)
    run = train(cfg, tmp_path / "run")
    rows = log_rows(run)
    assert [r["step"] for r in rows if "student/loss" in r] == [1, 3, 5, 7]  # blocks: student 0, 1, 0, 1
    assert any("gan_g_loss" in k for r in rows for k in r)  # the recipe's stage: DM + GAN, as DMD2's recipe
    state = load_file(run / "checkpoints" / "step-8" / "model.safetensors")
    trained = _students(state)
    start = {k: dict(s.model.state_dict()) for k, s in enumerate(before.students)}
    for k in (0, 1):
        assert max(float((v - start[k][n]).abs().max()) for n, v in trained[k].items()) > 1e-4
    assert {k.split(".")[1] for k in state if k.startswith("fake_scores.")} == {"0", "1"}  # one per student
    assert not any(k.startswith("teacher.") for k in state)
    pipe = load_pipeline(str(run / "pipeline"))
    assert isinstance(pipe, MultiStudentPipeline) and pipe.router.class_to_student == [0] * 5 + [1] * 5
    for k in (0, 1):
        exported = pipe.students[k].unet.state_dict()
        assert all(torch.equal(exported[n], v) for n, v in trained[k].items())
    # DiffusionPipeline-style loading of the folder gives student 0 alone.
    assert torch.equal(load_pipeline(str(run / "pipeline"), single=True).unet.state_dict()["conv_in.weight"],
                       trained[0]["conv_in.weight"])

    # Resume from the half-way checkpoint: the same final state, bit for bit.
    res = tmp_path / "res"
    shutil.copytree(run, res)
    shutil.rmtree(res / "checkpoints" / "step-8")
    shutil.rmtree(res / "pipeline")
    (res / "checkpoints" / "latest").write_text("step-4\n")
    train(cfg, res)
    again = load_file(res / "checkpoints" / "step-8" / "model.safetensors")
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)

    # A new stage may train one student only: the other stays as it was.
    train(load_config(CONFIG, _overrides(teacher_dir, "train.max_steps=12", "train.checkpoint_every=4",
                                         "method_args.train_students=[1]")), res, allow_changes=True)
    later = _students(load_file(res / "checkpoints" / "step-12" / "model.safetensors"))
    assert all(torch.equal(later[0][n], v) for n, v in trained[0].items())
    assert any(not torch.equal(later[1][n], v) for n, v in trained[1].items())


def test_export_round_trip_equals_each_students_one_step_output(teacher_dir, tmp_path):
    method = _method(teacher_dir, "method_args.fake_score=shared")
    assert len(method.fake_scores) == 1
    with torch.no_grad():
        for p in method.students.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export(method, tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    labels = torch.tensor([6, 0, 9, 3])
    gens = [torch.Generator().manual_seed(7 + i) for i in range(4)]
    out = pipe(labels, timesteps=[999], generator=gens, output_type="pt").images
    for i, label in enumerate(labels.tolist()):
        z = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(7 + i))
        student = method.nets(int(label >= 5), gan=False).student
        with torch.no_grad():
            x0 = method.context().generate(student, method.classes.cond(torch.tensor([label])), 1, steps=0, noise=z)
        torch.testing.assert_close(out[i: i + 1], x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert "student 1: classes [5, 6, 7, 8, 9]" in (tmp_path / "p" / "README.md").read_text()


def test_teacher_score_matching_trains_a_smaller_student(teacher_dir):
    method = _method(teacher_dir, "method_args.stage=score_matching",
                     "method_args.student_config.block_out_channels=[4,8]")
    n_student = sum(p.numel() for p in method.students[0].parameters())
    assert n_student < 0.5 * sum(p.numel() for p in method.teacher.model.parameters())
    from stepdistill.data import load_digits16

    x, y = load_digits16()
    batch = {"image": x[:16], "label": y[:16]}
    opt = torch.optim.Adam(method.students[0].parameters(), lr=3e-3)
    before, after = fixed_loss_descent(method, "student", batch, opt, steps=30)
    assert after < 0.7 * before


def test_tiny_sd_students_split_prompts_by_kmeans(tmp_path):
    teacher = build_tiny_sd(tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na red dog\na blue car\na blue boat\n")
    cfg = load_config(CONFIG, [f"teacher={teacher}", f"data.source={prompts}", "data.resolution=16",
                               "data.batch_size=2", "train.max_steps=4", "train.tracker=none",
                               "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=1",
                               "method_args.num_students=2", "method_args.fake_updates_per_student=1",
                               "method_args.stage=distribution_matching", "method_args.gan_weight_student=0",
                               "method_args.gan_weight_critic=0", "method_args.fake_score=shared"])
    run = train(cfg, tmp_path / "run")
    assert [r["step"] for r in log_rows(run) if "student/loss" in r] == [1, 2, 3, 4]
    pipe = load_pipeline(str(run / "pipeline"))
    assert pipe.router.kind == "prompts"
    owners = pipe.route(prompts.read_text().split("\n")[:4])
    assert sorted(set(owners.tolist())) == [0, 1]
    method = build_method(cfg)  # the partition is fitted again, the same (fixed seed)
    assert [method._prompt_owner[p] for p in prompts.read_text().split("\n")[:4]] == owners.tolist()
    images = pipe(["a red cat", "a blue boat"], timesteps=[999], guidance_scale=1.0, height=16, width=16,
                  generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images
    assert images.shape == (2, 16, 16, 3)


# Runs the CLI in each process of a torch.distributed launch after recording, at every point where the loop shares
# the students between ranks (before it does), the students whose parts this rank trains: what each rank trained.
RANK_DUMP_SCRIPT = """
import sys

import torch.distributed as dist
from safetensors.torch import save_file

import stepdistill.loop.loop as loop
from stepdistill.cli import main

dump, held = sys.argv[1], {}
build_method, share_parts = loop.build_method, loop.share_parts


def recording_build(*args, **kwargs):
    held["method"] = method = build_method(*args, **kwargs)
    return method


def recording_share(phases, *args, **kwargs):
    rank = dist.get_rank() if dist.is_initialized() else 0
    students = held["method"].students
    student_of = {id(p): k for k, s in enumerate(students) for p in s.parameters()}
    owned = {student_of[id(p)] for phase in phases for params, ranks in phase.parts or [] if rank in ranks
             for p in params if id(p) in student_of}
    save_file({f"{k}.{n}": v.detach().cpu().clone() for k in sorted(owned)
               for n, v in students[k].model.state_dict().items()}, f"{dump}-{rank}.safetensors")
    return share_parts(phases, *args, **kwargs)


loop.build_method, loop.share_parts = recording_build, recording_share
sys.exit(main(sys.argv[2:]))
"""


def _train_two_processes_recording(tmp_path, out, overrides: list[str]) -> subprocess.CompletedProcess:
    """Train the msd recipe with ``overrides`` into ``out`` in 2 CPU processes (torch.distributed.run), each rank
    writing the students it trained to ``tmp_path / "trained-<rank>.safetensors"``."""
    script = tmp_path / "record_ranks.py"
    script.write_text(RANK_DUMP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path / "trained"),
           "train", "msd", "--config", str(ROOT / "configs" / f"{CONFIG}.yaml"), "--out", str(out), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_one_student_per_rank_on_two_processes(teacher_dir, tmp_path):
    """Each of 2 ranks trains its own student (rank 0 exactly as a 1-process run that trains student 0 alone, same
    seeds: rank 0's); the checkpoint and the export hold both students as their ranks trained them."""
    extra = ["train.max_steps=4", "data.batch_size=4", "method_args.stage=distribution_matching",
             "optim.student.max_grad_norm=0", "optim.fake_score.max_grad_norm=0", "train.checkpoint_every=0"]
    res = _train_two_processes_recording(tmp_path, tmp_path / "two", _overrides(teacher_dir, *extra))
    assert res.returncode == 0, res.stderr[-4000:]
    # What each rank trained (its own students, before the loop shared them): rank r trains student r only.
    by_rank = [_students({f"students.{k}": v for k, v in load_file(tmp_path / f"trained-{r}.safetensors").items()})
               for r in (0, 1)]
    assert [sorted(d) for d in by_rank] == [[0], [1]]
    start = _method(teacher_dir).students[1].model.state_dict()
    assert any(not torch.equal(by_rank[1][1][n], start[n]) for n in start)  # rank 1 trained student 1
    two = _students(load_file(tmp_path / "two" / "checkpoints" / "step-4" / "model.safetensors"))
    exported = load_pipeline(str(tmp_path / "two" / "pipeline"))
    for k in (0, 1):  # the checkpoint and the export hold each student as its rank trained it
        assert two[k].keys() == by_rank[k][k].keys()
        assert all(torch.equal(two[k][n], v) for n, v in by_rank[k][k].items())
        weights = exported.students[k].unet.state_dict()
        assert all(torch.equal(weights[n], v) for n, v in by_rank[k][k].items())
    one_run = train(load_config(CONFIG, _overrides(teacher_dir, *extra, "method_args.train_students=[0]")),
                    tmp_path / "one")
    one = _students(load_file(one_run / "checkpoints" / "step-4" / "model.safetensors"))
    for n, v in one[0].items():
        torch.testing.assert_close(two[0][n], v, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(one[1][n], start[n]) for n in start)  # which the 1-process run left alone


# --- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("method_args.class_partition=[[0,1,2,3,4],[4,5,6,7,8,9]]", "class 4 is given to students 0 and 1"),
    ("method_args.class_partition=[[0,1],[2,3]]", "class 4 has no student"),
    ("method_args.num_students=11", "num_students=11 exceeds the teacher's 10 classes"),
    ("method_args.student_config.out_channels=2", "output shape"),
    ("method_args.fake_score_lora_rank=4", "fake_score=per_student needs full fake scores"),
    ("method_args.train_students=[2]", "train_students must be distinct students in \\[0, 1\\]"),
])
def test_config_errors(teacher_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        _method(teacher_dir, override)


def test_adversarial_stage_needs_gan_weights_and_cli_refuses_cleanly(teacher_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="stage=adversarial needs gan_weight"):
        _method(teacher_dir, "method_args.gan_weight_student=0", "method_args.gan_weight_critic=0")
    from stepdistill.cli import main

    out = tmp_path / "run"
    code = main(["train", "msd", "--config", CONFIG, "--out", str(out),
                 *_overrides(teacher_dir, "method_args.num_students=11")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "exceeds the teacher's 10 classes" in err[0] and not out.exists()
    bad = tmp_path / "partition.json"
    bad.write_text(json.dumps({"classes": [[0, 1, 2, 3, 4, 5, 6, 7, 8]]}))
    with pytest.raises(ConfigError, match="1 parts for num_students=2"):
        _method(teacher_dir, f"method_args.partition_file={bad}")
