"""sCM and rCM: the TrigFlow view of every family's teacher, the JVP (exact and finite difference), the tangent,
training, exact resume, exports loaded by stock diffusers, config refusals."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from _stock import run_without_stepdistill
from _tiny import export as save_export
from _tiny import log_rows, randomize_lora, run_overrides, save_captioned, save_class_teacher
from _tiny_sd import build_tiny_flux, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl
from safetensors.torch import load_file

from stepdistill.errors import ConfigError
from stepdistill.loop import build_method, train
from stepdistill.pipelines import load_pipeline, recorded_schedule
from stepdistill.pipelines.families import family_of
from stepdistill.trainers import load_config
from stepdistill.trainers.scm import forward_mode_ad, sample_schedules, tangent, time_derivative
from stepdistill.trigflow import TrigFlow

BUILDERS = {
    "class_v": lambda p: save_class_teacher(p, attention=True),
    "class_flow": lambda p: save_class_teacher(p, attention=True, flow=True),
    "sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux,
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("teachers")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _family(path: str):
    return family_of(load_pipeline(path), path, resolution=16)


def _cond(family, n: int):
    if family.classes is not None:
        return family.classes.cond(torch.arange(n) % 10), family.classes.uncond(n)
    cond, uncond = family.prompt_cond(["a red 1"] * n)
    return cond, uncond


# --- TrigFlow -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_trigflow_teacher_x0_equals_the_teachers_own_at_matched_noise_levels(name, teachers):
    """At each teacher timestep's TrigFlow time, the converted teacher's denoiser cos(t) x - sin(t) sigma_d F equals
    the teacher's own x0 prediction at that timestep (1e-5), x_trig maps to the teacher's noisy point of the same
    (x0, noise), and the timestep map inverts the time map."""
    fam = _family(teachers[name])
    den = fam.denoiser(fam.network)
    tf = TrigFlow(den, 0.5)
    torch.manual_seed(0)
    shape = fam.noise_shape(2)
    x0 = 0.5 * torch.randn(shape, dtype=torch.float64)
    eps = torch.randn(shape, dtype=torch.float64)
    cond, _ = _cond(fam, 2)
    for tau in ([1, 10, 250, 500, 999, 1000] if den.is_flow else [0, 10, 250, 500, 999]):
        ts = torch.full((2,), tau)
        t = tf.time(ts)
        assert torch.allclose(tf.timestep(t), ts.double(), atol=1e-6, rtol=0)
        x_trig = tf.noise(x0, 0.5 * eps, t)
        xm = tf.to_model(x_trig, t)
        a, s = den.alpha_sigma(ts.double() if den.is_flow else ts, like=x0)
        torch.testing.assert_close(xm, a.double() * x0 + s.double() * eps, atol=2e-6, rtol=0)
        with torch.no_grad():
            got = tf.denoise(x_trig, t, tf.velocity(x_trig, t, cond))
            ref = den(xm, ts, cond, "x0")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{name} t={tau}")


def test_trigflow_velocity_in_the_references_closed_forms(teachers):
    """Independent forms: at sigma_d = 1 a v-prediction teacher's v is TrigFlow's F, and a flow teacher's F is
    SANA-Sprint's [(1 - 2s) x + (1 - 2s + 2s^2) u] / sqrt(s^2 + (1 - s)^2) at its own point x (arXiv 2503.09641)."""
    torch.manual_seed(1)
    for name in ("class_v", "class_flow"):
        fam = _family(teachers[name])
        den = fam.denoiser(fam.network)
        tf = TrigFlow(den, 1.0)
        cond, _ = _cond(fam, 3)
        taus = torch.tensor([30, 400, 900])
        t = tf.time(taus)
        x = torch.randn(fam.noise_shape(3), dtype=torch.float64)
        with torch.no_grad():
            F = tf.velocity(x, t, cond)
            if name == "class_v":  # x is the teacher's own point (alpha = cos t at sigma_d = 1)
                torch.testing.assert_close(F, den.raw(x, taus, cond), atol=1e-5, rtol=1e-5)
            else:
                s = (taus.double() / 1000).view(-1, 1, 1, 1)
                norm = torch.sqrt(s**2 + (1 - s) ** 2)
                xm = x * norm  # the flow point: x_trig / (cos t + sin t)
                u = den.raw(xm, taus, cond)
                sana = ((1 - 2 * s) * xm + (1 - 2 * s + 2 * s**2) * u) / norm
                torch.testing.assert_close(F, sana, atol=1e-5, rtol=1e-5)


# --- the time derivative and the tangent ----------------------------------------------------------------------------
def _student(fam, seed: int = 0):
    """A student: the teacher network with its weights perturbed (so it is not the teacher)."""
    net = copy.deepcopy(fam.network)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return fam.denoiser(net)


@pytest.mark.parametrize("name", ["class_v", "sd", "sdxl", "sd3", "flux"])
def test_exact_and_finite_difference_jvp_agree(name, teachers):
    """cos t sin t dF/dt along the teacher's ODE, by forward-mode AD through the student (attention in the math kernel)
    and by a central finite difference (the default relative step 1e-4), agree within 2% (relative L2) on every
    family's tiny network."""
    fam = _family(teachers[name])
    teacher = TrigFlow(fam.denoiser(fam.network), 0.5)
    student = TrigFlow(_student(fam), 0.5)
    torch.manual_seed(2)
    cond, uncond = _cond(fam, 3)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    x = teacher.noise(0.5 * torch.randn(fam.noise_shape(3)), 0.5 * torch.randn(fam.noise_shape(3)), t)
    with torch.no_grad():
        dxdt = 0.5 * teacher.velocity(x, t, cond, 2.0, uncond)
    fn = lambda xx, tt: student.velocity(xx, tt, cond)  # noqa: E731
    exact = time_derivative(fn, x, t, dxdt, "exact")
    fd = time_derivative(fn, x, t, dxdt, "finite_difference", 1e-4)
    assert exact.abs().max() > 1e-3  # not trivially zero
    rel = (exact - fd).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
    assert rel.max() < 0.02, rel


def test_finite_difference_between_given_neighbours_is_the_derivative_along_the_ode():
    """With neighbours (not symmetric about t), the difference is still cos t sin t dF/dt along the ODE, to first
    order: on F(x, t) = x^2 sin(t), dF/dt = 2 x dxdt sin t + x^2 cos t."""
    torch.manual_seed(0)
    x, dxdt = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0.3, 0.8, 1.2], dtype=torch.float64)
    below, above = t - 1e-4, t + 3e-4
    got = time_derivative(lambda xx, tt: (xx**2 * torch.sin(tt)[:, None]).float(), x, t, dxdt, "finite_difference",
                          neighbours=(below, above))
    ts = t[:, None]
    want = torch.cos(ts) * torch.sin(ts) * (2 * x * dxdt * torch.sin(ts) + x**2 * torch.cos(ts))
    torch.testing.assert_close(got, want.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", ["class_v", "class_flow"])
def test_fd_timesteps_asks_the_networks_at_integer_timesteps_only(name, teachers, monkeypatch):
    """fd_timesteps: the student and the teacher are called at integer timesteps only, the difference at +-m."""
    method = build_method(load_config("digits16_scm", run_overrides(
        teachers[name], "method_args.jvp=finite_difference", "method_args.fd_timesteps=3")))
    seen = []
    for tf in (method.scm.nets(method.teacher).student, method.scm.nets(method.teacher).teacher):
        real = tf.net.raw

        def spy(x, t, *a, _real=real, **k):
            seen.append(torch.as_tensor(t, dtype=torch.float64).flatten())
            return _real(x, t, *a, **k)
        monkeypatch.setattr(tf.net, "raw", spy)
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    raw = {"image": images, "label": torch.arange(6)}
    phase = method.phases()[0]
    method.loss("student", method.family.batch(raw, cond=phase.cond, real=phase.real, device=method.device), 50)
    teacher, student, above, below = seen  # in the loss's order
    for ts in seen:
        torch.testing.assert_close(ts, ts.round(), rtol=0, atol=1e-3)  # float32 timesteps of integers
    assert torch.equal(teacher, student)
    assert torch.equal(above.round() - student.round(), torch.full_like(student, 3.0))
    assert torch.equal(student.round() - below.round(), torch.full_like(student, 3.0))


def test_tangent_is_cos_t_times_the_consistency_functions_derivative(teachers):
    """sCM's tangent (r = 1), built from F^-, the teacher's dx/dt and the JVP of F, equals cos(t) d/dt of the student's
    consistency function along the teacher's ODE, where the consistency function is the student's x0 = x - s u at
    the flow point (not through TrigFlow's F) and its derivative one forward-mode JVP of that (float64 but for the
    network's float32 timestep embedding)."""
    fam = _family(teachers["class_flow"])
    teacher_den = fam.denoiser(copy.deepcopy(fam.network).double())
    student_den = fam.denoiser(_student(fam).model.double())
    teacher, student = TrigFlow(teacher_den, 0.5), TrigFlow(student_den, 0.5)
    torch.manual_seed(3)
    cond, uncond = _cond(fam, 3)
    t = torch.tensor([0.2, 0.8, 1.3], dtype=torch.float64)
    x = teacher.noise(0.5 * torch.randn(fam.noise_shape(3), dtype=torch.float64),
                      0.5 * torch.randn(fam.noise_shape(3), dtype=torch.float64), t)
    with torch.no_grad():
        dxdt = 0.5 * teacher.velocity(x, t, cond, 2.0, uncond)
        F_minus = student.velocity(x, t, cond)
        dF = time_derivative(lambda xx, tt: student.velocity(xx, tt, cond), x, t, dxdt, "exact")
        g = tangent(F_minus, dxdt, dF, x, t, 0.5, r=1.0)

        def f(xx, tt):  # the student's x0 = x - s u at the flow point x of (xx, tt), s = timestep / 1000
            tau, xm = student.timestep(tt), student.to_model(xx, tt)
            return xm - (tau / 1000).view(-1, 1, 1, 1) * student_den.raw(xm, tau, cond)

        with forward_mode_ad():
            _, dfdt = torch.func.jvp(f, (x, t), (dxdt, torch.ones_like(t)))
    torch.testing.assert_close(g, torch.cos(t).view(-1, 1, 1, 1) * dfdt, atol=1e-6, rtol=1e-4)


# --- training, resume, export ----------------------------------------------------------------------------------------
def _cfg(recipe: str, teacher: str, *extra: str):
    return load_config(recipe, run_overrides(teacher, "train.max_steps=4", "train.checkpoint_every=2",
                                             "method_args.tangent_warmup=3", *extra))


@pytest.mark.parametrize("recipe", ["digits16_scm", "digits16_rcm"])
def test_resume_equals_uninterrupted_run(recipe, teachers, tmp_path, capsys):
    extra = ["method_args.fake_updates_per_student=2"] if recipe == "digits16_rcm" else []
    ref = train(_cfg(recipe, teachers["class_v"], *extra), tmp_path / "ref")
    rows = log_rows(ref)
    assert all(math.isfinite(r["student/loss"]) for r in rows if "student/loss" in r)
    assert "student/tangent_norm" in rows[0] and "student/scm_mse" in rows[0]
    if recipe == "digits16_rcm":
        assert "student/dm_loss" in rows[0] and "fake_score/denoise_loss" in rows[1]
    res = tmp_path / "res"
    shutil.copytree(ref, res)
    shutil.rmtree(res / "checkpoints" / "step-4")
    shutil.rmtree(res / "pipeline")
    (res / "checkpoints" / "latest").write_text("step-2\n")
    capsys.readouterr()
    train(_cfg(recipe, teachers["class_v"], *extra), res)
    assert "resuming from" in capsys.readouterr().err
    wa = load_file(str(ref / "checkpoints" / "step-4" / "model.safetensors"))
    wb = load_file(str(res / "checkpoints" / "step-4" / "model.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("scm.logvar.") for k in wa)
    assert any(k.startswith("fake_score.") for k in wa) == (recipe == "digits16_rcm")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if "/" in k} for r in rs]  # noqa: E731
    assert strip(log_rows(ref)) == strip(log_rows(res))


def test_class_export_samples_with_the_recorded_multistep_schedules(teachers, tmp_path):
    """The export records every sample_times schedule as teacher timesteps; its pipeline's 1-step output is the
    student's x0 at the top timestep, and sample/eval/bench pick the recorded schedule by step count."""
    cfg = _cfg("digits16_scm", teachers["class_v"], "train.max_steps=2", "train.checkpoint_every=0")
    run = train(cfg, tmp_path / "run")
    sched = json.loads((run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    method = build_method(cfg)
    want = sample_schedules(cfg.method_args, TrigFlow(method.teacher, 0.5))
    assert sched["sample_timesteps"] == want and [len(s) for s in want] == [1, 2, 4] and want[0] == [999]
    assert sched["student_timesteps"] == want[1] and sched["original_inference_steps"] in (50, 1000)
    pipe = load_pipeline(str(run / "pipeline"))
    assert recorded_schedule(pipe, 4) == {"timesteps": want[2]}
    net = type(method.scm.student.model).from_pretrained(run / "pipeline", subfolder="unet")
    method.scm.student.model.load_state_dict(net.state_dict())
    labels = torch.tensor([3, 7])
    z = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    out = pipe(labels, timesteps=[999], guidance_scale=1.0, latents=z, output_type="pt").images
    with torch.no_grad():
        x0 = method.scm.student(z, torch.full((2,), 999), method.family.classes.cond(labels), "x0")
    torch.testing.assert_close(out, x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)


STOCK = """
import json, torch
import diffusers

args = json.loads(sys.argv[1])
pipe = getattr(diffusers, args["cls"]).from_pretrained(args["path"], **{k: None for k in args.get("absent", [])})
if args.get("lora"):
    pipe.load_lora_weights(args["lora"])
    sched = json.load(open(args["lora"] + "/scheduler/scheduler_config.json"))["_class_name"]
    pipe.scheduler = getattr(diffusers, sched).from_pretrained(args["lora"], subfolder="scheduler")
pipe.set_progress_bar_config(disable=True)
z = torch.load(args["noise"])
b, c, h, w = z.shape
if args.get("packed"):
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
out = pipe(["a red 1"], guidance_scale=args["guidance"], latents=z, height=16, width=16, output_type="latent",
           **args["when"]).images
if args.get("packed"):
    out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
torch.save(out, args["out"])
"""

STOCK_CLASS = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
               "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.mark.parametrize("name,recipe,lora", [("sd", "digits16_scm", False), ("sdxl", "digits16_scm", True),
                                              ("sd3", "digits16_rcm", False), ("flux", "digits16_scm", True)])
def test_exports_load_in_the_stock_pipelines(name, recipe, lora, teachers, tmp_path):
    """A short sCM / rCM run of each text family (full student, or a LoRA student loaded onto the stock base); the
    stock pipeline in a process without stepdistill, at the recorded 1-step schedule, gives the student's x0 for the
    same noise (1e-4)."""
    (tmp_path / "data").mkdir()
    captioned = save_captioned(tmp_path / "data", 4)
    extra = ["train.ema_decay=0"] + (["method_args.lora_rank=2", "method_args.lora_alpha=4"] if lora else [])
    if recipe == "digits16_rcm":
        extra.append("method_args.fake_score_lora_rank=2")
    cfg = load_config(recipe, run_overrides(teachers[name], "train.max_steps=2", "data.batch_size=2",
                                            f"data.source={captioned}", *extra))
    run = train(cfg, tmp_path / "run")
    export = run / "pipeline"
    assert "sCM" in (export / "README.md").read_text() or "rCM" in (export / "README.md").read_text()
    method = build_method(cfg)
    if lora:  # random adapters tell a wrong load from a right one
        randomize_lora(method.scm.student.model, 0.2)
        export = tmp_path / "lora"
        save_export(method, export)
    else:
        attr = method.family.network_attr
        net = type(method.scm.student.model).from_pretrained(run / "pipeline", subfolder=attr)
        method.scm.student.model.load_state_dict(net.state_dict())
    sched = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    top = sched["sample_timesteps"][0]
    when = ({"sigmas": sched["sample_sigmas"][0]} if method.teacher.is_flow else {"timesteps": top})
    z = torch.randn(method.family.noise_shape(1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond, _ = method.family.prompt_cond(["a red 1"])
        ours = method.scm.student(z, torch.tensor(top), cond, "x0")
    torch.save(z, tmp_path / "z.pt")
    where = {"path": teachers[name], "lora": str(export)} if lora else {"path": str(export)}
    run_without_stepdistill(STOCK, dict(cls=STOCK_CLASS[name], when=when, packed=name == "flux",
                                        guidance=method.family.distilled_guidance_scale, noise=str(tmp_path / "z.pt"),
                                        out=str(tmp_path / "out.pt"),
                                        absent=["text_encoder_3", "tokenizer_3"] if name == "sd3" else [], **where))
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ours, atol=1e-4, rtol=1e-4)


# --- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,extra,match", [
    ("digits16_scm", ["method_args.jvp=forward"], "jvp must be one of exact, finite_difference"),
    ("digits16_scm", ["method_args.sample_times=[[1.1,1.2]]", "method_args.sample_steps=3"], "strictly decreasing"),
    ("digits16_scm", ["method_args.sample_steps=3"], "one of them for sample_steps=3"),
    ("digits16_scm", ["method_args.sigma_d=0"], "sigma_d"),
    ("digits16_scm", ["method_args.jvp=exact", "method_args.fd_timesteps=2"], "only with jvp: finite_difference"),
    ("digits16_scm", ["method_args.fd_timesteps=250"], "fewer than a quarter"),
    ("digits16_rcm", ["method_args.lora_rank=2", "method_args.fake_score_lora_rank=2"], "share the teacher"),
    ("digits16_rcm", ["method_args.gan_weight_critic=0.01"], "no GAN or regression term"),
    ("digits16_rcm", ["method_args.dmd_weight=0", "method_args.scm_weight=0"], "not both 0"),
])
def test_bad_method_args_are_one_line_config_errors(recipe, extra, match, teachers):
    with pytest.raises(ConfigError, match=match):
        build_method(load_config(recipe, run_overrides(teachers["class_v"], *extra)))


def test_rcm_with_a_lora_student_scores_with_the_teacher(teachers):
    """With a LoRA student on the teacher network, rCM's DMD real score and sCM's dx/dt are the teacher's (adapters
    off), and the student's prediction is not."""
    method = build_method(load_config("digits16_rcm", run_overrides(teachers["class_v"], "train.ema_decay=0",
                                                                     "method_args.lora_rank=2")))
    randomize_lora(method.scm.student.model, 0.2)
    pristine = _family(teachers["class_v"])
    ref = pristine.denoiser(pristine.network)
    torch.manual_seed(4)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([300, 800])
    cond = method.family.classes.cond(torch.tensor([1, 2]))
    uncond = method.family.classes.uncond(2)
    with torch.no_grad():
        want = ref(x, t, cond, "x0", guidance_scale=2.0, uncond=uncond)
        torch.testing.assert_close(method.context().real_score(x, t, cond, uncond, 2.0), want)
        nets = method.scm.nets(method.teacher)
        tt = nets.teacher.time(t)
        with nets.teacher_only():
            F_t = nets.teacher.velocity(nets.teacher.noise(x, x, tt), tt, cond)
        F_ref = TrigFlow(ref, 0.5).velocity(nets.teacher.noise(x, x, tt), tt, cond)
        torch.testing.assert_close(F_t, F_ref)
        assert (method.scm.student(x, t, cond, "x0") - ref(x, t, cond, "x0")).abs().max() > 1e-3
