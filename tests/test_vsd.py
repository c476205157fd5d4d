"""VSD (SwiftBrush / SNOOPI): the gradient against a direct computation in eps space, PG-SB's one draw per step for
both scores, a smoke run where the student moves, the LoRA fake score learns and the teacher never changes, exact
resume, the export round trip, the tiny text families, and config errors. Teachers are built in code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _tiny import digits_batch, export, log_rows, loss, randomize_lora, run_overrides, save_class_teacher
from _tiny_sd import build_tiny_flux, build_tiny_sd, build_tiny_sd3
from safetensors.torch import load_file

from stepdistill.errors import ConfigError
from stepdistill.loop import build_method, train
from stepdistill.pipelines import load_pipeline
from stepdistill.pipelines.lora import adapters
from stepdistill.trainers import load_config
from stepdistill.trainers.vsd import vsd_grad

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = ["method_args.fake_score_lora_rank=4", "method_args.fake_score_lora_alpha=4"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return save_class_teacher(tmp_path_factory.mktemp("teacher") / "pipe")


def _cfg(teacher: str, *extra: str):
    return load_config("digits16_vsd", run_overrides(teacher, "optim.fake_score.lr=0.001", *LORA, *extra))


def test_vsd_gradient_is_sigma2_times_the_eps_difference(teacher_dir):
    """w(t) (eps_teacher - eps_fake) with w = sigma_t^2, both with CFG at the same scale, computed here from the
    networks' eps predictions; the method works in x0 space."""
    method = build_method(_cfg(teacher_dir))
    randomize_lora(method.teacher.model, 0.1)  # a fake score that differs from the teacher
    labels = torch.tensor([1, 5, 7])
    cond, uncond = method.family.classes.cond(labels), method.family.classes.uncond(3, "cpu")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 16, 16, generator=g)
    t = torch.tensor([50, 400, 900])
    x_t = method.teacher.add_noise(x0, torch.randn(3, 1, 16, 16, generator=g), t)
    w = 2.5
    with torch.no_grad():
        with adapters(method.teacher.model, False):
            eps_real = method.teacher(x_t, t, cond, "eps", guidance_scale=w, uncond=uncond)
        eps_fake = method.teacher(x_t, t, cond, "eps", guidance_scale=w, uncond=uncond)
        got = vsd_grad(method.cfg, method.context(), method.fake(), x0, x_t, t, cond, uncond, w)
    sigma2 = (1 - method.teacher.alphas_cumprod[t]).float()
    want = sigma2.view(-1, 1, 1, 1) * (eps_real - eps_fake)
    assert want.abs().max() > 1e-3  # the two scores differ
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # The loss hands x0 exactly that gradient (divided by the element count).
    x0g = x0.clone().requires_grad_(True)
    from stepdistill.trainers.score_distillation import loss_from_grad

    loss_from_grad(x0g, got).backward()
    torch.testing.assert_close(x0g.grad * x0.numel(), got, atol=1e-6, rtol=1e-5)


def test_pg_sb_draws_one_scale_per_step_for_both_scores(teacher_dir):
    method = build_method(_cfg(teacher_dir, "method_args.guidance_min=1.5", "method_args.guidance_max=4"))
    seen = []
    orig = type(method.teacher).raw

    def raw(self, x_t, t, cond, guidance_scale=None, uncond=None, features=False):
        seen.append(guidance_scale)
        return orig(self, x_t, t, cond, guidance_scale, uncond, features)

    draws = []
    for step in range(3):
        seen.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(method.teacher), "raw", raw)
            loss(method, "student", digits_batch(4), step)
        assert len(seen) == 3 and seen[1] == seen[2]  # the student pass, then teacher and fake score at one scale
        assert seen[0] is None and isinstance(seen[1], float) and 1.5 <= seen[1] <= 4
        draws.append(seen[1])
    assert len(set(draws)) == 3  # drawn again each step


def test_smoke_run_moves_student_trains_lora_and_keeps_the_teacher(teacher_dir, tmp_path):
    cfg = _cfg(teacher_dir, "train.max_steps=6", "data.batch_size=4", "train.checkpoint_every=3")
    before = build_method(cfg)
    run = train(cfg, tmp_path / "run")
    rows = log_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["student/grad_norm"] > 0
    state = load_file(run / "checkpoints" / "step-6" / "model.safetensors")
    student = {k[len("student.model."):]: v for k, v in state.items() if k.startswith("student.model.")}
    moved = max(float((v - before.student.model.state_dict()[k]).abs().max()) for k, v in student.items())
    assert moved > 1e-4
    lora = {k: v for k, v in state.items() if "lora_B" in k}
    assert lora and max(float(v.abs().max()) for v in lora.values()) > 0  # B starts at zero
    assert not any(k.startswith("teacher.") and "lora_" not in k for k in state)  # the base is never trained
    # The exported student is the teacher's pipeline class at the trained timestep, untouched teacher weights aside.
    pipe = load_pipeline(str(run / "pipeline"))
    assert pipe.scheduler.config.student_timesteps == [999]
    exported = pipe.unet.state_dict()
    for k, v in student.items():
        assert torch.equal(exported[k], v), k

    # Resume from the half-way checkpoint: the same final state, bit for bit.
    res = tmp_path / "res"
    shutil.copytree(run, res)
    shutil.rmtree(res / "checkpoints" / "step-6")
    shutil.rmtree(res / "pipeline")
    (res / "checkpoints" / "latest").write_text("step-3\n")
    train(cfg, res)
    again = load_file(res / "checkpoints" / "step-6" / "model.safetensors")
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_export_round_trip_equals_the_one_step_student(teacher_dir, tmp_path):
    method = build_method(_cfg(teacher_dir))
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export(method, tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    labels = torch.tensor([0, 3])
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    out = pipe(labels, timesteps=[999], generator=gens, output_type="pt").images
    z = torch.cat([torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(7 + i)) for i in range(2)])
    with torch.no_grad():
        x0 = method.context().generate(method.student, method.family.classes.cond(labels), 2, steps=0, noise=z)
    torch.testing.assert_close(out, x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert "VSD student" in (tmp_path / "p" / "README.md").read_text()


@pytest.mark.parametrize("build", [build_tiny_sd, build_tiny_sd3, build_tiny_flux])
def test_tiny_text_families_train_from_prompts_only(build, tmp_path):
    teacher = build(tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 1\na blue 2\n\na green 3\n")
    flow = build is not build_tiny_sd
    cfg = load_config("digits16_vsd", [f"teacher={teacher}", f"data.source={prompts}", "data.resolution=16",
                                       "data.batch_size=2", "train.max_steps=2", "train.tracker=none",
                                       "train.checkpoint_every=0", "train.log_every=1",
                                       "method_args.fake_score_lora_rank=2", "method_args.fake_score_lora_alpha=2",
                                       f"method_args.student_timesteps=[{1000 if flow else 999}]"])
    run = train(cfg, tmp_path / "run")
    assert log_rows(run)[-1]["student/grad_norm"] > 0
    assert (run / "pipeline" / "model_index.json").is_file()


@pytest.mark.parametrize("override,message", [
    ("method_args.guidance_min=3", "guidance_min / guidance_max must satisfy 1 <= min <= max"),
    ("method_args.guidance_max=0.5", "guidance_min / guidance_max must satisfy 1 <= min <= max"),
    ("method_args.weighting=snr", "method_args.weighting must be one of sigma2, dm_norm"),
    ("method_args.fake_cond_dropout=0", "fake_guidance needs method_args.fake_cond_dropout > 0"),
    ("method_args.fake_score_lora_rank=512", "fake_score_lora_rank=512 exceeds the smallest adapted layer"),
])
def test_config_errors(teacher_dir, override, message):
    extra = ["method_args.guidance_min=2", "method_args.guidance_max=2"] if "guidance" not in override else []
    with pytest.raises(ConfigError, match=message):
        build_method(load_config("digits16_vsd", run_overrides(teacher_dir, *extra, override)))


def test_an_empty_prompt_file_is_one_line_error(tmp_path):
    from stepdistill.cli import main

    teacher = build_tiny_sd(tmp_path / "teacher")
    prompts = Path(tmp_path / "prompts.txt")
    prompts.write_text("\n  \n\n")
    out = tmp_path / "run"
    assert main(["train", "vsd", "--config", "digits16_vsd", f"teacher={teacher}", f"data.source={prompts}",
                 "--out", str(out)]) == 2
    assert not out.exists()
