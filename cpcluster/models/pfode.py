"""``pf-ode``: K steps of the probability-flow ODE from ``t_sigma`` down to 0 (the multi-step baseline).

Pixel space in, pixel space out. In model space the noisy image ``x_t = 2 (x + delta) - 1`` is integrated along
``dx/dt = (x - D(x, t)) / t`` (Karras et al. 2022, Algorithm 1 without churn) over the times
``t_i = (t_0^(1/rho) + i/(K-1) (t_min^(1/rho) - t_0^(1/rho)))^rho`` (i < K, rho = 7) followed by ``t_K = 0``;
Heun's second-order correction is applied on every step except the last (which lands on t = 0, where Euler gives
``x = D(x, t_{K-1})``), so K steps cost 2K - 1 network evaluations (K with ``solver="euler"``). With K = 1 the
purifier is one-shot denoising ``D(x_t, t_0)``.

How each network kind gives the denoiser ``D(x, t)`` (model space, t = noise standard deviation):

* ``edm`` -- the EDM preconditioning (``sigma_data = 0.5``): ``c_skip = sd^2/(t^2+sd^2)``, ``c_out = t sd /
  sqrt(t^2+sd^2)``, ``c_in = 1/sqrt(t^2+sd^2)``, ``D = c_skip x + c_out F(c_in x, c_noise(t), labels)`` with
  ``c_noise = ln(t)/4`` (``meta["c_noise"] = "edm"``, the default; ``"openai"`` = ``250 ln t``). A network that
  already applies its preconditioning (NVlabs ``EDMPrecond``: ``net(x, sigma, labels) -> D``) sets
  ``meta["preconditioned"] = True``. ``t_0`` follows ``--time-rule``: the training-grid point nearest 2 sigma
  (needs ``meta["grid_steps"]``) or 2 sigma exactly; ``t_min = 0.002``.
* ``ddpm`` -- a noise predictor read as a variance-exploding denoiser, ``D(x, t) = x0_hat(sqrt(abar_j) x, j)``
  at the timestep ``j`` with ``sqrt((1 - abar_j)/abar_j) = t``: the ODE times are restricted to the schedule's own
  noise levels (rounded in log space, duplicates dropped), ``t_0`` is the one-step rule's timestep and ``t_min``
  the schedule's smallest level. With K = 1 this equals ``onestep-ddpm`` exactly.

Consistency networks are not denoisers (they map to the trajectory's origin); use ``--purifier consistency``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cpcluster.models import ddpm as _ddpm
from cpcluster.core.choices import SOLVER_STEPS_GRID
from cpcluster.models.consistency import (C_NOISE, RHO, SIGMA_MIN, karras_grid, model_to_pixel, pixel_to_model,
                                          time_for_sigma)
from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.purifier_base import DenoiserPurifier, LabelPolicy
from cpcluster.util.errors import InputError

EDM_SIGMA_DATA = 0.5
EDM_C_NOISE = {"edm": C_NOISE["jax"], "jax": C_NOISE["jax"], "openai": C_NOISE["openai"]}
SOLVERS = ("heun", "euler")


def edm_scalings(t: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA):
    """``(c_skip, c_out, c_in)`` of the EDM preconditioning at noise level ``t`` (same shape as ``t``)."""
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t * sigma_data / torch.sqrt(t**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(t**2 + sigma_data**2)
    return c_skip, c_out, c_in


def karras_times(t_start: float, t_min: float, steps: int, rho: float = RHO) -> np.ndarray:
    """``steps`` descending times from ``t_start`` to ``t_min`` (Karras spacing) followed by 0; shape (steps + 1,)."""
    if steps == 1:
        return np.array([t_start, 0.0])
    i = np.arange(steps, dtype=np.float64)
    hi, lo = t_start ** (1 / rho), t_min ** (1 / rho)
    return np.append((hi + i / (steps - 1) * (lo - hi)) ** rho, 0.0)


class EDMDenoiser(nn.Module):
    """``D(x, t, labels)``: model-space (B, C, H, W) -> model-space denoised estimate; ``t`` a python float."""

    def __init__(self, denoiser: LoadedDenoiser):
        super().__init__()
        self.net = denoiser.module
        meta = denoiser.meta
        self.preconditioned = bool(meta.get("preconditioned"))
        self.c_noise = meta.get("c_noise") or "edm"
        if self.c_noise not in EDM_C_NOISE:
            raise InputError(f"--denoiser {denoiser.spec}: c_noise {self.c_noise!r} is unknown for an EDM network; "
                             f"use one of {', '.join(sorted(EDM_C_NOISE))}")
        self.sigma_data = float(meta.get("sigma_data", EDM_SIGMA_DATA))

    def forward(self, x: torch.Tensor, t: float, labels: torch.Tensor | None) -> torch.Tensor:
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
        if self.preconditioned:
            return self.net(x, tt.to(x.dtype), labels).to(x.dtype)
        c_skip, c_out, c_in = (float(c) for c in edm_scalings(torch.tensor(float(t), dtype=torch.float64),
                                                                 self.sigma_data))
        f = self.net(c_in * x, EDM_C_NOISE[self.c_noise](tt).to(x.dtype), labels)
        return c_skip * x + c_out * f.to(x.dtype)


class DDPMDenoiser(nn.Module):
    """``D(x, t, labels)`` of a DDPM noise predictor at one of its own noise levels ``t = sigma_j`` (model space)."""

    def __init__(self, denoiser: LoadedDenoiser):
        super().__init__()
        self.net = denoiser.module
        self.abar = _ddpm.ddpm_schedule(denoiser)
        self.sigmas = np.sqrt((1.0 - self.abar) / self.abar)  # ascending model-space noise of each timestep
        self.prediction = denoiser.meta.get("prediction", "epsilon")
        if self.prediction not in _ddpm.PREDICTIONS:
            raise InputError(f"--denoiser {denoiser.spec}: prediction type {self.prediction!r} is not supported")

    def index(self, t: float) -> int:
        """The timestep whose noise level is nearest ``t`` in log space."""
        return int(np.argmin(np.abs(np.log(self.sigmas) - math.log(t))))

    def forward(self, x: torch.Tensor, t: float, labels: torch.Tensor | None) -> torch.Tensor:
        j = self.index(t)
        abar = float(self.abar[j])
        x_t = math.sqrt(abar) * x
        steps = torch.full((x.shape[0],), j, dtype=torch.int64, device=x.device)
        return _ddpm.ddpm_x0(self.net(x_t, steps, labels).to(x.dtype), x_t, abar, self.prediction)


def grid_points_from(t_start: float, denoiser: LoadedDenoiser, time_rule: str) -> int:
    """``--solver-steps grid``: how many points of the network's N-point Karras training grid lie at or below
    ``t_start`` (itself a grid point); K Karras-spaced times from ``t_start`` to ``t_min`` are then exactly those
    points, the walk of the paper's PF-ODE code (DESIGN.md section 1)."""
    grid_size = denoiser.meta.get("grid_steps")
    if time_rule != "nearest" or not grid_size:
        raise InputError(f"--solver-steps grid walks the training grid from its point nearest 2 sigma: use --time-rule "
                         f"nearest with a network that has grid_steps (e.g. --denoiser '{denoiser.spec}?grid_steps=18')")
    return int(np.sum(karras_grid(int(grid_size)) <= t_start * (1 + 1e-12)))


class PFODEPurifier(DenoiserPurifier):
    """``pf-ode``: ``steps`` Heun (or Euler) steps of the probability-flow ODE from ``t_0`` to 0.

    ``forward(x_noisy (B, C, H, W) pixel space, generator=None) -> (B, C, H, W) pixel space [0, 1]``.
    """

    kind = "pf-ode"

    def __init__(self, denoiser: LoadedDenoiser, sigma: float, steps: int | None = None, time_rule: str = "nearest",
                 solver: str = "heun", label_policy: LabelPolicy = LabelPolicy(), **_):
        super().__init__()
        grid_walk = steps == SOLVER_STEPS_GRID  # the count is known once t_sigma is (EDM branch below)
        if not grid_walk:
            steps = 10 if steps is None else int(steps)
            if steps < 1:
                raise InputError(f"--solver-steps {steps}: the pf-ode purifier needs at least 1 step")
        if solver not in SOLVERS:
            raise InputError(f"pf-ode solver {solver!r} is unknown; use one of {', '.join(SOLVERS)}")
        self.denoiser = denoiser
        self.sigma, self.steps, self.solver, self.label_policy = float(sigma), steps, solver, label_policy
        if denoiser.kind == "edm":
            self.time_rule = time_rule
            self.D = EDMDenoiser(denoiser)
            if time_rule == "nearest" and not denoiser.meta.get("grid_steps"):
                raise InputError(f"--denoiser {denoiser.spec}: a continuous-time EDM network has no training grid "
                                 "for --time-rule nearest; use --time-rule exact (t = 2 sigma) or set grid_steps")
            t_start = time_for_sigma(sigma, denoiser.meta.get("grid_steps"), time_rule)
            if grid_walk:
                steps = grid_points_from(t_start, denoiser, time_rule)
            times = karras_times(t_start, SIGMA_MIN, steps)
        elif denoiser.kind == "ddpm":
            if grid_walk:
                raise InputError(f"--solver-steps grid: the schedule of DDPM network {denoiser.spec} has thousands "
                                 "of steps; give a number of steps")
            self.time_rule = "ddpm-first-reaching"
            self.D = DDPMDenoiser(denoiser)
            sig = self.D.sigmas
            start = _ddpm.onestep_timestep(self.D.abar, sigma)
            wanted = karras_times(float(sig[start]), float(sig[0]), steps)[:-1]
            idx = sorted({self.D.index(t) for t in wanted}, reverse=True)
            times = np.append(sig[idx], 0.0)
        else:
            raise InputError(f"--denoiser {denoiser.spec}: a {denoiser.kind} network is not a denoiser for the "
                             "probability-flow ODE; use --purifier consistency")
        self.times = [float(t) for t in times]

    def forward(self, x_noisy: torch.Tensor, generator: torch.Generator | None = None, labels=None) -> torch.Tensor:
        labels = self.labels_for(x_noisy, generator, labels)
        x = pixel_to_model(x_noisy)
        for t_cur, t_next in zip(self.times[:-1], self.times[1:]):
            d = (x - self.D(x, t_cur, labels)) / t_cur
            x_next = x + (t_next - t_cur) * d
            if self.solver == "heun" and t_next > 0:
                d_next = (x_next - self.D(x_next, t_next, labels)) / t_next
                x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)
            x = x_next
        return model_to_pixel(x)

    @property
    def nfe(self) -> int:
        """Denoiser evaluations per image: one per step, plus Heun's correction on every step not ending at 0."""
        heun = self.solver == "heun"
        return sum(1 + (heun and t_next > 0) for t_next in self.times[1:])

    def describe(self) -> dict:
        return {"kind": self.kind, "t_sigma": self.times[0], "time_rule": self.time_rule,
                "steps": len(self.times) - 1, "solver": self.solver, "times": self.times,
                "label_policy": self.label_policy.text if self.denoiser.meta.get("num_classes") else None}
