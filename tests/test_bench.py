"""The benchmark commands on a tiny 16x16 teacher with the cheap domain metrics (the Inception rows are the same
code path with more metrics; their cost belongs to the benchmark commands, not the test suite)."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from stepdistill.bench import report as bench
from stepdistill.pipelines import ClassConditionalPipeline

# Every test runs with one torch thread (the one_thread fixture of conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=11)
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                          timestep_spacing="trailing")
    path = tmp_path_factory.mktemp("teacher") / "p"
    ClassConditionalPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
    return str(path)


def test_teacher_baseline_report(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "TEACHER_STEPS", (3, 1))
    monkeypatch.setattr(bench, "TEACHER_UNGUIDED_STEPS", 2)
    rows = bench.run_teacher_baseline(tmp_path / "b", num_samples=10, pipeline=tiny_teacher,
                                      metrics=["fd_digits", "accuracy"])
    assert [r["name"] for r in rows] == ["teacher 3-step", "teacher 1-step", "teacher 2-step no CFG"]
    assert [r["nfe"] for r in rows] == [6, 2, 2]  # CFG rows cost two network calls per step, the unguided one
    assert [r["guidance"] for r in rows] == [bench.TEACHER_GUIDANCE, bench.TEACHER_GUIDANCE, 1.0]
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["num_samples"] == 10 and len(m["rows"]) == 3
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| teacher 1-step | 1 | 2 | - | - |" in report  # metrics not computed are shown as "-"
    assert (tmp_path / "b" / "grids_side_by_side.png").is_file()
    with pytest.raises(Exception, match="already exists"):
        bench.run_teacher_baseline(tmp_path / "b", num_samples=10, pipeline=tiny_teacher, metrics=["accuracy"])


def test_teacher_rows_cover_every_student_step_count():
    assert bench.teacher_step_counts([1, 2, 4]) == (4, 2, 1)  # the consistency bench
    assert bench.teacher_step_counts(None) == (4, 1)  # DMD2: students at their trained step count
    assert bench.teacher_step_counts([8, 1]) == (8, 4, 1)


def test_distillation_report(tiny_teacher, tmp_path):
    overrides = [f"teacher={tiny_teacher}", "train.max_steps=2", "train.tracker=none", "train.log_every=1",
                 "train.checkpoint_every=0", "train.sample_every=0", "data.batch_size=4",
                 "method_args.gan_weight_student=0", "method_args.gan_weight_critic=0"]
    rows = bench.run_distillation_report("dmd2", [("dmd2 student", "configs/digits16_dmd2.yaml")], tmp_path / "r",
                                         overrides, num_samples=10, teacher_steps=(1,),
                                         metrics=["fd_digits", "accuracy"])
    assert [r["name"] for r in rows] == ["teacher 50-step CFG", "teacher 1-step", "dmd2 student 1-step"]
    assert rows[-1]["nfe"] == 1 and rows[0]["nfe"] == 100
    out = tmp_path / "r"
    assert (out / "dmd2_student" / "pipeline" / "model_index.json").is_file()
    assert (out / "losses_dmd2_student.png").is_file() and (out / "report.md").is_file()
    assert "dmd2 student 1-step: fd_digits" in (out / "report.md").read_text()


def test_training_curve_resumes_one_run(tiny_teacher, tmp_path):
    overrides = [f"teacher={tiny_teacher}", "train.tracker=none", "train.log_every=1", "train.checkpoint_every=0",
                 "train.sample_every=0", "data.batch_size=4", "method_args.gan_weight_student=0",
                 "method_args.gan_weight_critic=0"]
    rows = bench.run_training_curve("dmd2", "configs/digits16_dmd2.yaml", tmp_path / "c", [1, 3], overrides,
                                    num_samples=10, metrics=["fd_digits", "accuracy"])
    assert [r["train_steps"] for r in rows] == [1, 3]
    assert rows[1]["train_minutes"] >= rows[0]["train_minutes"]
    logged = [json.loads(line)["step"] for line in (tmp_path / "c" / "train" / "logs.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # one run, continued: each step logged once
    assert (tmp_path / "c" / "curve.png").is_file() and "| 3 |" in (tmp_path / "c" / "curve.md").read_text()
    with pytest.raises(Exception, match="increasing"):
        bench.run_training_curve("dmd2", "configs/digits16_dmd2.yaml", tmp_path / "d", [3, 2], overrides)


def test_real_floor(tmp_path):
    row = bench.run_real_floor(tmp_path / "f", num_samples=200, metrics=["fd_digits", "accuracy"])
    assert row["num_samples"] == 200 and row["accuracy"] > 0.95
    with pytest.raises(Exception, match="at most 1797"):
        bench.run_real_floor(tmp_path / "g", num_samples=5000, metrics=["accuracy"])


def test_vsd_report_trains_dmd2_beside_it(tiny_teacher, tmp_path):
    """`bench vsd`: the VSD student and a DMD2 student (each config names its method) in one report, with the
    training wall time of each and the VSD-vs-DMD2 comparison line."""
    overrides = [f"teacher={tiny_teacher}", "train.max_steps=2", "train.tracker=none", "train.log_every=1",
                 "train.checkpoint_every=0", "train.sample_every=0", "data.batch_size=4"]
    rows = bench.run_distillation_report("vsd", [("vsd student", "digits16_vsd")], tmp_path / "r", overrides,
                                         num_samples=10, teacher_steps=(1,), metrics=["accuracy"],
                                         comparisons=[("dmd2 student", "digits16_dmd2")], diversity_steps=(1,))
    assert [r["name"] for r in rows] == ["teacher 50-step CFG", "teacher 1-step", "vsd student 1-step",
                                         "vsd student 1-step + teacher 1-step", "dmd2 student 1-step"]
    assert rows[3]["nfe"] == 3 and rows[3]["timesteps"] == [999, 499]  # two teacher calls (CFG) + the student
    assert all(r["train_minutes"] > 0 for r in rows[2:])
    report = (tmp_path / "r" / "report.md").read_text()
    assert "vsd student 1-step vs dmd2 student 1-step: train time" in report
    assert "stepdistill train dmd2 --config digits16_dmd2" in report


def test_scm_report_rows_and_step_cost(tiny_teacher, tmp_path):
    """`bench scm`: sCM at 1 and 2 steps beside rCM (its own method) and the training-step cost of the recipes
    measured side by side, each phase weighted by how often it runs."""
    overrides = [f"teacher={tiny_teacher}", "train.max_steps=2", "train.tracker=none", "train.log_every=1",
                 "train.checkpoint_every=0", "train.sample_every=0", "data.batch_size=4"]
    rows = bench.run_distillation_report(
        "scm", [("scm", "digits16_scm")], tmp_path / "r", overrides, num_samples=10, student_steps=[1, 2],
        teacher_steps=(2, 1), metrics=["accuracy"], comparisons=[("rcm", "digits16_rcm")],
        step_costs=[("lcm", "digits16_lcm", []), ("scm", "digits16_scm", []),
                    ("rcm, fake score every step", "digits16_rcm", ["method_args.fake_updates_per_student=1"])])
    assert [r["name"] for r in rows] == ["teacher 50-step CFG", "teacher 2-step", "teacher 1-step", "scm 1-step",
                                         "scm 2-step", "rcm 1-step", "rcm 2-step"]
    assert rows[4]["nfe"] == 2 and len(rows[4]["timesteps"]) == 2
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    costs = {c["name"]: c for c in m["step_costs"]}
    assert costs["lcm"]["ratio"] == 1.0 and costs["scm"]["seconds"] > 0
    assert costs["scm"]["phases"] == "student every 1"
    assert costs["rcm, fake score every step"]["phases"] == "student every 1, fake_score every 1"
    # rCM's step is sCM's student loss plus DMD's student and fake-score losses: it must cost more.
    assert costs["rcm, fake score every step"]["seconds"] > costs["scm"]["seconds"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Training-step cost" in report and "| rcm, fake score every step | student every 1, fake_score" in report
    assert "scm 2-step vs rcm 2-step: train time" in report


def test_memory_bench_counts_trainable_state_of_vsd_and_dmd2():
    """One step of each score-distillation row on the shipped digits16 teacher: VSD holds one trainable network
    plus adapters, DMD2 with a full fake score two; AdamW keeps two moments per trainable float."""
    from stepdistill.bench.memory import SCORE_CONFIGS, one_step

    got = {label: one_step(method, recipe, overrides(8), "digits16", "float32", "digits16")
           for label, method, recipe, overrides in SCORE_CONFIGS}
    full, lora, vsd = (got[k] for k in ("dmd2, full fake score", "dmd2, LoRA fake score", "vsd (LoRA fake score)"))
    from stepdistill.pipelines import load_pipeline

    net_mib = sum(p.numel() for p in load_pipeline("digits16").unet.parameters()) * 4 / 2**20  # float32
    assert full["trainable_mib"] == pytest.approx(2 * net_mib)
    assert net_mib < vsd["trainable_mib"] < 1.2 * net_mib and vsd["trainable_mib"] == lora["trainable_mib"]
    for r in got.values():
        assert r["optimizer_mib"] == pytest.approx(2 * r["trainable_mib"])
