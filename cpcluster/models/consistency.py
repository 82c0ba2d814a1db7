"""The consistency function of Song et al. (2023) and its time-step rule (DESIGN.md section 1).

Everything here is in *model space* ``[-1, 1]``: a pixel-space image ``x`` in ``[0, 1]`` is ``2x - 1``, so pixel
smoothing noise ``sigma`` is ``2 * sigma`` in model space. Certification (``cpcluster.models.purifiers``) and
fine-tuning (``cpcluster.jobs.finetune``) both call :class:`ConsistencyFunction` and :func:`time_for_sigma`: one
implementation of the method, not two.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from cpcluster.core.choices import TIME_RULES

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002  # eps: the boundary time where D(x, eps) = x
SIGMA_MAX = 80.0
RHO = 7.0

# Network time input conventions, a property of the network adapter.
C_NOISE = {
    "openai": lambda t: 1000.0 * 0.25 * torch.log(t + 1e-44),  # OpenAI / diffusers PyTorch checkpoints
    "jax": lambda t: 0.25 * torch.log(t + 1e-44),  # the JAX CIFAR-10 checkpoints
}


def karras_grid(num_steps: int, eps: float = SIGMA_MIN, t_max: float = SIGMA_MAX, rho: float = RHO) -> np.ndarray:
    """Ascending Karras time grid ``t_i = (eps^(1/rho) + i/(N-1) (T^(1/rho) - eps^(1/rho)))^rho``, shape (N,)."""
    if num_steps < 2:
        raise ValueError("the Karras grid needs at least 2 points")
    i = np.arange(num_steps, dtype=np.float64)
    lo, hi = eps ** (1 / rho), t_max ** (1 / rho)
    return (lo + i / (num_steps - 1) * (hi - lo)) ** rho


def time_for_sigma(sigma_pixel: float, num_steps: int | None, rule: str = "nearest") -> float:
    """The consistency time step that purifies pixel-space noise ``sigma_pixel``.

    ``rule="nearest"``: the point of the model's training grid (``num_steps`` points) nearest to the model-space
    noise ``2 * sigma_pixel`` (the paper's midpoint-interval rule). ``rule="exact"``: ``t = 2 * sigma_pixel``.
    For N = 18 this gives 0.5853, 1.0882, 1.9233 at sigma = 0.25, 0.5, 1.0.
    """
    target = 2.0 * float(sigma_pixel)
    if rule == "exact":
        return target
    if rule not in TIME_RULES:
        raise ValueError(f"unknown time rule {rule!r}; use one of {', '.join(TIME_RULES)}")
    if not num_steps:
        raise ValueError("rule 'nearest' needs the model's grid size N (network metadata)")
    grid = karras_grid(num_steps)
    return float(grid[int(np.argmin(np.abs(grid - target)))])


def boundary_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA, eps: float = SIGMA_MIN):
    """``(c_skip, c_out, c_in)`` at time ``t``; at ``t = eps``: c_skip = 1, c_out = 0, so D(x, eps) = x exactly."""
    c_skip = sigma_data**2 / ((t - eps) ** 2 + sigma_data**2)
    c_out = (t - eps) * sigma_data / torch.sqrt(sigma_data**2 + t**2)
    c_in = 1.0 / torch.sqrt(t**2 + sigma_data**2)
    return c_skip, c_out, c_in


class ConsistencyFunction(nn.Module):
    """``D(x_t, t) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t), labels)`` in model space.

    Parameters
    ----------
    net : callable ``net(x, c_noise, class_labels)`` -> tensor shaped like ``x`` (B, C, H, W); ``c_noise`` is (B,)
          float; ``class_labels`` is (B,) int64 or None.
    c_noise : ``"openai"`` (``1000 * 0.25 ln t``) or ``"jax"`` (``0.25 ln t``).
    """

    def __init__(self, net: nn.Module | Callable, c_noise: str = "openai"):
        super().__init__()
        if c_noise not in C_NOISE:
            raise ValueError(f"unknown c_noise convention {c_noise!r}; use one of {sorted(C_NOISE)}")
        self.net = net
        self.c_noise = c_noise

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None):
        """x_t: (B, C, H, W) model space; t: scalar or (B,) times; returns (B, C, H, W) model space, unclamped."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x_t.shape[0])
        c_skip, c_out, c_in = (c.to(x_t.dtype).view(-1, 1, 1, 1) for c in boundary_scalings(t))
        f = self.net(c_in * x_t, C_NOISE[self.c_noise](t).to(x_t.dtype), class_labels)
        return c_skip * x_t + c_out * f.to(x_t.dtype)


def pixel_to_model(x: torch.Tensor) -> torch.Tensor:
    """Pixel space [0, 1] -> model space [-1, 1] (no clamping: noisy inputs leave the range)."""
    return 2.0 * x - 1.0


def model_to_pixel(y: torch.Tensor) -> torch.Tensor:
    """Model space -> pixel space, clamped to [0, 1]."""
    return ((y + 1.0) * 0.5).clamp_(0.0, 1.0)

