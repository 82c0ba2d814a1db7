"""``onestep-edm``: one evaluation of an EDM denoiser at t = 2 sigma (the "onestep-EDM" baseline of Table 2).

Pixel space in, pixel space out (DESIGN.md section 1). The noisy image goes to model space,
``x_t = 2 (x + delta) - 1`` (noise standard deviation 2 sigma there), the denoiser gives its estimate of the clean
image ``y = D(x_t; t)`` at ``t = 2 sigma`` (``--time-rule exact``; ``--time-rule nearest`` takes the training-grid point
nearest 2 sigma and needs ``meta["grid_steps"]``, which continuous-time EDM networks do not have), and the output is
``clamp((y + 1) / 2, 0, 1)``. ``D`` is :class:`cpcluster.models.pfode.EDMDenoiser`: the network itself when it is
preconditioned (an NVlabs/edm network converted with ``cpcluster convert edm-pickle``), else the EDM scalings
around the raw network.

Relation to ``pf-ode``: one Euler step of the probability-flow ODE ``dx/dt = (x - D(x; t)) / t`` from t to 0 is
``x + (0 - t) (x - D(x; t)) / t = D(x; t)``. ``pf-ode --solver-steps 1`` starts at the same t and its only step lands on
t = 0, where it is Euler even with ``--solver heun``, so it returns the same image up to floating-point rounding
with the same single network evaluation. ``onestep-edm`` names that row and does only the evaluation.
"""
from __future__ import annotations

import torch

from cpcluster.models.consistency import model_to_pixel, pixel_to_model, time_for_sigma
from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.pfode import EDMDenoiser
from cpcluster.models.purifier_base import DenoiserPurifier, LabelPolicy
from cpcluster.util.errors import InputError


class OneStepEDMPurifier(DenoiserPurifier):
    """``onestep-edm``: ``D(2 (x + delta) - 1; 2 sigma)`` mapped back to [0, 1].

    ``forward(x_noisy (B, C, H, W) pixel space, generator=None) -> (B, C, H, W) pixel space [0, 1]``; exactly one
    network evaluation per image.
    """

    kind = "onestep-edm"

    def __init__(self, denoiser: LoadedDenoiser, sigma: float, time_rule: str = "nearest",
                 label_policy: LabelPolicy = LabelPolicy(), steps: int | None = None, **_):
        super().__init__()
        if denoiser.kind != "edm":
            fix = "consistency" if denoiser.kind == "consistency" else "onestep-ddpm"
            raise InputError(f"--denoiser {denoiser.spec}: a {denoiser.kind} network is not an EDM denoiser; use "
                             f"--purifier {fix}")
        if steps not in (None, 1):
            raise InputError(f"--solver-steps {steps}: onestep-edm is one network evaluation; for {steps} steps of the "
                             "probability-flow ODE use --purifier pf-ode")
        grid = denoiser.meta.get("grid_steps")
        if time_rule == "nearest" and not grid:
            raise InputError(f"--denoiser {denoiser.spec}: a continuous-time EDM network has no training grid for "
                             "--time-rule nearest; use --time-rule exact (t = 2 sigma) or set grid_steps")
        self.denoiser, self.label_policy = denoiser, label_policy
        self.D = EDMDenoiser(denoiser)
        self.sigma, self.time_rule = float(sigma), time_rule
        self.t = time_for_sigma(sigma, grid, time_rule)

    def forward(self, x_noisy: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        labels = self.labels_for(x_noisy, generator)
        return model_to_pixel(self.D(pixel_to_model(x_noisy), self.t, labels))

    def describe(self) -> dict:
        return {"kind": self.kind, "t_sigma": self.t, "time_rule": self.time_rule,
                "preconditioned": self.D.preconditioned,
                "label_policy": self.label_policy.text if self.denoiser.meta.get("num_classes") else None}
