r"""TrigFlow (Lu & Song 2024, arXiv 2410.11081): a training-free view of any teacher Denoiser as a TrigFlow model.

TrigFlow writes the forward process as ``x_t = cos(t) x0 + sin(t) z`` with ``z ~ N(0, sigma_d^2 I)`` and
``t in [0, pi/2]``; a network F gives the denoiser ``D(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t, t)`` and the
probability-flow ODE ``dx_t/dt = sigma_d F(x_t, t)``.

Every teacher here has ``x = alpha x0 + sigma eps`` with ``eps ~ N(0, I)``: variance preserving (DDPM-family
schedules, ``alpha^2 + sigma^2 = 1``) or rectified flow (``alpha + sigma = 1``, ``alpha = 1 - s``). A TrigFlow point
and a teacher point are the same noisy image up to scale when their noise-to-signal ratios agree,
``sigma / alpha = sigma_d tan(t)``; then ``x_model = (alpha / cos t) x_trig``. So with the teacher's (x0, eps)
prediction at its own timestep for that level, ``F = cos(t) eps - sin(t) x0 / sigma_d`` (SANA-Sprint, arXiv
2503.09641, does this for flow teachers: ``tan t = s / (1 - s)`` at ``sigma_d = 1``). And ``D = x0``: the TrigFlow
denoiser of a converted network is the network's own x0 prediction, so a student trained in TrigFlow is exported as
an ordinary network of the teacher's kind, sampled at the teacher's timesteps.

The teacher's timestep for a TrigFlow time is ``s T`` for flow teachers; for DDPM-family teachers it interpolates the
schedule's log-SNR linearly between the integer timesteps (exact at every integer; differentiable, so a JVP through a
student can take the time derivative through it).
"""

from __future__ import annotations

import math

import torch

from . import schedules as S
from .conditioning import Cond
from .denoiser import Denoiser


def _times(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a per-sample float tensor on x's device (float64 kept: near pi/2, cos t needs it)."""
    t = torch.as_tensor(t, device=x.device)
    t = t if t.dtype == torch.float64 else t.float()
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class TrigFlow:
    """A Denoiser seen as a TrigFlow model with data standard deviation ``sigma_d``.

    Args:
        denoiser: any Denoiser (DDPM-family or flow-matching schedule, any prediction type).
        sigma_d: TrigFlow's sigma_d (sCM and SANA-Sprint: 0.5).
    """

    def __init__(self, denoiser: Denoiser, sigma_d: float = 0.5):
        if not sigma_d > 0:
            raise ValueError(f"sigma_d must be > 0, got {sigma_d}")
        self.net = denoiser
        self.sigma_d = float(sigma_d)
        self.T = denoiser.num_train_timesteps
        if not denoiser.is_flow:
            acp = denoiser.alphas_cumprod.double()
            # log-SNR per integer timestep, decreasing in t (zero-terminal-SNR schedules keep a tiny last alpha).
            self._log_snr = (acp / (1 - acp).clamp_min(1e-300)).log()

    # --- levels --------------------------------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (alpha, sigma) at the noise level of TrigFlow time ``t`` (sigma / alpha = sigma_d tan t)."""
        c, s = torch.cos(t), self.sigma_d * torch.sin(t)
        norm = c + s if self.net.is_flow else torch.sqrt(c * c + s * s)
        return c / norm, s / norm

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The teacher network's (float) timestep input at TrigFlow time ``t``."""
        if self.net.is_flow:
            return self.alpha_sigma(t)[1] * self.T
        lam = -2 * torch.log(self.sigma_d * torch.tan(t))
        table = self._log_snr.to(device=t.device)
        # k with log_snr[k] >= lam > log_snr[k + 1]; the index carries no tangent, the weight does.
        k = (torch.searchsorted(-table, -lam.detach().double()) - 1).clamp(0, len(table) - 2)
        hi, lo = table[k].to(t.dtype), table[k + 1].to(t.dtype)
        return k.to(t.dtype) + (hi - lam) / (hi - lo)

    def time(self, timestep) -> torch.Tensor:
        """The TrigFlow time of a teacher timestep (integers for DDPM-family schedules, ``s T`` for flow), float64."""
        ts = torch.as_tensor(timestep, dtype=torch.float64)
        if self.net.is_flow:
            s = (ts / self.T).clamp(0, 1)
            return torch.atan2(s, (1 - s) * self.sigma_d)
        a, s = S.ddpm_alpha_sigma(self.net.alphas_cumprod.double(), ts.long())
        return torch.atan2(s.cpu(), a.cpu() * self.sigma_d)

    def time_range(self) -> tuple[float, float]:
        """The TrigFlow times the teacher can be asked about: its smallest and largest timesteps' (flow: 0, pi/2)."""
        if self.net.is_flow:
            return 0.0, math.pi / 2
        return float(self.time(0)), float(self.time(self.T - 1))

    def noise(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = cos(t) x0 + sin(t) z`` (z already scaled by sigma_d)."""
        return S.expand_like(torch.cos(t), x0) * x0 + S.expand_like(torch.sin(t), x0) * z

    def to_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A TrigFlow point in the teacher's own scaling (``alpha / cos t`` times it; finite at t = pi/2)."""
        c, s = torch.cos(t), self.sigma_d * torch.sin(t)
        scale = 1 / (c + s) if self.net.is_flow else torch.rsqrt(c * c + s * s)
        return S.expand_like(scale, x) * x

    # --- predictions ---------------------------------------------------------------------------------------------
    def x0_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale=None,
               uncond: Cond | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's (x0, eps) at TrigFlow point (x, t); CFG as :meth:`Denoiser.raw`."""
        t = _times(t, x)
        xm = self.to_model(x, t)
        raw = self.net.raw(xm, self.timestep(t), cond, guidance_scale, uncond)
        a, s = self.alpha_sigma(t)
        return S.to_x0_eps(raw, xm, S.expand_like(a, xm), S.expand_like(s, xm), self.net.prediction_type)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale=None,
                 uncond: Cond | None = None) -> torch.Tensor:
        """TrigFlow's F at (x, t): ``cos(t) eps - sin(t) x0 / sigma_d``; the ODE's dx/dt is ``sigma_d F``."""
        t = _times(t, x)
        x0, eps = self.x0_eps(x, t, cond, guidance_scale, uncond)
        return S.expand_like(torch.cos(t), x) * eps - S.expand_like(torch.sin(t), x) * x0 / self.sigma_d

    def denoise(self, x: torch.Tensor, t: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """TrigFlow's denoiser (the consistency function) from F: ``cos(t) x - sin(t) sigma_d F``."""
        return S.expand_like(torch.cos(t), x) * x - S.expand_like(torch.sin(t), x) * self.sigma_d * F
