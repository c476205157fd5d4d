"""The Denoiser: any diffusers network + its noise schedule -> predictions in whatever parameterisation a method
needs (x0, eps, v or flow velocity), with classifier-free guidance applied in one place.

The prediction type and schedule are read from the teacher's scheduler config, never hard-coded.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from . import schedules as S
from .conditioning import Cond
from .errors import UserError

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


class Denoiser(nn.Module):
    """Wraps a diffusers network and its noise schedule.

    Args:
        model: a diffusers model (``UNet2DModel``, ``UNet2DConditionModel`` or a transformer).
        scheduler: the teacher's scheduler (``pipe.scheduler``) or its config dict (with ``_class_name`` as saved
            in ``scheduler_config.json``); gives the schedule and the network's prediction type. Flow-matching
            schedulers give ``flow_prediction``.
        prediction_type: override what the network predicts (rarely needed).
        call: ``call(model, x, t, cond, features=False) -> raw output`` (or ``(raw output, features)`` with
            ``features``), the model family's way of calling the network
            (:meth:`stepdistill.pipelines.families.Family.call`).
        guidance_input: for guidance-distilled networks (Flux-dev), the guidance scale they take as an input when no
            ``guidance_scale`` is asked for; CFG is then that input, one network call, not two. None for others.

    ``t`` is always the network's own timestep input: integers in [0, T) for DDPM-family schedules, ``sigma * T``
    for flow matching.
    """

    def __init__(self, model: nn.Module, scheduler, call, prediction_type: str | None = None,
                 guidance_input: float | None = None):
        super().__init__()
        self.model = model
        self.call = call
        self.guidance_input = guidance_input
        # The dtype the network computes in (its weights'); inputs are cast to it and outputs back to the caller's,
        # so a frozen bf16 teacher and an fp32 student take the same float32 tensors (train.teacher_dtype).
        # (Weights held as buffers, like an EMA target's, count too.)
        weights = (t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
        self.compute_dtype = next(weights, torch.ones(()).float()).dtype
        if hasattr(scheduler, "config"):  # a scheduler object: its in-memory config has no _class_name
            config, cls_name = dict(scheduler.config), type(scheduler).__name__
        else:
            config = dict(scheduler)
            cls_name = config.get("_class_name", "")
        self.is_flow = cls_name in FLOW_SCHEDULERS
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        if self.is_flow:
            self.prediction_type = prediction_type or "flow_prediction"
        else:
            if "beta_schedule" not in config and "trained_betas" not in config:
                raise UserError(f"scheduler config ({cls_name or 'no _class_name'}) has no noise schedule "
                                "(beta_schedule); pass a pipeline whose scheduler is DDPM/DDIM/Euler/LCM-type "
                                "or FlowMatchEulerDiscreteScheduler")
            self.prediction_type = prediction_type or config.get("prediction_type", "epsilon")
            self.register_buffer("alphas_cumprod", S.alphas_cumprod_from_config(config), persistent=False)
        if self.prediction_type not in S.PREDICTION_TYPES:
            raise UserError(f"unsupported prediction_type '{self.prediction_type}' in the scheduler config "
                            f"(supported: {', '.join(S.PREDICTION_TYPES)})")
        self.scheduler_config = config

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t at model timesteps t, shaped to broadcast against ``like`` if given."""
        if self.is_flow:
            a, s = S.flow_alpha_sigma(t.detach(), self.num_train_timesteps)
        else:
            a, s = S.ddpm_alpha_sigma(self.alphas_cumprod, t.to(self.alphas_cumprod.device))
        if like is not None:
            a, s = S.expand_like(a, like), S.expand_like(s, like)
        return a, s

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = alpha_t x0 + sigma_t eps."""
        a, s = self.alpha_sigma(t, like=x0)
        return a * x0 + s * eps

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale=None,
            uncond: Cond | None = None, features: bool = False):
        """The network output in its own parameterisation, with CFG when ``guidance_scale`` is given.

        CFG on the raw output equals CFG on any other parameterisation: the conversions are affine in the
        prediction with coefficients that depend only on (x_t, t). With ``features`` (one pass, no CFG) the result is
        ``(output, features)``: the network's intermediate features that its family returns (GAN heads).
        """
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        dt = self.compute_dtype

        def call(x: torch.Tensor, tt: torch.Tensor, c: Cond, feats: bool = False):
            out = self.call(self.model, x.to(dt), tt, c.to(dtype=dt), features=feats)
            return (out[0].to(x_t.dtype), out[1]) if feats else out.to(x_t.dtype)

        if self.guidance_input is not None:  # guidance-distilled: the scale is an input of one pass
            w = self.guidance_input if guidance_scale is None else guidance_scale
            return call(x_t, t, replace(cond, guidance=torch.as_tensor(w, device=x_t.device).float().expand(
                x_t.shape[0]).clone()), features)
        if guidance_scale is None:
            return call(x_t, t, cond, features)
        if features:
            raise ValueError("features are returned by one unguided pass; guidance_scale would make two")
        if uncond is None:
            raise ValueError("guidance_scale given without an unconditional Cond")
        both = call(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat(uncond, cond))
        out_u, out_c = both.chunk(2)
        return S.cfg_combine(out_u, out_c, guidance_scale)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, target: str = "x0", guidance_scale=None,
                uncond: Cond | None = None, features: bool = False):
        """Prediction at (x_t, t) expressed as ``target`` ("x0", "eps", "v" or "flow"); with ``features``,
        ``(prediction, features)`` (see :meth:`raw`)."""
        raw = self.raw(x_t, t, cond, guidance_scale, uncond, features)
        if features:
            return self.convert(raw[0], x_t, t, target), raw[1]
        return self.convert(raw, x_t, t, target)

    def convert(self, raw: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, target: str) -> torch.Tensor:
        """Convert a raw network output at (x_t, t) to ``target``."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        a, s = self.alpha_sigma(t, like=x_t)
        x0, eps = S.to_x0_eps(raw, x_t, a, s, self.prediction_type)
        return S.from_x0_eps(x0, eps, a, s, target)

    def x0_eps(self, x_t, t, cond, guidance_scale=None, uncond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) predicted at (x_t, t)."""
        raw = self.raw(x_t, t, cond, guidance_scale, uncond)
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        a, s = self.alpha_sigma(t, like=x_t)
        return S.to_x0_eps(raw, x_t, a, s, self.prediction_type)

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for a clean x0 noised with eps at t (its own prediction type)."""
        a, s = self.alpha_sigma(t, like=x0)
        target = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
        return S.from_x0_eps(x0, eps, a, s, target[self.prediction_type])

    def solver_step(self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cond: Cond,
                    guidance_scale=None, uncond: Cond | None = None) -> torch.Tensor:
        """One deterministic ODE step from t to t_next (DDIM for DDPM schedules, Euler for flow; t_next < 0 or
        0 for flow means the clean end)."""
        x0, eps = self.x0_eps(x_t, t, cond, guidance_scale, uncond)
        t_next = torch.as_tensor(t_next, device=x_t.device)
        if t_next.ndim == 0:
            t_next = t_next.expand(x_t.shape[0])
        a_n, s_n = self.alpha_sigma(t_next, like=x_t)
        return S.ddim_step(x0, eps, a_n, s_n)
