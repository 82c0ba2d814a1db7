"""``onestep-ddpm``: one-shot denoising with a DDPM noise-prediction network (Carlini et al. 2023).

Pixel space in, pixel space out (DESIGN.md section 1). For pixel-space smoothing noise ``sigma`` the purifier picks
a timestep ``t`` (0-based index into ``alphas_cumprod``), scales the noisy model-space image by ``s``,
``x_t = s (2 (x + delta) - 1)``, and predicts ``x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)``,
clamped to [-1, 1] and mapped back to [0, 1]. Two rules (``--time-rule``):

* ``nearest`` (default): the first ``t`` with ``sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma`` and ``s =
  sqrt(abar_t)``, so that ``x_t`` lies exactly on that step's marginal;
* ``exact``: Carlini et al.'s code, which the paper's baseline runs: ``s = 1 / sqrt(1 + 4 sigma^2)`` (model-space
  noise exactly ``2 sigma``) and, for the cosine schedule, ``t = round(T (1 - 2 (1 + c) asin(sin(pi / (2 (1 + c)))
  / sqrt(1 + 4 sigma^2)) / pi))`` with c = 0.008, the continuous-time inverse of its ``abar``; for other
  schedules the ``t`` whose ``abar_t`` is nearest ``1 / (1 + 4 sigma^2)``. The two differ by at most one step
  (T = 4000: 1158 / 1984 / 2809 against 1159 / 1984 / 2810 at sigma 0.25 / 0.5 / 1).

Schedules (``betas``, float64, shape (T,)) follow the diffusers ``DDPMScheduler`` names: ``linear``
(``linspace(beta_start, beta_end, T)``), ``scaled_linear`` and ``squaredcos_cap_v2`` (the cosine schedule of
Nichol & Dhariwal 2021, ``abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)``, s = 0.008, betas capped at 0.999); ``cosine``
is an alias. A network adapter puts the betas into ``LoadedDenoiser.meta["betas"]``. The network is called with the
integer timestep; one trained on a rescaled time (improved-diffusion's ``rescale_timesteps``: ``t * 1000 / T``)
rescales it itself (architecture ``openai-unet``, config ``time_input_scale``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cpcluster.models.consistency import pixel_to_model
from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.purifier_base import DenoiserPurifier, LabelPolicy
from cpcluster.util.errors import InputError

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def ddpm_betas(schedule: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> np.ndarray:
    """The beta schedule ``schedule`` over ``num_steps`` timesteps, float64 array of shape (num_steps,)."""
    if num_steps < 1:
        raise InputError(f"DDPM schedule: num_train_timesteps must be >= 1, got {num_steps}")
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    if schedule in ("squaredcos_cap_v2", "cosine"):
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999) for i in range(num_steps)])
    raise InputError(f"DDPM schedule {schedule!r} is not supported; use one of {', '.join(SCHEDULES)} "
                     "or give the betas explicitly")


def alphas_cumprod(betas) -> np.ndarray:
    """``abar_t = prod_{s <= t} (1 - beta_s)``, float64, same shape as ``betas``; checks 0 < beta < 1."""
    b = np.asarray(betas, dtype=np.float64).reshape(-1)
    if b.size == 0 or not np.all((b > 0) & (b < 1)):
        raise InputError("DDPM betas must be a non-empty list of numbers in (0, 1)")
    return np.cumprod(1.0 - b)


def onestep_timestep(abar: np.ndarray, sigma_pixel: float) -> int:
    """First index ``t`` with ``sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma_pixel`` (model-space noise level).

    Raises :class:`InputError` when even the last timestep is less noisy than ``2 sigma``.
    """
    ratio = np.sqrt(1.0 - abar) / np.sqrt(abar)
    hits = np.nonzero(ratio >= 2.0 * float(sigma_pixel))[0]
    if hits.size == 0:
        raise InputError(f"--sigma {sigma_pixel}: the DDPM schedule only reaches model-space noise "
                         f"{ratio[-1]:.4g} < 2 sigma = {2 * sigma_pixel:.4g}; use a smaller sigma")
    return int(hits[0])


def carlini_timestep(abar: np.ndarray, sigma_pixel: float) -> int:
    """The ``exact`` rule's timestep (module docstring): Carlini et al.'s closed form when ``abar`` is the cosine
    schedule (recognised from the values, whatever the metadata calls it), else the index whose ``abar`` is nearest
    ``1 / (1 + 4 sigma^2)``."""
    target = 1.0 / (1.0 + 4.0 * float(sigma_pixel) ** 2)
    abar = np.asarray(abar, dtype=np.float64)
    if np.allclose(abar, alphas_cumprod(ddpm_betas("cosine", len(abar))), rtol=1e-9, atol=0):
        c, steps = 0.008, len(abar)
        t = steps * (1 - 2 * (1 + c) * math.asin(math.sin(math.pi / (2 * (1 + c))) * math.sqrt(target)) / math.pi)
        return min(max(int(round(t)), 0), steps - 1)
    return int(np.argmin(np.abs(np.asarray(abar) - target)))


def ddpm_x0(output: torch.Tensor, x_t: torch.Tensor, abar_t: float, prediction: str) -> torch.Tensor:
    """The network's estimate of x0 (model space) from its raw ``output`` at ``x_t`` (both (B, C, H, W))."""
    a, s = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
    if prediction == "epsilon":
        return (x_t - s * output) / a
    if prediction == "v_prediction":
        return a * x_t - s * output
    if prediction == "sample":
        return output
    raise InputError(f"DDPM prediction type {prediction!r} is not supported; use one of {', '.join(PREDICTIONS)}")


def ddpm_schedule(denoiser: LoadedDenoiser) -> np.ndarray:
    """``alphas_cumprod`` (float64, (T,)) of a ``kind="ddpm"`` network from ``meta["betas"]``."""
    if denoiser.kind != "ddpm":
        raise InputError(f"--denoiser {denoiser.spec}: a {denoiser.kind} network is not a DDPM noise predictor; "
                         "use --purifier consistency or pf-ode")
    if "betas" not in denoiser.meta:
        raise InputError(f"--denoiser {denoiser.spec}: DDPM network without a beta schedule; give "
                         "?schedule=linear (or a scheduler_config.json beside the weights)")
    return alphas_cumprod(denoiser.meta["betas"])


class OneStepDDPMPurifier(DenoiserPurifier):
    """``onestep-ddpm``: x0 prediction of a DDPM network at the first timestep whose noise reaches 2 sigma.

    ``forward(x_noisy (B, C, H, W) pixel space, generator=None) -> (B, C, H, W) pixel space [0, 1]``.
    """

    kind = "onestep-ddpm"

    def __init__(self, denoiser: LoadedDenoiser, sigma: float, time_rule: str = "nearest",
                 label_policy: LabelPolicy = LabelPolicy(), **_):
        super().__init__()
        abar = ddpm_schedule(denoiser)
        self.denoiser = denoiser
        self.net = denoiser.module
        self.sigma = float(sigma)
        self.time_rule = time_rule
        if time_rule == "exact":
            self.t = carlini_timestep(abar, sigma)
            self.scale = 1.0 / math.sqrt(1.0 + 4.0 * self.sigma**2)
        else:
            self.t = onestep_timestep(abar, sigma)
            self.scale = math.sqrt(float(abar[self.t]))
        self.abar_t = float(abar[self.t])
        self.prediction = denoiser.meta.get("prediction", "epsilon")
        if self.prediction not in PREDICTIONS:
            raise InputError(f"--denoiser {denoiser.spec}: prediction type {self.prediction!r} is not supported; "
                             f"use one of {', '.join(PREDICTIONS)}")
        self.label_policy = label_policy

    def forward(self, x_noisy: torch.Tensor, generator: torch.Generator | None = None, labels=None) -> torch.Tensor:
        labels = self.labels_for(x_noisy, generator, labels)
        x_t = self.scale * pixel_to_model(x_noisy)
        steps = torch.full((x_noisy.shape[0],), self.t, dtype=torch.int64, device=x_noisy.device)
        out = self.net(x_t, steps, labels).to(x_t.dtype)
        x0 = ddpm_x0(out, x_t, self.abar_t, self.prediction)
        return ((x0.clamp(-1.0, 1.0) + 1.0) * 0.5).clamp_(0.0, 1.0)

    def describe(self) -> dict:
        return {"kind": self.kind, "timestep": self.t, "abar_t": self.abar_t, "time_rule": self.time_rule,
                "input_scale": self.scale,
                "model_sigma_t": math.sqrt((1.0 - self.abar_t) / self.abar_t), "prediction": self.prediction,
                "schedule": self.denoiser.meta.get("schedule"),
                "label_policy": self.label_policy.text if self.denoiser.meta.get("num_classes") else None}
