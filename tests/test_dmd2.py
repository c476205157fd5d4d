"""DMD2: few-step smoke runs, the two time-scale schedule, GAN / LoRA variants, export round trips, resume, a
2-process run, config errors and a tiny SD-type text pipeline. Every teacher is built in code and saved to tmp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny import (
    digits_batch,
    export,
    fixed_loss_descent,
    log_rows,
    randomize_lora,
    run_overrides,
    save_class_teacher,
    train_two_processes,
    typed,
    unet_weights,
)
from _tiny import loss as phase_loss
from _tiny_sd import build_tiny_sd
from safetensors.torch import load_file

from stepdistill.errors import ConfigError, UserError
from stepdistill.loop import build_method, train
from stepdistill.pipelines import load_pipeline
from stepdistill.trainers import get_method, load_config
from stepdistill.trainers.dmd2 import guidance_at, teacher_ode
from stepdistill.trainers.score_distillation import ScoreContext, score_difference_grad

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "digits16_dmd2.yaml"
FOUR = [999, 749, 499, 249]


# Every test runs with one torch thread (the one_thread fixture of conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """A tiny class-conditional v-prediction teacher at digits16 size (10 classes + null), random weights."""
    return save_class_teacher(tmp_path_factory.mktemp("teacher") / "pipe")


def _overrides(teacher: str, *extra: str) -> list[str]:
    return run_overrides(teacher, "optim.fake_score.lr=0.001", *extra)


def _method(teacher: str, *extra: str):
    return build_method(load_config(CONFIG, _overrides(teacher, *extra)))


def _real_score(method, x_t, t, cond, uncond):
    """The real score as the student loss asks for it: the teacher with CFG where real_guidance_interval says."""
    ctx = method.context()
    return ctx.real_score(x_t, t, cond, uncond, guidance_at(method.cfg, t, ctx.teacher.num_train_timesteps))


@pytest.mark.parametrize("timesteps", [[999], FOUR])
def test_few_step_smoke_run_and_ttur_schedule(teacher_dir, tmp_path, timesteps):
    cfg = load_config(CONFIG, _overrides(teacher_dir, "train.max_steps=7",
                                         f"method_args.student_timesteps={json.dumps(timesteps)}"))
    run = train(cfg, tmp_path / "run")
    rows = log_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 8))
    # Two time-scale update rule: the student updates on loop steps 0 and 5 (logged as steps 1 and 6) only.
    assert [r["step"] for r in rows if "student/loss" in r] == [1, 6]
    assert all("fake_score/denoise_loss" in r and "fake_score/gan_d_loss" in r for r in rows)
    assert all(r["student/dm_grad_norm"] > 0 and "student/gan_g_loss" in r for r in rows if "student/loss" in r)
    # Each logged total is its parts weighted as the recipe says (gan_weight_student 3e-3, gan_weight_critic 1e-2).
    for r in rows:
        assert r["fake_score/loss"] == pytest.approx(r["fake_score/denoise_loss"] + 0.01 * r["fake_score/gan_d_loss"],
                                                     rel=1e-5)
        if "student/loss" in r:
            assert r["student/loss"] == pytest.approx(r["student/dm_loss"] + 0.003 * r["student/gan_g_loss"],
                                                      rel=1e-5)
    trained, teacher = unet_weights(run / "pipeline"), unet_weights(Path(teacher_dir))
    assert any(not torch.equal(trained[k], teacher[k]) for k in teacher)
    # The export is exactly the student of the run's final checkpoint (no EMA in this run), tensor for tensor.
    final = load_file(str(run / "checkpoints" / "step-7" / "model.safetensors"))
    student = {k[len("student.model."):]: v for k, v in final.items() if k.startswith("student.model.")}
    assert student.keys() == trained.keys()
    for k, v in student.items():
        assert torch.equal(trained[k], v), k
    sched = json.loads((run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["student_timesteps"] == timesteps
    assert "999" in (run / "pipeline" / "README.md").read_text()
    assert (run / "samples" / "step-7.png").is_file()


def test_student_ema_is_exported(teacher_dir, tmp_path):
    """train.ema_decay > 0 exports the EMA of G: same seed and steps, different exported weights, both moved."""
    method = _method(teacher_dir)
    assert method.ema_network() is method.student.model
    runs = {d: train(load_config(CONFIG, _overrides(teacher_dir, "train.max_steps=6", f"train.ema_decay={d}",
                                                    "train.checkpoint_every=5")),
                     tmp_path / f"ema{d}") for d in (0.0, 0.9)}
    raw, ema, teacher = (unet_weights(runs[0.0] / "pipeline"), unet_weights(runs[0.9] / "pipeline"),
                         unet_weights(Path(teacher_dir)))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert any(not torch.equal(ema[k], teacher[k]) for k in teacher)
    # The EMA recomputed by hand from G's weights after its two updates (loop steps 0 and 5: the student in the
    # checkpoints step-5 and step-6 of the EMA run): diffusers' EMAModel without warm-up decays by
    # min(decay, (1 + k) / (10 + k)) at its k-th step after the first (which copies), so
    # ema = 2/11 w1 + 9/11 w2. The EMA does not touch training: the raw run exports w2 itself.
    ckpts = runs[0.9] / "checkpoints"
    w1, w2 = ({k[len("student.model."):]: v for k, v in load_file(str(ckpts / s / "model.safetensors")).items()
               if k.startswith("student.model.")} for s in ("step-5", "step-6"))
    assert w1.keys() == w2.keys() == ema.keys() and any(not torch.equal(w1[k], w2[k]) for k in w1)
    for k in w2:
        torch.testing.assert_close(ema[k], 2 / 11 * w1[k] + 9 / 11 * w2[k], atol=1e-6, rtol=1e-5)
        assert torch.equal(raw[k], w2[k]), k


def test_fake_score_fits_fixed_student_samples(teacher_dir):
    method = _method(teacher_dir, "method_args.gan_weight_critic=0", "method_args.gan_weight_student=0",
                     "method_args.student_timesteps=[999,749,499,249]")
    params = method.phases()[1].params
    opt = torch.optim.Adam(params, lr=2e-3)
    before, after = fixed_loss_descent(method, "fake_score", digits_batch(), opt, 15)
    assert after < 0.7 * before
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())


def test_student_loss_moves_student_toward_the_teacher(teacher_dir, monkeypatch):
    """The DM gradient points from the fake score's prediction toward the teacher's (checked on x0_g directly)."""
    method = _method(teacher_dir, "method_args.gan_weight_critic=0", "method_args.gan_weight_student=0")
    # Make the fake score differ from the teacher, so the DM direction is non-trivial.
    with torch.no_grad():
        for p in method.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = digits_batch()
    captured = {}
    orig = ScoreContext.generate

    def gen(self, *a, **k):
        x = orig(self, *a, **k)
        if k.get("grad"):
            x.retain_grad()
            captured["x0"] = x
        return x

    monkeypatch.setattr(ScoreContext, "generate", gen)
    torch.manual_seed(1)
    loss, logs = phase_loss(method, "student", batch, 0)
    loss.backward()
    x0 = captured["x0"]
    torch.manual_seed(1)
    # Recompute the scores on the same (x_t, t) to get the expected direction: dL/dx0 = (p_real - p_fake) / norm / N.
    n = x0.shape[0]
    b = typed(method, "student", batch)
    cond, uncond = b.cond, b.uncond
    orig(method.context(), method.student, cond, n, grad=False)  # replay the RNG draws of the student sample
    c, T = method.cfg, method.teacher.num_train_timesteps
    t = torch.randint(int(c.min_t * T), min(int(c.max_t * T) + 1, T), (n,))
    x_t = method.teacher.add_noise(x0.detach(), torch.randn_like(x0), t)
    with torch.no_grad():
        real = method.teacher(x_t, t, cond, "x0", guidance_scale=c.real_guidance, uncond=uncond)  # CFG everywhere
        direction = method.fake_score(x_t, t, cond, "x0") - real
    # Per sample: the normaliser mean|p_real| only rescales each sample's gradient.
    cos = torch.nn.functional.cosine_similarity(x0.grad.flatten(1), direction.flatten(1), dim=1)
    assert (cos > 0.999).all(), cos
    assert logs["dm_grad_norm"] > 0


def test_karras_timestep_sampling_draws_from_the_grid(teacher_dir):
    """timestep_sampling=karras: both losses draw their noise levels from the Karras grid (within min_t..max_t of
    it for the DM term); uniform keeps drawing the timestep itself."""
    uniform = _method(teacher_dir)
    assert torch.equal(uniform._t_grid, torch.arange(uniform.teacher.num_train_timesteps))
    method = _method(teacher_dir, "method_args.timestep_sampling=karras", "method_args.min_t=0.0",
                     "method_args.max_t=0.3")
    grid = method._t_grid
    drawn = []
    orig = method.teacher.add_noise

    def spy(x0, eps, t):
        drawn.append(t.clone())
        return orig(x0, eps, t)

    method.teacher.add_noise = spy
    torch.manual_seed(0)
    phase_loss(method, "student", digits_batch(), 0)
    t = drawn[0]
    assert set(t.tolist()) <= set(grid[: int(0.3 * len(grid)) + 1].tolist())
    fake_t = []
    fake = method.fake()
    orig_fake = fake.add_noise
    fake.add_noise = lambda x0, eps, t: (fake_t.append(t.clone()), orig_fake(x0, eps, t))[1]
    phase_loss(method, "fake_score", digits_batch(), 0)
    assert set(fake_t[0].tolist()) <= set(grid.tolist())


def test_real_guidance_interval_limits_cfg_to_its_noise_levels(teacher_dir):
    """real_guidance_interval=[0.2, 0.6]: the real score is the teacher's CFG-2 prediction for t in [200, 600] and
    its unguided prediction elsewhere, sample by sample (references from the teacher called directly)."""
    method = _method(teacher_dir, "method_args.real_guidance=2.0", "method_args.real_guidance_interval=[0.2,0.6]")
    torch.manual_seed(0)
    t = torch.tensor([10, 199, 200, 400, 600, 601, 990])
    x_t = torch.randn(len(t), 1, 16, 16)
    labels = torch.arange(len(t)) % 10
    classes = method.family.classes
    cond, uncond = classes.cond(labels), classes.uncond(len(t))
    with torch.no_grad():
        guided = method.teacher(x_t, t, cond, "x0", guidance_scale=2.0, uncond=uncond)
        plain = method.teacher(x_t, t, cond, "x0")
    inside = torch.tensor([False, False, True, True, True, False, False])
    for i in range(len(t)):  # CFG changes every sample, so each one tells guided from unguided
        assert not torch.allclose(guided[i], plain[i])
    want = torch.where(inside.view(-1, 1, 1, 1), guided, plain)
    torch.testing.assert_close(_real_score(method, x_t, t, cond, uncond), want, atol=1e-5, rtol=1e-5)
    # All outside the interval: no CFG at all (and no unconditional pass); the default interval guides everywhere.
    T = method.teacher.num_train_timesteps
    assert guidance_at(method.cfg, torch.tensor([5, 900]), T) is None
    assert guidance_at(method.cfg, torch.tensor([300, 500]), T) == 2.0
    full = _method(teacher_dir, "method_args.real_guidance=2.0")
    torch.testing.assert_close(_real_score(full, x_t, t, cond, uncond), guided, atol=1e-5, rtol=1e-5)
    # The regression targets follow the same rule: 4 trailing DDIM steps (999, 749, 499, 249), CFG at 249-499 only.
    ode = _method(teacher_dir, "method_args.real_guidance_interval=[0.2,0.6]", "method_args.regression_steps=4")
    z = torch.randn(2, 1, 16, 16)
    c2, u2 = classes.cond(labels[:2]), classes.uncond(2)
    x = z
    for t_now, t_next in ((999, 749), (749, 499), (499, 249), (249, -1)):
        g = 2.0 if 200 <= t_now <= 600 else None
        x = ode.teacher.solver_step(x, t_now, t_next, c2, guidance_scale=g, uncond=u2)
    torch.testing.assert_close(teacher_ode(ode.cfg, ode.context(), z, c2, u2), x)


def test_gan_term_on_and_off(teacher_dir):
    on = _method(teacher_dir)
    assert on.gan_head is not None
    head_params = {id(p) for p in on.gan_head.parameters()}
    assert head_params <= {id(p) for p in on.phases()[1].params}
    loss, logs = phase_loss(on, "fake_score", digits_batch(), 0)
    loss.backward()
    assert "gan_d_loss" in logs and all(p.grad is not None for p in on.gan_head.parameters())
    assert sum(p.grad.abs().sum() for p in on.gan_head.parameters()) > 0
    on.zero_grad()
    _, logs = phase_loss(on, "student", digits_batch(), 0)
    assert "gan_g_loss" in logs

    off = _method(teacher_dir, "method_args.gan_weight_critic=0", "method_args.gan_weight_student=0")
    assert off.gan_head is None and not any("gan" in n for n, _ in off.named_parameters())
    _, logs = phase_loss(off, "fake_score", digits_batch(), 0)
    assert "gan_d_loss" not in logs
    _, logs = phase_loss(off, "student", digits_batch(), 0)
    assert "gan_g_loss" not in logs


def test_lora_fake_score(teacher_dir):
    method = _method(teacher_dir, "method_args.fake_score_lora_rank=4")
    assert method.fake_score is None
    fake_params = method.phases()[1].params
    names = {id(p): n for n, p in method.named_parameters()}
    assert all("lora_" in names[id(p)] or names[id(p)].startswith("gan_head.") for p in fake_params)
    # Memory: teacher (+ adapters) and student only, no second full copy of the network.
    unet_numel = sum(p.numel() for p in method.student.parameters())
    total = sum(p.numel() for p in method.parameters())
    assert total < 2.5 * unet_numel
    pristine = load_pipeline(teacher_dir).unet
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([10, 300, 600, 990])
    labels = torch.tensor([0, 3, 5, 10])
    cond, uncond = method.family.classes.cond(labels), method.family.classes.uncond(4)
    randomize_lora(method.teacher.model, 0.1)  # adapters now change the network's output
    with torch.no_grad():
        want = method.teacher.convert(pristine(x, t, class_labels=labels).sample, x, t, "x0")
        method.cfg.real_guidance = 1.0
        real = _real_score(method, x, t, cond, uncond)
        fake = method.fake()(x, t, cond, "x0")
    torch.testing.assert_close(real, want)
    assert not torch.allclose(fake, want, atol=1e-4)
    assert all(p.requires_grad for p in fake_params)  # adapters switched back on (and trainable) after the teacher
    loss, _ = phase_loss(method, "fake_score", digits_batch(), 0)
    loss.backward()
    assert all(p.grad is None for n, p in method.teacher.model.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake_params)


@pytest.mark.parametrize("timesteps", [[999], FOUR])
def test_export_round_trip_matches_student(teacher_dir, tmp_path, timesteps):
    method = _method(teacher_dir, f"method_args.student_timesteps={json.dumps(timesteps)}")
    with torch.no_grad():  # a student that differs from the teacher
        for p in method.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export(method, tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    labels = torch.tensor([0, 4, 9])
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    out = pipe(labels, timesteps=timesteps, generator=gens(), output_type="pt").images
    out_n = pipe(labels, num_inference_steps=len(timesteps), generator=gens(), output_type="pt").images
    # The student's own sampler (backward simulation through all listed steps) with the same per-image noise.
    g = gens()
    with torch.no_grad():
        x = torch.cat([torch.randn((1, 1, 16, 16), generator=gi) for gi in g])
        cond = method.family.classes.cond(labels)
        for i, t in enumerate(timesteps):
            x0 = method.student(x, t, cond, "x0")
            if i + 1 < len(timesteps):
                eps = torch.cat([torch.randn((1, 1, 16, 16), generator=gi) for gi in g])
                x = method.student.add_noise(x0, eps, torch.full((3,), timesteps[i + 1]))
    torch.testing.assert_close(out, x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_n, out, atol=0, rtol=0)
    # sample/eval/bench sample the student at its trained schedule by themselves
    from stepdistill.eval.generation import generate

    assert generate(pipe, 2, steps=len(timesteps), progress=False)["timesteps"] == timesteps


def test_two_process_run(teacher_dir, tmp_path):
    run = tmp_path / "run"
    res = train_two_processes(CONFIG, run, _overrides(teacher_dir, "train.max_steps=3", "data.batch_size=4",
                                                      "method_args.fake_updates_per_student=2"))
    assert res.returncode == 0, res.stderr[-4000:]
    rows = log_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and "student/loss" in rows[0] and "student/loss" not in rows[1]
    assert json.loads((run / "checkpoints" / "step-3" / "loop_state.json").read_text())["world_size"] == 2
    assert (run / "pipeline" / "model_index.json").is_file()


def test_resume_equals_uninterrupted_run(teacher_dir, tmp_path, capsys):
    extra = ["train.max_steps=8", "train.checkpoint_every=4", "method_args.fake_updates_per_student=3",
             "method_args.student_timesteps=[999,499]"]
    cfg = load_config(CONFIG, _overrides(teacher_dir, *extra))
    ref = train(cfg, tmp_path / "ref")
    # A second run folder holding only what the first had at step 4 (its half-way checkpoint), then resumed.
    res = tmp_path / "res"
    shutil.copytree(ref, res)
    shutil.rmtree(res / "checkpoints" / "step-8")
    shutil.rmtree(res / "pipeline")
    (res / "checkpoints" / "latest").write_text("step-4\n")
    capsys.readouterr()
    train(load_config(CONFIG, _overrides(teacher_dir, *extra)), res)
    assert "resuming from" in capsys.readouterr().err and (res / "checkpoints" / "step-4").is_dir()
    ca, cb = ref / "checkpoints" / "step-8", res / "checkpoints" / "step-8"
    wa, wb = load_file(str(ca / "model.safetensors")), load_file(str(cb / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert any(k.startswith("student.") for k in wa) and any(k.startswith("fake_score.") for k in wa)
    assert any(k.startswith("gan_head.") for k in wa) and not any(k.startswith("teacher.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for name in ("optimizer.bin", "optimizer_1.bin"):
        sa, sb = (torch.load(c / name, weights_only=False)["state"] for c in (ca, cb))
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (name, i, k)
    ra = [{k: v for k, v in r.items() if "/" in k and not k.startswith("lr/")} for r in log_rows(ref)]
    rb = [{k: v for k, v in r.items() if "/" in k and not k.startswith("lr/")} for r in log_rows(res)]
    assert ra == rb


def test_new_stage_with_a_larger_gan_weight(teacher_dir, tmp_path):
    """--allow-changes continues a run from its checkpoint with a new GAN weight (and refuses to drop the head)."""
    run = tmp_path / "run"
    train(load_config(CONFIG, _overrides(teacher_dir, "train.max_steps=4", "train.checkpoint_every=4")), run)
    stage = _overrides(teacher_dir, "train.max_steps=8", "method_args.gan_weight_student=0.03",
                       "method_args.fake_updates_per_student=2")
    with pytest.raises(UserError, match="fake_updates_per_student: 5 -> 2; method_args.gan_weight_student: 0.003 "
                                        "-> 0.03.*--allow-changes"):
        train(load_config(CONFIG, stage), run)
    off = _overrides(teacher_dir, "train.max_steps=8", "method_args.gan_weight_student=0",
                     "method_args.gan_weight_critic=0")
    with pytest.raises(ConfigError, match="GAN term cannot be switched off when continuing a run"):
        train(load_config(CONFIG, off), run, allow_changes=True)
    train(load_config(CONFIG, stage), run, allow_changes=True)
    rows = {r["step"]: r for r in log_rows(run)}
    assert sorted(rows) == list(range(1, 9))
    # TTUR 5 before the change (loop step 0), 2 after it (loop steps 4 and 6), logged one-based.
    assert [s for s, r in rows.items() if "student/loss" in r] == [1, 5, 7]
    for step, weight in ((1, 0.003), (5, 0.03), (7, 0.03)):  # student updates before and after the change
        r = rows[step]
        assert r["student/loss"] == pytest.approx(r["student/dm_loss"] + weight * r["student/gan_g_loss"], rel=1e-5)
    # A new TTUR ratio with a decaying student LR schedule would desynchronise the schedule: refused.
    cosine = load_config(CONFIG, _overrides(teacher_dir, "optim.student.lr_schedule=cosine",
                                            "method_args.fake_updates_per_student=2"))
    with pytest.raises(ConfigError, match=r"fake_updates_per_student can change .* only with a constant"):
        get_method("dmd2").check_stage_change({"fake_updates_per_student": 5, "gan_weight_critic": 0.01},
                                              cosine.method_args,
                                              {name: oc.lr_schedule for name, oc in cosine.optim.items()})
    changes = json.loads((run / "config_changes.jsonl").read_text())
    assert changes == {"step": 4, "changes": {"method_args.fake_updates_per_student": {"from": 5, "to": 2},
                                              "method_args.gan_weight_student": {"from": 0.003, "to": 0.03}}}


def test_student_init_copies_another_pipelines_network(teacher_dir, tmp_path):
    # A "pre-distilled student": the teacher with every weight shifted, saved as a pipeline.
    pipe = load_pipeline(teacher_dir)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.01)
    pipe.save_pretrained(str(tmp_path / "init"))
    method = _method(teacher_dir, f"method_args.student_init={tmp_path / 'init'}")
    shifted, teacher = pipe.unet.state_dict(), method.teacher.model.state_dict()
    for k, v in method.student.model.state_dict().items():
        assert torch.equal(v, shifted[k]), k
    assert not torch.equal(method.teacher.model.conv_in.weight, shifted["conv_in.weight"])
    assert torch.equal(method.fake_score.model.conv_in.weight, teacher["conv_in.weight"])  # the fake score: teacher
    # A network of another architecture is a one-line error naming the option.
    other = save_class_teacher(tmp_path / "wide", channels=(16, 32))
    with pytest.raises(ConfigError, match=r"method_args.student_init: .*does not match the teacher's architecture"):
        _method(teacher_dir, f"method_args.student_init={other}")
    with pytest.raises(ConfigError, match=r"method_args.student_init: pipeline folder .* does not exist"):
        _method(teacher_dir, f"method_args.student_init={tmp_path / 'missing'}")
    # Same tensor shapes but another computation (a config entry differs): also refused.
    pipe.unet.register_to_config(norm_eps=1e-3)
    pipe.save_pretrained(str(tmp_path / "eps"))
    with pytest.raises(ConfigError, match=r"does not match the teacher's architecture .*'norm_eps'"):
        _method(teacher_dir, f"method_args.student_init={tmp_path / 'eps'}")
    # A LoRA export (weights file, no pipeline) names what to do instead.
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"method_args.student_init: .* is a LoRA export; initialise from a full"):
        _method(teacher_dir, f"method_args.student_init={tmp_path / 'lora'}")


def test_config_errors(teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"method_args.fake_score_lora_rank=64 .*max 8"):
        _method(teacher_dir, "method_args.fake_score_lora_rank=64")
    with pytest.raises(ConfigError, match="student_timesteps.*\\[0, 999\\] for this DDPM-type teacher"):
        _method(teacher_dir, "method_args.student_timesteps=[1000,500]")
    with pytest.raises(ConfigError, match="strictly decreasing"):
        _method(teacher_dir, "method_args.student_timesteps=[499,999]")
    with pytest.raises(ConfigError, match="min_t"):
        _method(teacher_dir, "method_args.min_t=0.9", "method_args.max_t=0.5")
    for bad in ("[0.6,0.2]", "[0.5]", "[0.1,1.5]"):
        with pytest.raises(ConfigError, match=r"real_guidance_interval must be \[lo, hi\]"):
            _method(teacher_dir, f"method_args.real_guidance_interval={bad}")
    with pytest.raises(ConfigError, match="timestep_sampling must be one of uniform, karras"):
        _method(teacher_dir, "method_args.timestep_sampling=edm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a 3\na 7\n")
    # The loop refuses data without images before it writes anything.
    with pytest.raises(ConfigError, match=r"method 'dmd2' needs real images for the GAN term \(set "
                                          r"method_args.gan_weight_student=0 .*data source '.*prompts.txt' has none"):
        train(load_config(CONFIG, _overrides(teacher_dir, f"data.source={prompts}")), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # A label-only batch (no images) for the GAN's phase fails with a one-line message when it is built.
    method = _method(teacher_dir)
    with pytest.raises(ConfigError, match="needs real images"):
        phase_loss(method, "fake_score", {"label": torch.tensor([1, 2])}, 0)


# --- SD-type text teacher ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "pipe")


def test_sd_type_teacher_trains_and_exports_stock_pipeline(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 1\na blue 2\na green 3\n")
    cfg = load_config(CONFIG, _overrides(sd_dir, "train.max_steps=2", "data.batch_size=2", f"data.source={prompts}",
                                         "method_args.gan_weight_student=0", "method_args.gan_weight_critic=0",
                                         "method_args.fake_score_lora_rank=2",
                                         "method_args.student_timesteps=[999,749,499,249]"))
    run = train(cfg, tmp_path / "run")
    assert "student/dm_loss" in log_rows(run)[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(run / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    a = pipe(["a red 1"], num_inference_steps=4, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    b = pipe(["a red 1"], timesteps=FOUR, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (1, 16, 16, 3) and (a == b).all()

    # The GAN term on latents of real images (VAE-encoded): both phases' losses recomputed here, term by term, from
    # the networks called directly (the same draws replayed) and the GAN head on the features family.call returns.
    method = build_method(load_config(CONFIG, _overrides(sd_dir, "method_args.student_timesteps=[999]")))
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "prompt": ["a red 1", "a blue 2"]}
    family, teacher, fake, head = method.family, method.teacher, method.fake(), method.gan_head
    T, c = teacher.num_train_timesteps, method.cfg
    assert teacher.prediction_type == "epsilon" and c.gan_weight_student == 0.003 and c.gan_weight_critic == 0.01
    got = {}
    for phase in ("student", "fake_score"):
        torch.manual_seed(5)
        loss, logs = phase_loss(method, phase, batch, 0)
        loss.backward()
        got[phase] = (loss.item(), logs)
    method.zero_grad()

    def noised(x0, eps, t):
        a = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    with torch.no_grad():
        torch.manual_seed(5)  # the student phase's draws: G's noise, t in [min_t T, max_t T], the re-noising noise
        b = typed(method, "student", batch)
        x0_g = method.student(torch.randn(2, 4, 8, 8), torch.full((2,), 999), b.cond, "x0")
        t = torch.randint(int(c.min_t * T), min(int(c.max_t * T) + 1, T), (2,))
        x_t = noised(x0_g, torch.randn_like(x0_g), t)
        eps_c, eps_u = (family.call(teacher.model, x_t.float(), t, cond) for cond in (b.cond, b.uncond))
        a, sig = teacher.alphas_cumprod[t].view(-1, 1, 1, 1).sqrt(), (1 - teacher.alphas_cumprod[t]).view(
            -1, 1, 1, 1).sqrt()
        x0_real = (x_t - sig * (eps_u + 2.0 * (eps_c - eps_u))) / a  # CFG 2 on eps, then x0
        eps_f, feats = family.call(fake.model, x_t.float(), t, b.cond, features=True)
        x0_fake = (x_t - sig * eps_f) / a
        grad = (x0_fake - x0_real) / (x0_g - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        dm, gen = 0.5 * grad.pow(2).mean(), F.softplus(-head(feats)).mean()
        loss, logs = got["student"]
        assert logs["dm_loss"] == pytest.approx(dm.item(), rel=1e-4)
        assert logs["gan_g_loss"] == pytest.approx(gen.item(), rel=1e-5)
        assert loss == pytest.approx((dm + 0.003 * gen).item(), rel=1e-4)

        torch.manual_seed(5)  # the critic phase's draws: the VAE posterior, G's noise, t in [0, T), both noises
        b = typed(method, "fake_score", batch)
        x0_s = method.student(torch.randn(2, 4, 8, 8), torch.full((2,), 999), b.cond, "x0")
        t = torch.randint(0, T, (2,))
        eps = torch.randn_like(x0_s)
        eps_f, feats_fake = family.call(fake.model, noised(x0_s, eps, t).float(), t, b.cond, features=True)
        _, feats_real = family.call(fake.model, noised(b.real, torch.randn_like(b.real), t).float(), t, b.cond,
                                    features=True)
        denoise = F.mse_loss(eps_f, eps)
        critic = F.softplus(-head(feats_real)).mean() + F.softplus(head(feats_fake)).mean()
        loss, logs = got["fake_score"]
        assert logs["denoise_loss"] == pytest.approx(denoise.item(), rel=1e-5)
        assert logs["gan_d_loss"] == pytest.approx(critic.item(), rel=1e-5)
        assert loss == pytest.approx((denoise + 0.01 * critic).item(), rel=1e-5)


def test_regression_warmup_targets_the_teacher_ode(teacher_dir):
    """The regression targets are the teacher's DDIM + CFG solution (checked against the teacher pipeline)."""
    from diffusers import DDIMScheduler

    method = _method(teacher_dir, "method_args.regression_weight=0.5", "method_args.regression_steps=5")
    teacher = load_pipeline(teacher_dir)
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    labels = torch.tensor([1, 2])
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    want = teacher(labels, num_inference_steps=5, guidance_scale=2.0, generator=gens, output_type="pt").images
    z = torch.cat([torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(7 + i)) for i in range(2)])
    classes = method.family.classes
    got = teacher_ode(method.cfg, method.context(), z, classes.cond(labels), classes.uncond(2))
    torch.testing.assert_close(got.clamp(-1, 1), want, atol=1e-4, rtol=1e-4)
    # The regression term: MSE of G's one step from fresh noise z against the teacher's ODE from the same z (the
    # student loss draws G's sample noise, t, the re-noising noise, then z).
    torch.manual_seed(3)
    loss, logs = phase_loss(method, "student", digits_batch(), 0)
    torch.manual_seed(3)
    b = typed(method, "student", digits_batch())
    c = method.cfg
    torch.randn(8, 1, 16, 16), torch.randint(int(c.min_t * 1000), int(c.max_t * 1000) + 1, (8,))
    torch.randn(8, 1, 16, 16)
    z = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        target = teacher_ode(method.cfg, method.context(), z, b.cond, b.uncond)
        want = F.mse_loss(method.student(z, torch.full((8,), 999), b.cond, "x0"), target)
    assert logs["regression_loss"] == pytest.approx(want.item(), rel=1e-5) and want > 0
    assert loss.item() == pytest.approx(logs["dm_loss"] + 0.003 * logs["gan_g_loss"] + 0.5 * want.item(), rel=1e-5)


def test_shipped_flow_teacher_distils_and_exports_its_sampler(tmp_path):
    """DMD2 of the shipped digits16 flow-matching teacher: a short run trains, and the export (our class pipeline
    with an unshifted flow scheduler, 1 step from t = 1000) samples exactly the student's own x0 for the same noise."""
    cfg = load_config("digits16_flow_dmd2", ["train.max_steps=2", "data.batch_size=8", "train.tracker=none",
                                             "train.checkpoint_every=0", "train.sample_every=0"])
    run = train(cfg, tmp_path / "run")
    pipe = load_pipeline(str(run / "pipeline"))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.student_timesteps == [1000]
    method = build_method(cfg)
    assert method.teacher.is_flow
    method.student.model.load_state_dict(pipe.unet.state_dict())
    labels = torch.tensor([0, 4, 9])
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    out = pipe(labels, timesteps=[1000], generator=gens, output_type="pt").images
    x = torch.cat([torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(100 + i)) for i in range(3)])
    with torch.no_grad():
        x0 = method.context().generate(method.student, method.family.classes.cond(labels), 3, steps=0, noise=x)
    torch.testing.assert_close(out, x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_dm_gradient_normaliser_by_hand():
    """DMD2's gradient (x0_fake - x0_real) / mean |x0 - x0_real| per sample, computed here in float64; a sample with
    x0 = x0_real (a normaliser of 0) and one with a normaliser below 1e-6 are divided by the 1e-6 guard instead."""
    g = torch.Generator().manual_seed(0)
    x0, x0_real, x0_fake = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    x0_real[2] = x0[2]  # mean |x0 - x0_real| = 0
    x0_real[3] = x0[3] + 1e-8 * torch.sign(torch.randn(2, 3, 3, generator=g))  # mean 1e-8 (rounded)
    got = score_difference_grad(x0, x0_real, x0_fake, normalise=True)
    d = (x0.double() - x0_real.double()).abs().mean(dim=(1, 2, 3))
    assert d[0] > 0.1 and d[1] > 0.1 and d[2] == 0 and 0 < d[3] < 1e-6
    norm = torch.tensor([d[0].item(), d[1].item(), 1e-6, 1e-6], dtype=torch.float64).view(-1, 1, 1, 1)
    want = (x0_fake.double() - x0_real.double()) / norm
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # e.g. one element of the first sample, spelled out
    k = (x0[0] - x0_real[0]).abs().sum().item() / 18
    assert got[0, 1, 2, 0].item() == pytest.approx((x0_fake[0, 1, 2, 0] - x0_real[0, 1, 2, 0]).item() / k, rel=1e-5)
    # Without normalise it is the plain difference, with a per-sample weight broadcast.
    w = torch.tensor([1.0, 2.0, 0.5, 0.0])
    torch.testing.assert_close(score_difference_grad(x0, x0_real, x0_fake, weight=w).double(),
                               (x0_fake.double() - x0_real.double()) * w.double().view(-1, 1, 1, 1),
                               atol=1e-6, rtol=1e-6)
