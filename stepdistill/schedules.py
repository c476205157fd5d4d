"""Pure tensor helpers for noise schedules: alpha/sigma at t, timestep grids, solver steps, conversions.

Conventions: a DDPM-family schedule has ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t = sqrt(alphas_cumprod[t])``
and integer model timesteps ``t`` in ``[0, T)``; a flow-matching schedule has ``x_t = (1 - s) x0 + s eps`` with the
model timestep ``t = s * T`` (diffusers' FlowMatchEulerDiscreteScheduler). Every helper is stateless.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
TARGETS = ("x0", "eps", "v", "flow")


def alphas_cumprod_from_config(scheduler_config: dict) -> torch.Tensor:
    """The cumulative alpha products of a DDPM-family scheduler config, computed by diffusers itself."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    cfg = {k: scheduler_config[k] for k in keys if k in scheduler_config}
    return DDPMScheduler(**cfg).alphas_cumprod.to(torch.float64)


def ddpm_alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t of a DDPM schedule at integer timesteps t; t < 0 means the clean end (alpha 1, sigma 0)."""
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    acp = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=alphas_cumprod.dtype,
                                                                          device=alphas_cumprod.device))
    return acp.sqrt(), (1 - acp).clamp(min=0).sqrt()


def flow_alpha_sigma(t: torch.Tensor, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha, sigma of a rectified-flow schedule at model timesteps t = s * T (clamped to [0, T], so t < 0 is the clean
    end as for DDPM schedules), on t's device (float32: every accelerator has it)."""
    s = (torch.as_tensor(t).float() / num_train_timesteps).clamp(0.0, 1.0)
    return 1 - s, s


def expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (or scalar) to broadcast against a batch ``x`` (B, ...), in x's dtype/device."""
    v = torch.as_tensor(v, device=x.device).to(x.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def to_x0_eps(pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a raw model prediction of ``prediction_type`` into (x0, eps). alpha/sigma broadcast against x_t."""
    if prediction_type == "epsilon":
        eps = pred
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "sample":
        x0 = pred
        eps = (x_t - alpha * x0) / sigma
    elif prediction_type == "v_prediction":  # v = alpha eps - sigma x0, valid for alpha^2 + sigma^2 = 1
        x0 = alpha * x_t - sigma * pred
        eps = sigma * x_t + alpha * pred
    elif prediction_type == "flow_prediction":  # u = eps - x0, valid for alpha + sigma = 1
        x0 = x_t - sigma * pred
        eps = x_t + alpha * pred
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r} (expected one of {PREDICTION_TYPES})")
    return x0, eps


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                target: str) -> torch.Tensor:
    """Express (x0, eps) as ``target``: "x0", "eps", "v" (alpha eps - sigma x0) or "flow" (eps - x0)."""
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    if target == "v":
        return alpha * eps - sigma * x0
    if target == "flow":
        return eps - x0
    raise ValueError(f"unknown target {target!r} (expected one of {TARGETS})")


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in the one convention of this code base: uncond + w (cond - uncond); w = 1 is none."""
    if torch.is_tensor(scale):
        scale = expand_like(scale, cond)
    return uncond + scale * (cond - uncond)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "trailing",
                   steps_offset: int = 0) -> torch.Tensor:
    """Descending integer timesteps of a DDIM-type sampler, matching diffusers' ``timestep_spacing`` options."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    T = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = T / num_steps
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r} (linspace, leading or trailing)")
    return torch.from_numpy(ts)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Descending flow sigmas for an Euler sampler (num_steps + 1 values ending in 0), as diffusers' default."""
    T = num_train_timesteps
    s_max = shift * 1.0 / (1 + (shift - 1) * 1.0)
    s_min = shift * (1 / T) / (1 + (shift - 1) * (1 / T))
    ts = np.linspace(s_max * T, s_min * T, num_steps)
    s = torch.from_numpy(ts / T)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=s.dtype)])


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_next: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) step: re-noise the predicted x0 with the predicted eps to the next level."""
    return alpha_next * x0 + sigma_next * eps


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Euler step of the flow ODE dx/ds = velocity from noise level sigma to sigma_next."""
    return x + (sigma_next - sigma) * velocity


def consistency_scalings(t: torch.Tensor, sigma_data: float = 0.5,
                         timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary scalings (c_skip, c_out): c_skip -> 1 and c_out -> 0 as t -> 0."""
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log(alpha^2 / sigma^2)."""
    return 2 * (torch.log(alpha) - torch.log(sigma))


def karras_timestep_grid(alpha: torch.Tensor, sigma: torch.Tensor, n: int, rho: float = 7.0,
                         ratio_min: float = 0.002, ratio_max: float = 80.0) -> torch.Tensor:
    """``n`` training timesteps (non-decreasing, with repeats where the grid is finer than the timesteps) whose
    noise-to-signal ratios sigma/alpha follow Karras et al.'s rho-spaced grid: EDM's (rho 7 from 0.002 to 80),
    narrowed to the schedule's own range; each grid level maps to the timestep with the nearest log ratio, so the
    timesteps beyond ratio 80 are never returned. ``alpha``/``sigma`` are indexed by timestep. Drawing an index
    uniformly from this grid is the sampling of DMD2's pixel-space (EDM) code; on the digits16 teacher's cosine
    schedule it puts ~9% of draws below ratio 0.03 (a uniform timestep ~1%) and ~34% above ratio 10 (~5%)."""
    ratio = (sigma.double() / alpha.double().clamp_min(1e-12)).clamp_min(1e-12)
    lo, hi = max(float(ratio.min()), ratio_min), min(float(ratio.max()), ratio_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    grid = (lo ** (1 / rho) + ramp * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho
    # nearest timestep in log ratio (the ratio increases with t on every noise schedule)
    return (grid.log()[:, None] - ratio.log()[None, :]).abs().argmin(dim=1)
