"""Schedules and the Denoiser against diffusers' own schedulers on the same inputs."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from stepdistill import schedules as S
from stepdistill.conditioning import ClassConditioning, Cond
from stepdistill.denoiser import Denoiser
from stepdistill.errors import UserError
from stepdistill.pipelines.families.class_conditional import ClassFamily


def tiny_unet(num_class_embeds=None):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds).eval()


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_and_alpha_sigma_match_diffusers(schedule):
    sched = DDPMScheduler(beta_schedule=schedule)
    acp = S.alphas_cumprod_from_config(sched.config)
    t = torch.tensor([0, 1, 500, 999])
    a, s = S.ddpm_alpha_sigma(acp, t)
    torch.testing.assert_close(a.float() ** 2, sched.alphas_cumprod[t])
    torch.testing.assert_close(a**2 + s**2, torch.ones(4, dtype=torch.float64))
    a_end, s_end = S.ddpm_alpha_sigma(acp, torch.tensor([-1]))
    assert a_end.item() == 1.0 and s_end.item() == 0.0


def test_add_noise_matches_diffusers():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    den = Denoiser(tiny_unet(), sched, ClassFamily.call)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([3, 250, 600, 999])
    torch.testing.assert_close(den.add_noise(x0, eps, t), sched.add_noise(x0, eps, t))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_ddim_timesteps_match_diffusers(spacing, steps):
    sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched.set_timesteps(steps)
    ours = S.ddim_timesteps(steps, 1000, spacing, steps_offset=sched.config.steps_offset)
    assert ours.tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_conversions_round_trip(pred):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    acp = S.alphas_cumprod_from_config(DDPMScheduler().config)
    a, s = S.ddpm_alpha_sigma(acp, torch.tensor([10, 200, 500, 800, 990]))
    a, s = a[:, None], s[:, None]
    x_t = a * x0 + s * eps
    target = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[pred]
    raw = S.from_x0_eps(x0, eps, a, s, target)
    x0_hat, eps_hat = S.to_x0_eps(raw, x_t, a, s, pred)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    # every target is expressible from every prediction type
    for tgt in S.TARGETS:
        torch.testing.assert_close(S.from_x0_eps(x0_hat, eps_hat, a, s, tgt), S.from_x0_eps(x0, eps, a, s, tgt))


def test_flow_conversion_round_trip():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    a, s = S.flow_alpha_sigma(torch.tensor([100.0, 400.0, 700.0, 1000.0]))
    a, s = a[:, None], s[:, None]
    x_t = a * x0 + s * eps
    u = S.from_x0_eps(x0, eps, a, s, "flow")
    torch.testing.assert_close(u, eps - x0)
    x0_hat, eps_hat = S.to_x0_eps(u, x_t, a, s, "flow_prediction")
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_ddim_solver_step_matches_diffusers(pred):
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=pred, clip_sample=False,
                          timestep_spacing="trailing", set_alpha_to_one=True)
    unet = tiny_unet()
    den = Denoiser(unet, sched, ClassFamily.call)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    ts = sched.timesteps.tolist() + [-1]
    ref = x.clone()
    ours = x.clone()
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            out = unet(ref, t).sample
            ref = sched.step(out, t, ref).prev_sample
            ours = den.solver_step(ours, torch.tensor(t), torch.tensor(t_next), Cond()).float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_euler_flow_step_matches_diffusers():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    ours_sigmas = S.flow_sigmas(6, shift=3.0)
    torch.testing.assert_close(ours_sigmas.float(), sched.sigmas.float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, generator=g)
    v = torch.randn(2, 4, generator=g)
    ref = sched.step(v, sched.timesteps[0], x).prev_sample
    ours = S.euler_step(x, v, sched.sigmas[0], sched.sigmas[1])
    torch.testing.assert_close(ours, ref)
    # the DDIM step in flow parameterisation is the same Euler step (the Denoiser uses one solver for both)
    a, s = 1 - sched.sigmas[0], sched.sigmas[0]
    x0, eps = S.to_x0_eps(v, x, a, s, "flow_prediction")
    torch.testing.assert_close(S.ddim_step(x0, eps, 1 - sched.sigmas[1], sched.sigmas[1]), ref)


def test_denoiser_reads_prediction_type_and_flow_from_config():
    unet, call = tiny_unet(), ClassFamily.call
    assert Denoiser(unet, DDIMScheduler(prediction_type="v_prediction"), call).prediction_type == "v_prediction"
    assert Denoiser(unet, EulerDiscreteScheduler(), call).prediction_type == "epsilon"
    flow = Denoiser(unet, FlowMatchEulerDiscreteScheduler(), call)
    assert flow.is_flow and flow.prediction_type == "flow_prediction"
    with pytest.raises(UserError, match="no noise schedule"):
        Denoiser(unet, {"_class_name": "Weird"}, call)


def test_denoiser_targets_are_consistent():
    sched = DDIMScheduler(prediction_type="v_prediction")
    den = Denoiser(tiny_unet(), sched, ClassFamily.call)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([100, 500, 900])
    with torch.no_grad():
        raw = den.raw(x, t, Cond())
        x0, eps, v = den(x, t, Cond(), "x0"), den(x, t, Cond(), "eps"), den(x, t, Cond(), "v")
    torch.testing.assert_close(v, raw)  # the network predicts v
    a, s = den.alpha_sigma(t, like=x)
    torch.testing.assert_close(a * x0 + s * eps, x, atol=1e-5, rtol=1e-5)


def test_cfg_standard_convention():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(S.cfg_combine(u, c, 1.0), c)
    assert torch.equal(S.cfg_combine(u, c, 0.0), u)
    assert torch.equal(S.cfg_combine(u, c, 3.0), torch.tensor([7.0, 14.0]))
    per_sample = S.cfg_combine(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([2.0, 4.0]))
    assert torch.equal(per_sample, torch.tensor([[2.0, 2.0], [4.0, 4.0]]))


def test_denoiser_cfg_equals_two_calls():
    sched = DDIMScheduler(prediction_type="epsilon")
    unet = tiny_unet(num_class_embeds=4)
    den = Denoiser(unet, sched, ClassFamily.call)
    classes = ClassConditioning(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    t = torch.tensor([300, 700])
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        guided = den(x, t, classes.cond(labels), "x0", guidance_scale=3.0, uncond=classes.uncond(2))
        xc = den(x, t, classes.cond(labels), "x0")
        xu = den(x, t, classes.uncond(2), "x0")
    torch.testing.assert_close(guided, xu + 3.0 * (xc - xu), atol=1e-4, rtol=1e-4)


def test_class_dropout_uses_null_class():
    classes = ClassConditioning(10)
    labels = torch.arange(10).repeat(100)
    dropped = classes.drop(labels, 0.3, generator=torch.Generator().manual_seed(0))
    frac = (dropped == 10).float().mean().item()
    assert 0.25 < frac < 0.35
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])


def test_consistency_scalings_boundary():
    c_skip, c_out = S.consistency_scalings(torch.tensor([0.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-4 and abs(c_out[1] - 1) < 1e-4


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "scaled_linear"])
def test_karras_timestep_grid_spacing(schedule):
    """Grid index k -> timestep whose ratio sigma/alpha is nearest to EDM's rho-7 level k (0.002 ... 80, clipped to
    the schedule's range): ascending, ends at the ends of that range, and many more draws at low noise than uniform."""
    ac = S.alphas_cumprod_from_config({"beta_schedule": schedule, "beta_start": 0.00085, "beta_end": 0.012,
                                       "num_train_timesteps": 1000})
    alpha, sigma = S.ddpm_alpha_sigma(ac, torch.arange(1000))
    ratio = sigma / alpha
    grid = S.karras_timestep_grid(alpha, sigma, 1000)
    assert grid.shape == (1000,) and (grid[1:] >= grid[:-1]).all()
    lo, hi = max(ratio.min().item(), 0.002), min(ratio.max().item(), 80.0)
    assert grid[0] == (ratio.log() - torch.log(torch.tensor(lo, dtype=ratio.dtype))).abs().argmin()
    assert grid[-1] == (ratio.log() - torch.log(torch.tensor(hi, dtype=ratio.dtype))).abs().argmin()
    # The middle of the grid sits at the rho-7 midpoint of the range, ((lo^(1/7) + hi^(1/7)) / 2)^7.
    mid = ((lo ** (1 / 7) + hi ** (1 / 7)) / 2) ** 7
    assert abs(ratio[grid[500]].log().item() - torch.log(torch.tensor(mid)).item()) < 0.05
    low = 0.1
    assert (ratio[grid] < low).float().mean() > 2 * (ratio < low).float().mean()
