"""The registry of purifiers: name -> ``"module:class"``, imported only when that purifier is built.

Every purifier maps noisy pixel-space images to purified pixel-space images in [0, 1] (DESIGN.md section 1;
:mod:`cpcluster.models.purifier_base` says what they share). This module imports no torch: configs and commands
take the names from here (:data:`PURIFIER_NAMES`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cpcluster.util.errors import InputError

if TYPE_CHECKING:  # annotations only: the classes are imported when a purifier is built
    from cpcluster.models.loaded import LoadedDenoiser
    from cpcluster.models.purifier_base import Purifier

PURIFIERS: dict[str, str] = {
    "consistency": "cpcluster.models.purifier_base:ConsistencyPurifier",  # the paper's: one consistency step
    "onestep-ddpm": "cpcluster.models.ddpm:OneStepDDPMPurifier",  # Carlini et al. 2023
    "onestep-edm": "cpcluster.models.onestep_edm:OneStepEDMPurifier",
    "pf-ode": "cpcluster.models.pfode:PFODEPurifier",  # Heun / Euler steps of the probability-flow ODE
    "none": "cpcluster.models.purifier_base:IdentityPurifier",  # plain randomized smoothing
}
PURIFIER_NAMES = tuple(PURIFIERS)


def purifier_class(name: str):
    """The class of purifier ``name`` (imported now); :class:`InputError` for a name not in :data:`PURIFIERS`."""
    if name not in PURIFIERS:
        raise InputError(f"--purifier {name!r} is unknown; choose one of {', '.join(sorted(PURIFIERS))}")
    module, attribute = PURIFIERS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def build_purifier(name: str, denoiser: LoadedDenoiser | None, sigma: float, **options) -> Purifier:
    """The purifier ``name`` for pixel-space noise ``sigma``; options: time_rule, steps, label_policy."""
    cls = purifier_class(name)
    if name != "none" and denoiser is None:
        raise InputError(f"--purifier {name} needs a --denoiser")
    if name == "none":
        return cls(sigma)
    return cls(denoiser, sigma, **options)


def configured_purifier(name: str, denoiser: LoadedDenoiser | None, sigma: float, time_rule: str = "nearest",
                        purifier_label: str = "random", steps: int | None = None) -> Purifier:
    """:func:`build_purifier` from the command-line settings every job has (``--time-rule``, ``--purifier-label``,
    ``--solver-steps`` of pf-ode)."""
    from cpcluster.models.purifier_base import LabelPolicy

    options = {"time_rule": time_rule, "label_policy": LabelPolicy(purifier_label)}
    if steps is not None:
        options["steps"] = steps
    return build_purifier(name, denoiser, sigma, **options)
