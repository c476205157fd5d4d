"""Diversity distillation at inference (pipelines/diversity.py): the teacher's first step, then the student, equals
the same computed by hand from the teacher network and the stock student pipeline; the CLI flags and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import export, run_overrides, save_class_teacher

from stepdistill.errors import UserError
from stepdistill.loop import build_method
from stepdistill.pipelines import load_pipeline
from stepdistill.pipelines.diversity import hybrid_sample, hybrid_schedule, teacher_of
from stepdistill.trainers import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny class teacher and a (perturbed) one-step DMD2 student exported from it."""
    root = tmp_path_factory.mktemp("div")
    teacher = save_class_teacher(root / "teacher")
    method = build_method(load_config("digits16_dmd2", run_overrides(teacher, "method_args.gan_weight_student=0",
                                                                     "method_args.gan_weight_critic=0")))
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export(method, root / "student")
    return teacher, str(root / "student")


def test_schedule():
    assert hybrid_schedule(1000, 1, [999], flow=False) == [999, 499]  # a one-step student: K + 1 trailing points
    assert hybrid_schedule(1000, 2, [999], flow=False) == [999, 666, 333]
    assert hybrid_schedule(1000, 1, [1000], flow=True) == [1000, 500]
    four = [999, 749, 499, 249]  # a 4-step student keeps its trained schedule; the teacher takes its first step(s)
    assert hybrid_schedule(1000, 1, four, flow=False) == four and hybrid_schedule(1000, 3, four, flow=False) == four
    assert hybrid_schedule(1000, 4, four, flow=False) == [999 - 125 * j for j in range(8)]  # K + S points


def test_teacher_first_step_then_student_equals_the_computation_by_hand(exported):
    teacher_dir, student_dir = exported
    student, teacher = load_pipeline(student_dir), load_pipeline(teacher_dir)
    assert teacher_of(student) == teacher_dir  # the export records its teacher
    labels, w = torch.tensor([2, 7]), 2.0
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(2)]  # noqa: E731
    got = hybrid_sample(student, teacher, 1, w, gens(), labels=labels, output_type="pt").images

    # By hand: one DDIM step of the teacher (v-prediction, CFG w) from t = 999 to 499, then the student pipeline.
    g = gens()
    x = torch.cat([torch.randn((1, 1, 16, 16), generator=gi) for gi in g])
    acp = teacher.scheduler.alphas_cumprod
    a, s = acp[999].sqrt(), (1 - acp[999]).sqrt()
    a2, s2 = acp[499].sqrt(), (1 - acp[499]).sqrt()
    with torch.no_grad():
        v_c = teacher.unet(x, 999, class_labels=labels).sample
        v_u = teacher.unet(x, 999, class_labels=torch.full_like(labels, teacher.null_class)).sample
    v = v_u + w * (v_c - v_u)
    x0, eps = a * x - s * v, s * x + a * v
    x_mid = (a2 * x0 + s2 * eps).float()
    want = student(labels, timesteps=[499], latents=x_mid, generator=g, output_type="pt").images
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = student(labels, timesteps=[999], generator=gens(), output_type="pt").images
    assert not torch.allclose(got, plain, atol=1e-3)  # the teacher's step changed the samples


def test_cli_sample_with_teacher_steps_and_its_refusals(exported, tmp_path):
    from stepdistill.cli import main

    teacher_dir, student_dir = exported
    out = tmp_path / "s"
    assert main(["sample", student_dir, "--steps", "1", "--num-samples", "4", "--teacher-steps", "1",
                 "--out", str(out)]) == 0
    assert np.load(out / "samples.npz")["images"].shape == (4, 16, 16, 1)
    # A pipeline that records no teacher (the teacher itself) and no --teacher: one line, nothing written.
    bad = tmp_path / "bad"
    assert main(["sample", teacher_dir, "--steps", "1", "--num-samples", "2", "--teacher-steps", "1",
                 "--out", str(bad)]) == 2
    assert not bad.exists()
    with pytest.raises(UserError, match="does not record its teacher"):
        teacher_of(load_pipeline(teacher_dir))
    assert main(["sample", student_dir, "--steps", "1", "--num-samples", "2", "--teacher", teacher_dir,
                 "--out", str(bad)]) == 2  # --teacher without --teacher-steps
    assert not bad.exists()



def test_the_documented_stock_recipe_equals_hybrid_sample(tmp_path):
    """The docs' recipe for stock SD pipelines (no stepdistill) gives what hybrid_sample gives, on a tiny SD
    pipeline and its (perturbed) DMD2 student."""
    from _tiny_sd import build_tiny_sd

    teacher_dir = build_tiny_sd(tmp_path / "teacher")
    method = build_method(load_config("digits16_dmd2", [
        f"teacher={teacher_dir}", "data.resolution=16", "method_args.gan_weight_student=0",
        "method_args.gan_weight_critic=0"]))
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export(method, tmp_path / "student")
    docs = (Path(__file__).resolve().parents[1] / "docs" / "methods" / "README.md").read_text()
    recipe = docs.split("<!-- BEGIN diversity_recipe -->")[1].split("```python")[1].split("```")[0]
    ns: dict = {}
    exec(recipe, ns)  # the docs' code block, as written there
    stock = ns["diverse"](teacher_dir, str(tmp_path / "student"), ["a red 1"], 5, teacher_guidance=3.0)
    ours = hybrid_sample(load_pipeline(str(tmp_path / "student")), load_pipeline(teacher_dir), 1, 3.0,
                         [torch.Generator().manual_seed(5)], prompts=["a red 1"], resolution=16).images
    np.testing.assert_allclose(stock, ours, atol=1e-4)
