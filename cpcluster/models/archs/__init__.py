"""Network architectures that cpcluster builds from a recorded name and configuration.

A network folder (:mod:`cpcluster.models.netfolder`) and a fine-tuning export record an architecture *name* and
its JSON *config*; loading builds the module with the builder registered here and assigns the weights. Only the
architectures listed in :data:`ARCHITECTURES` can be built: a file chooses one of them by name, never code.

Every builder module has ``build(config: dict, what: str) -> nn.Module``. The module's forward is
``module(x, time_input, class_labels)`` in model space [-1, 1]: ``x`` (B, C, H, W), ``time_input`` (B,) float (the
network's own time convention, see ``LoadedDenoiser.meta``), ``class_labels`` (B,) int64 or None. ``build`` checks
the config (types, ranges, plausible sizes) *before* allocating, with :class:`InputError` naming ``what``; it builds
on the meta device when asked (``torch.device("meta")`` context) so that weights are assigned without a copy.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from cpcluster.util.errors import InputError

# Explicit registry: architecture name -> module holding its ``build(config, what)``.
ARCHITECTURES: dict[str, str] = {
    "diffusers-unet2d": "cpcluster.models.archs.diffusers_unet",
    "demo-unet": "cpcluster.models.archs.demo_unet",
    "openai-unet": "cpcluster.models.archs.openai_unet",
    "edm-precond": "cpcluster.models.archs.edm_precond",
    "ncsnpp": "cpcluster.models.archs.ncsnpp",
}

# Where each architecture's config gives the channel count C of the images it takes: (key path, builder default).
IMAGE_CHANNELS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "diffusers-unet2d": (("in_channels",), 3),
    "demo-unet": (("channels",), 1),
    "openai-unet": (("in_channels",), 3),
    "edm-precond": (("precond_kwargs", "img_channels"), None),
    "ncsnpp": (("num_channels",), 3),
}


def image_channels(name: str, config: dict) -> int | None:
    """C of the (B, C, H, W) images architecture ``name`` with ``config`` takes (a config :func:`build_architecture`
    accepted), or None where the config does not say."""
    path, default = IMAGE_CHANNELS.get(name, ((), None))
    value = config
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def build_architecture(name: str, config: dict, what: str, meta_device: bool = False) -> nn.Module:
    """The module of architecture ``name`` with ``config``; on the meta device (no memory) if ``meta_device``."""
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise InputError(f"{what}: unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if not isinstance(config, dict):
        raise InputError(f"{what}: the configuration of architecture {name} must be a JSON object")
    builder = importlib.import_module(ARCHITECTURES[name]).build
    if meta_device:
        with torch.device("meta"):
            return builder(config, what)
    return builder(config, what)


def first_mismatch(module: nn.Module, state: dict) -> str | None:
    """A one-line description of the first tensor of ``state`` that does not fit ``module``, or None if all fit.

    Checked in the module's own key order: a tensor the module needs that ``state`` lacks, then tensors of the wrong
    shape, then tensors ``state`` has that the module does not know.
    """
    return first_shape_mismatch({k: tuple(t.shape) for k, t in module.state_dict(keep_vars=True).items()}, state)


def first_shape_mismatch(expected: dict, state: dict, where: str = "the architecture") -> str | None:
    """:func:`first_mismatch` against a layout ``{name: shape}`` (in its order) instead of a module; ``where`` names
    what the layout belongs to in the message."""
    for key, shape in expected.items():
        if key not in state:
            return f"tensor {key!r} {tuple(shape)} is missing"
        got = state[key]
        if not isinstance(got, torch.Tensor):
            return f"tensor {key!r} is not a tensor"
        if tuple(got.shape) != tuple(shape):
            return f"tensor {key!r} has shape {tuple(got.shape)}, {where} needs {tuple(shape)}"
    extra = [k for k in state if k not in expected]
    if extra:
        return f"tensor {extra[0]!r} is not part of {where} ({len(extra)} such tensor(s))"
    return None


def assign_state(module: nn.Module, state: dict, what: str) -> nn.Module:
    """Load ``state`` into ``module`` strictly (floating tensors cast to float32), assigning storage when the module
    lives on the meta device. A mismatch is one :class:`InputError` naming the first mismatching tensor."""
    problem = first_mismatch(module, state)
    if problem:
        raise InputError(f"{what}: weights do not fit the architecture: {problem}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    meta = any(t.is_meta for t in (*module.parameters(), *module.buffers()))
    module.load_state_dict(state, strict=True, assign=meta)
    return module
