"""Consistency distillation (LCM, LCM-LoRA, multiphase): smoke runs, the EMA target and exact resume, the segment
targets, export round trips (class-conditional and SD-type, the latter loaded by plain diffusers in a subprocess),
LoRA loading, a 2-process run and one-line config errors. Every teacher is built in code and saved to tmp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import (
    digits_batch,
    export,
    fixed_loss_descent,
    log_rows,
    randomize_lora,
    run_overrides,
    save_class_teacher,
    train_two_processes,
    unet_weights,
)
from _tiny import loss as method_loss
from _tiny_sd import build_tiny_sd
from safetensors.torch import load_file

from stepdistill import schedules as S
from stepdistill.errors import ConfigError, UserError
from stepdistill.loop import build_method, train
from stepdistill.pipelines import family_of, load_pipeline
from stepdistill.trainers import load_config
from stepdistill.trainers.consistency import segment_boundary, segment_edges

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "digits16_lcm.yaml"
VARIANTS = {
    "lcm": [],
    "lora": ["method_args.lora_rank=4", "train.ema_decay=0"],  # a LoRA student keeps no student EMA
    "multiphase": ["method_args.segments=[4,2]", "method_args.segment_starts=[0,3]"],
}


# Every test runs with one torch thread (the one_thread fixture of conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """A tiny class-conditional v-prediction teacher at digits16 size (10 classes + null), random weights."""
    return save_class_teacher(tmp_path_factory.mktemp("teacher") / "pipe")


def _method(teacher: str, *extra: str):
    return build_method(load_config(CONFIG, run_overrides(teacher, *extra)))


def _noise(n: int, seed: int, shape=(1, 16, 16)) -> tuple[list[torch.Generator], torch.Tensor]:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return gens, torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i))
                            for i in range(n)])


# --- smoke runs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_smoke_run_moves_loss_and_student(teacher_dir, tmp_path, variant):
    cfg = load_config(CONFIG, run_overrides(teacher_dir, "train.max_steps=6", *VARIANTS[variant]))
    run = train(cfg, tmp_path / "run")
    rows = log_rows(run)
    losses = [r["student/loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(losses)) and len(set(losses)) > 1
    pipe_dir = run / "pipeline"
    trained, teacher = unet_weights(pipe_dir), unet_weights(Path(teacher_dir))
    assert any(not torch.equal(trained[k], teacher[k]) for k in teacher)
    sched = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    if variant == "multiphase":
        assert [r["student/segments"] for r in rows] == [4, 4, 4, 2, 2, 2]
        assert sched["_class_name"] == "DDIMScheduler" and sched["student_timesteps"] == [999, 499]
    else:
        assert sched["_class_name"] == "LCMScheduler" and sched["student_timesteps"] == [999]
    assert (pipe_dir / "pytorch_lora_weights.safetensors").is_file() == (variant == "lora")
    assert "stepdistill train consistency" in (pipe_dir / "README.md").read_text()
    assert (run / "samples" / "step-6.png").is_file()


def test_loss_moves_the_student_towards_the_target(teacher_dir):
    """A fixed batch + noise: a few optimizer steps lower the consistency loss (the target held still)."""
    method = _method(teacher_dir, "method_args.loss=l2", "method_args.target_ema_decay=0.0")
    opt = torch.optim.Adam(method.phases()[0].params, lr=2e-4)
    # Loop step 0 always: the target is not updated.
    before, after = fixed_loss_descent(method, "student", digits_batch(), opt, 10)
    assert after < 0.7 * before


# --- the EMA target -----------------------------------------------------------------------------------------------
def test_ema_target_updates_once_per_step_with_the_configured_decay(teacher_dir):
    method = _method(teacher_dir, "method_args.target_ema_decay=0.9")
    assert not any(p.requires_grad for p in method.target.parameters()) and not list(method.target.parameters())
    student = dict(method.student.model.named_parameters())
    target = dict(method.target.model.named_buffers())
    assert student.keys() == target.keys() and all(torch.equal(student[k], target[k]) for k in student)
    opt = torch.optim.SGD(method.phases()[0].params, lr=0.5)
    loss, _ = method_loss(method, "student", digits_batch(), 0)
    loss.backward()
    opt.step()
    t0 = {k: v.clone() for k, v in target.items()}
    s1 = {k: v.detach().clone() for k, v in student.items()}
    assert any(not torch.equal(t0[k], s1[k]) for k in t0)
    method_loss(method, "student", digits_batch(), 1)
    method_loss(method, "student", digits_batch(), 1)  # a second micro-batch of the same step must not update again
    for k in t0:
        torch.testing.assert_close(target[k], 0.9 * t0[k] + 0.1 * s1[k])
    assert int(method.target_step) == 1


def test_resume_equals_uninterrupted_run(teacher_dir, tmp_path, capsys):
    extra = ["train.max_steps=6", "train.checkpoint_every=3", "method_args.target_ema_decay=0.5"]
    ref = train(load_config(CONFIG, run_overrides(teacher_dir, *extra)), tmp_path / "ref")
    res = tmp_path / "res"
    shutil.copytree(ref, res)
    shutil.rmtree(res / "checkpoints" / "step-6")
    shutil.rmtree(res / "pipeline")
    (res / "checkpoints" / "latest").write_text("step-3\n")
    capsys.readouterr()
    # a different recommended sampling schedule only changes the export, so the run resumes
    train(load_config(CONFIG, run_overrides(teacher_dir, *extra, "method_args.sample_timesteps=[[999,499]]")), res)
    assert "resuming from" in capsys.readouterr().err
    assert json.loads((res / "pipeline" / "scheduler" / "scheduler_config.json").read_text())["sample_timesteps"] == [
        [999, 499]]
    wa = load_file(str(ref / "checkpoints" / "step-6" / "model.safetensors"))
    wb = load_file(str(res / "checkpoints" / "step-6" / "model.safetensors"))
    assert wa.keys() == wb.keys() and "target_step" in wa and int(wa["target_step"]) == 5
    assert any(k.startswith("target.model.") for k in wa) and not any(k.startswith("_frozen_teacher.") for k in wa)
    half = load_file(str(ref / "checkpoints" / "step-3" / "model.safetensors"))
    assert any(not torch.equal(half[k], wa[k]) for k in wa if k.startswith("target.model."))  # the target moved
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k.startswith("student/")} for r in rows]  # noqa: E731
    assert strip(log_rows(ref)) == strip(log_rows(res))


# --- LoRA -----------------------------------------------------------------------------------------------------------
def test_lora_student_shares_the_teacher_network(teacher_dir):
    method = _method(teacher_dir, "method_args.lora_rank=4")
    params = method.phases()[0].params
    names = {id(p): n for n, p in method.named_parameters()}
    assert params and all("lora_" in names[id(p)] for p in params)
    assert method.target is None and method.teacher is method.student
    unet_numel = sum(p.numel() for n, p in method.student.model.named_parameters() if "lora_" not in n)
    # Exactly one copy of the network's weights (plus the adapters), and no target copy as buffers either.
    assert sum(p.numel() for n, p in method.named_parameters() if "lora_" not in n) == unet_numel
    # The EMA target holds the adapters only (as many numbers as the trainable ones), no copy of the network.
    ema_numel = sum(b.numel() for b in method.target_adapters.buffers())
    assert ema_numel == sum(p.numel() for p in params)
    assert sum(b.numel() for b in method.buffers()) - ema_numel < 0.1 * unet_numel
    pristine = load_pipeline(teacher_dir).unet
    x, t, labels = torch.randn(4, 1, 16, 16), torch.tensor([10, 300, 600, 990]), torch.tensor([0, 3, 5, 10])
    cond = method.family.classes.cond(labels)
    randomize_lora(method.student.model, 0.1)
    with torch.no_grad():
        want = pristine(x, t, class_labels=labels).sample
        with method._adapters(False):
            teacher = method.teacher.raw(x, t, cond)
        student = method.student.raw(x, t, cond)
    torch.testing.assert_close(teacher, want)
    assert not torch.allclose(student, want, atol=1e-4)
    assert all(p.requires_grad for p in params)  # adapters back on and trainable after the teacher call
    loss, _ = method_loss(method, "student", digits_batch(), 0)
    loss.backward()
    assert all(p.grad is None for n, p in method.student.model.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_lora_ema_target_swaps_in_averaged_adapters(teacher_dir):
    """LoRA + target_ema_decay: the target uses an EMA of the adapter weights; the student's own weights survive."""
    method = _method(teacher_dir, "method_args.lora_rank=4", "method_args.target_ema_decay=0.9")
    params = method.phases()[0].params
    ema = method.target_adapters.weights()
    assert len(ema) == len(params) and all(torch.equal(w, p) for w, p in zip(ema, params))
    opt = torch.optim.SGD(params, lr=0.5)
    loss, _ = method_loss(method, "student", digits_batch(), 0)
    loss.backward()  # no in-place error: the target was computed before the graph through the adapters
    opt.step()
    w0 = [w.clone() for w in ema]
    p1 = [p.detach().clone() for p in params]
    assert any(not torch.equal(a, b) for a, b in zip(w0, p1))
    method_loss(method, "student", digits_batch(), 1)
    for w, a, b in zip(method.target_adapters.weights(), w0, p1):
        torch.testing.assert_close(w, 0.9 * a + 0.1 * b)
    assert all(torch.equal(p, b) for p, b in zip(params, p1))  # trained weights restored after the swap
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([500, 900])
    cond = method.family.classes.cond(torch.tensor([1, 2]))
    with torch.no_grad():
        online = method.student.raw(x, t, cond)
        with method.target_adapters.swapped():
            averaged = method.student.raw(x, t, cond)
    assert not torch.allclose(online, averaged)
    assert "target_adapters.w0" in method.state_dict()  # checkpointed with the method


# --- segment targets ------------------------------------------------------------------------------------------------
def test_segment_boundaries():
    t = torch.tensor([999, 759, 750, 749, 500, 499, 260, 249, 19, 0])
    assert segment_boundary(t, 4).tolist() == [749, 749, 749, 499, 499, 249, 249, -1, -1, -1]
    assert segment_boundary(t, 1).tolist() == [-1] * len(t)
    assert segment_edges(4) == [999, 749, 499, 249, -1]


@pytest.mark.parametrize("segments", [1, 4])
def test_perfect_student_has_zero_loss_and_maps_to_the_segment_start(teacher_dir, segments):
    """Data = one image x*: the exact denoiser predicts x* everywhere and DDIM steps are exact, so a student that is
    the teacher's ODE is perfectly consistent (loss ~ 0), and G(x_t) is the trajectory point at the segment start."""
    method = _method(teacher_dir, f"method_args.segments=[{segments}]", "method_args.loss=l2")
    x_star = digits_batch(1)["image"]

    def exact(self_den):
        def x0_eps(x_t, t, cond, guidance_scale=None, uncond=None):
            t = torch.as_tensor(t).expand(x_t.shape[0])
            a, s = self_den.alpha_sigma(t, like=x_t)
            return x_star.expand_as(x_t), (x_t - a * x_star) / s
        return x0_eps

    for den in (method.student, method.target, method.teacher):
        den.x0_eps = exact(den)
    batch = {"image": x_star.expand(64, -1, -1, -1), "label": torch.full((64,), 3)}
    loss, logs = method_loss(method, "student", batch, 0)
    # Not exactly 0: LCM's last boundary is the discrete t = 0, where the trajectory still carries noise
    # sigma_0 = sqrt(beta_0) ~ 6e-3 (only the ~1/50 samples stepping to t = 0 see it). A wrong target point is ~1e-2.
    assert loss.item() < 5e-6
    # G(x_t, t; b) = alpha_b x* + sigma_b eps: the trajectory point at the boundary (x* itself for one segment).
    eps = torch.randn(4, 1, 16, 16)
    t = torch.tensor([999, 760, 300, 40])
    x_t = method.student.add_noise(x_star.expand(4, -1, -1, -1), eps, t)
    b = segment_boundary(t, segments)
    g = method.consistency_fn(method.student, x_t, t, b, method.family.classes.cond(torch.zeros(4)))
    want = method.student.add_noise(x_star.expand(4, -1, -1, -1), eps, b)
    torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    # Boundary condition: at t = b (and at t = 0 for the last segment) G is the identity.
    for tb, bb in ((torch.tensor([499]), torch.tensor([499])), (torch.tensor([0]), torch.tensor([-1]))):
        x = torch.randn(1, 1, 16, 16)
        torch.testing.assert_close(method.consistency_fn(method.student, x, tb, bb, method.family.classes.cond(
            torch.zeros(1))), x, atol=1e-5, rtol=1e-5)
    c_skip, c_out = S.consistency_scalings(torch.tensor([0, 999]))
    assert c_skip.tolist()[0] == 1 and c_out.tolist()[0] == 0 and c_skip[1] < 1e-6


# --- export ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trip_matches_the_consistency_function(teacher_dir, tmp_path, variant):
    method = _method(teacher_dir, *VARIANTS[variant], "train.max_steps=6")
    with torch.no_grad():  # a student that differs from the teacher
        for p in method.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    export(method, tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    labels = torch.tensor([0, 4, 9])
    cond = method.family.classes.cond(labels)
    steps = 2 if variant == "multiphase" else 1  # the final segment count of [4, 2] from step 3 of 6
    gens, x = _noise(3, 100)
    out = pipe(labels, num_inference_steps=steps, generator=gens, output_type="pt").images
    with torch.no_grad():  # the student's own S-step deterministic chain through the segment starts
        edges = segment_edges(steps)
        for t, b in zip(edges, edges[1:]):
            x = method.consistency_fn(method.student, x, torch.full((3,), t), torch.full((3,), b), cond)
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    if variant == "lora":
        # The LoRA file on the teacher pipeline reproduces the fused export and changes the teacher's output.
        teacher = load_pipeline(teacher_dir)
        teacher.scheduler = pipe.scheduler
        before = teacher(labels, num_inference_steps=1, generator=_noise(3, 100)[0], output_type="pt").images
        teacher.load_lora_weights(str(tmp_path / "p"))
        after = teacher(labels, num_inference_steps=1, generator=_noise(3, 100)[0], output_type="pt").images
        torch.testing.assert_close(after, out, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(before, after, atol=1e-3)
        assert type(teacher.unet).__name__ == "UNet2DModel" and not any("lora" in k for k in teacher.unet.state_dict())


def test_recorded_sample_timesteps_are_used_for_their_step_count(teacher_dir, tmp_path):
    from stepdistill.eval.generation import generate, swap_scheduler

    method = _method(teacher_dir, "method_args.sample_timesteps=[[999,699,399,119],[999,299]]")
    export(method, tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    assert pipe.scheduler.config.sample_timesteps == [[999, 699, 399, 119], [999, 299]]
    assert "timesteps=[999, 699, 399, 119]" in (tmp_path / "p" / "README.md").read_text()
    recorded = generate(pipe, 4, steps=4, progress=False)
    explicit = generate(pipe, 4, steps=4, timesteps=[999, 699, 399, 119], progress=False)
    rule = generate(pipe, 4, steps=4, timesteps=[999, 759, 499, 259], progress=False)  # LCMScheduler's own 4 steps
    assert recorded["timesteps"] == [999, 699, 399, 119]
    np.testing.assert_array_equal(recorded["images"], explicit["images"])
    assert np.abs(recorded["images"].astype(int) - rule["images"].astype(int)).mean() > 0.5
    assert generate(pipe, 2, steps=2, progress=False)["timesteps"] == [999, 299]
    assert generate(pipe, 2, steps=3, progress=False)["timesteps"] is None  # no schedule recorded: the rule
    # A scheduler the user swaps in samples by its own rule, not by the recorded schedules.
    swapped = swap_scheduler(load_pipeline(str(tmp_path / "p")), "EulerDiscreteScheduler")
    assert "sample_timesteps" not in swapped.scheduler.config
    assert generate(swapped, 2, steps=4, progress=False)["timesteps"] is None
    # A recommended 1-step schedule wins over the trained [999]; multi-segment students record none.
    method = _method(teacher_dir, "method_args.sample_timesteps=[[899]]")
    export(method, tmp_path / "one")
    assert generate(load_pipeline(str(tmp_path / "one")), 2, steps=1, progress=False)["timesteps"] == [899]
    method = _method(teacher_dir, "method_args.segments=[4]", "method_args.sample_timesteps=[[999,499]]")
    assert method.export_scheduler().config.sample_timesteps == []


# --- SD-type text teacher -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> str:
    from PIL import Image

    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder)


def _sd_overrides(sd_dir, captioned, *extra):
    return run_overrides(sd_dir, "train.max_steps=2", "data.batch_size=2", f"data.source={captioned}",
                      "data.resolution=16", *extra)


def test_sd_type_full_and_lora_export_load_in_plain_diffusers(sd_dir, captioned, tmp_path):
    full = train(load_config(CONFIG, _sd_overrides(sd_dir, captioned, "method_args.guidance_min=2.0",
                                                   "method_args.guidance_max=6.0", "method_args.w_embedding_dim=32")),
                 tmp_path / "full")
    lora = train(load_config(CONFIG, _sd_overrides(sd_dir, captioned, "method_args.lora_rank=2", "train.ema_decay=0",
                                                   "method_args.lora_alpha=4", "method_args.guidance_min=1.5",
                                                   "method_args.guidance_max=3.0")), tmp_path / "lora")
    assert (lora / "pipeline" / "pytorch_lora_weights.safetensors").is_file()
    assert not (lora / "pipeline" / "model_index.json").exists()  # the LoRA alone, not a copy of the teacher
    script = textwrap.dedent(f"""
        import sys, numpy, torch
        from diffusers import LCMScheduler, StableDiffusionPipeline
        assert not any(m.startswith("stepdistill") for m in sys.modules)
        kw = dict(num_inference_steps=4, output_type="np")
        full = StableDiffusionPipeline.from_pretrained({str(full / 'pipeline')!r})
        assert full.unet.config.time_cond_proj_dim == 32 and isinstance(full.scheduler, LCMScheduler)
        a = full(["a picture 1"], guidance_scale=4.0, generator=torch.Generator().manual_seed(0), **kw).images
        teacher = StableDiffusionPipeline.from_pretrained({sd_dir!r})
        teacher.scheduler = LCMScheduler.from_pretrained({str(lora / 'pipeline')!r}, subfolder="scheduler")
        b = teacher(["a picture 1"], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw).images
        teacher.load_lora_weights({str(lora / 'pipeline')!r})
        c = teacher(["a picture 1"], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw).images
        assert a.shape == b.shape == c.shape == (1, 16, 16, 3) and numpy.isfinite(a).all()
        assert numpy.abs(b - c).max() > 0, "the LoRA did not change the teacher"
        print("ok")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_sd_full_student_pipeline_equals_consistency_fn_with_w_embedding(sd_dir, captioned, tmp_path):
    """The exported SD pipeline's 1-step latents = G(z, 999) of the student conditioned on the embedding of w - 1."""
    from diffusers import StableDiffusionPipeline

    method = build_method(load_config(CONFIG, _sd_overrides(
        sd_dir, captioned, "method_args.guidance_min=2.0", "method_args.guidance_max=6.0",
        "method_args.w_embedding_dim=32")))
    # The w projection starts at zero (student = teacher); give it weights so that w matters.
    with torch.no_grad():
        method.student.model.time_embedding.cond_proj.weight.normal_(0, 0.5)
    export(method, tmp_path / "p")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "p"))
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    outs = []
    for w in (2.5, 5.0):
        got = pipe(["a picture 1"], num_inference_steps=1, guidance_scale=w, latents=z.clone(),
                   output_type="latent").images
        cond = method.family.prompt_cond(["a picture 1"])[0].with_timestep_cond(
            method.family.guidance_embedding(torch.tensor([w]), 32))
        with torch.no_grad():
            want = method.consistency_fn(method.student, z, torch.tensor([999]), torch.tensor([-1]), cond)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


def _assert_one_step_is_the_students(pipe, method) -> None:
    """The pipeline's 1-step latent for a fixed noise is the student's G(z, 999) for the same prompt."""
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    got = pipe(["a picture 2"], num_inference_steps=1, guidance_scale=1.0, latents=z.clone(),
               output_type="latent").images
    with torch.no_grad():
        want = method.consistency_fn(method.student, z, torch.tensor([999]), torch.tensor([-1]),
                                     method.family.prompt_cond(["a picture 2"])[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sd_lora_file_reproduces_the_student(sd_dir, captioned, tmp_path):
    """Teacher pipeline + load_lora_weights(export) gives the student's 1-step G(z, 999), alpha != rank included."""
    from diffusers import LCMScheduler

    method = build_method(load_config(CONFIG, _sd_overrides(
        sd_dir, captioned, "method_args.lora_rank=2", "method_args.lora_alpha=6")))
    randomize_lora(method.student.model, 0.2)
    export(method, tmp_path / "p")
    pipe = family_of(load_pipeline(sd_dir)).load_lora(tmp_path / "p")
    pipe.scheduler = LCMScheduler.from_pretrained(str(tmp_path / "p"), subfolder="scheduler")
    _assert_one_step_is_the_students(pipe, method)


def test_sd_lora_export_records_its_base_and_samples_without_it(sd_dir, captioned, tmp_path, capsys):
    """The LoRA export records its base (absolute path + weight fingerprint) in the file and the model card;
    load_pipeline / `stepdistill sample` find that base by themselves; another base of the same shapes warns."""
    import shutil
    import warnings

    from safetensors import safe_open

    from stepdistill.cli import main
    from stepdistill.pipelines.lora import BaseMismatchWarning, base_fingerprint, lora_base

    cfg = load_config(CONFIG, _sd_overrides(sd_dir, captioned, "method_args.lora_rank=2"))
    method = build_method(cfg)
    randomize_lora(method.student.model, 0.2)
    folder = tmp_path / "lora"
    export(method, folder)
    base_unet = load_pipeline(sd_dir).unet
    info = lora_base(folder)
    assert info == {"base": str(Path(sd_dir).resolve()), "fingerprint": base_fingerprint(base_unet),
                    "pipeline": "StableDiffusionPipeline"}
    assert info["fingerprint"] in (folder / "README.md").read_text()
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert "stepdistill_base" in f.metadata() and len(f.metadata()) > 1  # diffusers' own metadata kept too
    # Found by itself: the student's 1-step output, with the export's scheduler.
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        pipe = load_pipeline(str(folder))
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    _assert_one_step_is_the_students(pipe, method)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a picture 1\na picture 2\n")
    assert main(["sample", str(folder), "--steps", "1", "--num-samples", "2", "--prompts", str(prompts),
                 "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.npz").is_file()
    # Another base of the same shapes (one weight changed): loads, with a warning naming the recorded base.
    other = tmp_path / "other"
    shutil.copytree(sd_dir, other)
    pipe = load_pipeline(str(other))
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(0.5)
    pipe.save_pretrained(str(other))
    with pytest.warns(BaseMismatchWarning, match="was trained on"):
        load_pipeline(str(folder), base=str(other))
    # --base is for LoRA exports only; a LoRA without a recorded base needs it.
    capsys.readouterr()
    assert main(["sample", sd_dir, "--base", sd_dir, "--steps", "1", "--num-samples", "1", "--prompts",
                 str(prompts), "--out", str(tmp_path / "s2")]) == 2
    assert "--base applies to LoRA exports" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()


# --- distributed ----------------------------------------------------------------------------------------------------
def test_two_process_run(teacher_dir, tmp_path):
    run = tmp_path / "run"
    res = train_two_processes(CONFIG, run, run_overrides(teacher_dir, "train.max_steps=3", "data.batch_size=4"))
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["step"] for r in log_rows(run)] == [1, 2, 3]
    state = load_file(str(run / "checkpoints" / "step-3" / "model.safetensors"))
    assert int(state["target_step"]) == 2 and any(k.startswith("target.model.") for k in state)
    assert json.loads((run / "checkpoints" / "step-3" / "loop_state.json").read_text())["world_size"] == 2
    assert (run / "pipeline" / "model_index.json").is_file()


# --- bad input -----------------------------------------------------------------------------------------------------
def test_config_errors(teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="inverted"):
        _method(teacher_dir, "method_args.guidance_min=3", "method_args.guidance_max=1.5")
    with pytest.raises(ConfigError, match="lora_rank must be >= 1"):
        _method(teacher_dir, "method_args.lora_rank=-2")
    with pytest.raises(ConfigError, match="lora_rank=64 exceeds .*max 8"):
        _method(teacher_dir, "method_args.lora_rank=64")
    with pytest.raises(ConfigError, match="cannot be conditioned on the guidance scale"):
        _method(teacher_dir, "method_args.guidance_min=1.5", "method_args.guidance_max=3")
    _method(teacher_dir, "method_args.guidance_min=1.5", "method_args.guidance_max=3", "method_args.lora_rank=2")
    with pytest.raises(ConfigError, match="segments: each count must divide 1000"):
        _method(teacher_dir, "method_args.segments=[3]")
    with pytest.raises(ConfigError, match="segment_starts"):
        _method(teacher_dir, "method_args.segments=[4,2]", "method_args.segment_starts=[0]")
    for bad_ts in ("[[999,500]]", "[[119,999]]", "[[]]"):  # off the 20k - 1 grid, ascending, empty
        with pytest.raises(ConfigError, match="sample_timesteps: each schedule must be descending points"):
            _method(teacher_dir, f"method_args.sample_timesteps={bad_ts}")
    with pytest.raises(ConfigError, match="one schedule per step count"):
        _method(teacher_dir, "method_args.sample_timesteps=[[999,499],[999,299]]")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a 3\na 7\n")
    # A data source without images is refused by the loop before anything is written.
    with pytest.raises(ConfigError, match="needs real images for x0 samples.*data source '.*prompts.txt' has none"):
        train(load_config(CONFIG, run_overrides(teacher_dir, f"data.source={prompts}")), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # Teachers without a usable scheduler: none at all, or a flow-matching one (no DDPM noise schedule).
    bad = Path(shutil.copytree(teacher_dir, tmp_path / "bad"))
    index = json.loads((bad / "model_index.json").read_text())
    index["scheduler"] = [None, None]
    (bad / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(bad / "scheduler")
    with pytest.raises(UserError, match="scheduler"):
        _method(str(bad))
    flow = Path(shutil.copytree(teacher_dir, tmp_path / "flow"))
    (flow / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}))
    index = json.loads((flow / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (flow / "model_index.json").write_text(json.dumps(index))
    # A class-conditional flow-matching teacher is distilled (text-to-image ones are refused: tests/test_families.py).
    assert _method(str(flow)).teacher.is_flow


def _without_base_record(folder: Path) -> Path:
    """The same LoRA export as written before exports recorded their base (no ``stepdistill_base`` metadata)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from stepdistill.pipelines.lora import BASE_KEY, LORA_FILE

    old = folder.with_name(folder.name + "-old")
    shutil.copytree(folder, old)
    with safe_open(str(old / LORA_FILE), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    del meta[BASE_KEY]
    save_file(tensors, str(old / LORA_FILE), metadata=meta)
    return old


def test_ema_decay_refused_where_the_method_keeps_no_student_ema(teacher_dir, tmp_path):
    cfg = load_config(CONFIG, run_overrides(teacher_dir, "method_args.lora_rank=4", "train.ema_decay=0.99"))
    with pytest.raises(ConfigError, match="ema_decay=0.99: method 'consistency' keeps no EMA .*target_ema_decay"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_incompatible_lora_files_are_clear_errors(teacher_dir, sd_dir, tmp_path):
    digits = _method(teacher_dir, "method_args.lora_rank=4")
    export(digits, tmp_path / "digits")
    # A digits LoRA into an SD pipeline: refused by the recorded base pipeline, or (files without the record) by
    # the network the file names.
    with pytest.raises(UserError, match="trained on a ClassConditionalPipeline .*cannot be loaded into a "
                                        "StableDiffusionPipeline"):
        family_of(load_pipeline(sd_dir)).load_lora(tmp_path / "digits")
    with pytest.raises(UserError, match="class-conditional UNet2DModel.*StableDiffusionPipeline"):
        family_of(load_pipeline(sd_dir)).load_lora(_without_base_record(tmp_path / "digits"))
    # The same LoRA into a class-conditional teacher of another size: shape mismatch named.
    other = load_pipeline(save_class_teacher(tmp_path / "wide", channels=(16, 32)))
    with pytest.raises(UserError, match="has shape .* but this network needs"):
        other.load_lora_weights(str(tmp_path / "digits"))
    # An SD-format LoRA file into the class-conditional pipeline.
    sd_lora = build_method(load_config(CONFIG, run_overrides(sd_dir, "method_args.lora_rank=2")))
    export(sd_lora, tmp_path / "sd")
    with pytest.raises(UserError, match="trained on a StableDiffusionPipeline .*cannot be loaded into a "
                                        "ClassConditionalPipeline"):
        load_pipeline(teacher_dir).load_lora_weights(str(tmp_path / "sd"))
    with pytest.raises(UserError, match="not a class-conditional stepdistill LoRA"):
        load_pipeline(teacher_dir).load_lora_weights(str(_without_base_record(tmp_path / "sd")))
    with pytest.raises(UserError, match="no LoRA weights"):
        family_of(load_pipeline(teacher_dir)).load_lora(tmp_path / "nothing")


def test_lcm_of_the_flow_teacher_exports_its_one_step_sampler(tmp_path):
    """Consistency distillation of the shipped flow-matching digits16 teacher: the loss runs, and the export (an
    unshifted stochastic FlowMatchEulerDiscreteScheduler) samples G(z, 999) in one step (its boundary scaling
    c_skip(999) ~ 2.5e-9 is the only difference)."""
    cfg = load_config("digits16_lcm", ["teacher=digits16-flow", "data.batch_size=8", "train.max_steps=2"])
    method = build_method(cfg)
    assert method.teacher.is_flow
    loss, _ = method_loss(method, "student", {"image": torch.rand(4, 1, 16, 16) * 2 - 1,
                                              "label": torch.tensor([0, 1, 2, 3])}, 0)
    assert torch.isfinite(loss)
    export(method, tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.stochastic_sampling
    labels = torch.tensor([0, 4, 9])
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    out = pipe(labels, timesteps=[999], generator=gens, output_type="pt").images
    z = torch.cat([torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(100 + i)) for i in range(3)])
    with torch.no_grad():
        cond = method._student_cond(method.family.classes.cond(labels), torch.full((3,), 2.0))
        want = method.consistency_fn(method.student, z, torch.full((3,), 999), torch.full((3,), -1), cond)
    torch.testing.assert_close(out, want.clamp(-1, 1), atol=1e-5, rtol=1e-5)
