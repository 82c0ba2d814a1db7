"""Spec strings -> loaded models and datasets, through explicit registries (name -> loader).

A spec is ``KIND`` or ``KIND:ARGUMENT``, e.g. ``demo``, ``demo-random``, ``python:my.module:factory``,
``torchscript:/ckpt/model.pt``, ``diffusers:/ckpt/cd_imagenet64_lpips``, ``timm:resnet50:/ckpt/r50.safetensors``,
``hf-vit:/ckpt/vit-cifar10``, ``cifar10:/data/cifar-10-batches-py``, ``npz:/data/val.npz``. Loaders raise
:class:`InputError` naming the spec and the fix. Adapter modules register more kinds with :func:`register`.
"""
from __future__ import annotations

from typing import Callable

from cpcluster.models.loaded import ImageDataset, LoadedClassifier, LoadedDenoiser
from cpcluster.util.errors import InputError

DENOISERS: dict[str, Callable[[str], LoadedDenoiser]] = {}
CLASSIFIERS: dict[str, Callable[[str], LoadedClassifier]] = {}
DATASETS: dict[str, Callable[[str], ImageDataset]] = {}
_TABLES = {"denoiser": DENOISERS, "classifier": CLASSIFIERS, "dataset": DATASETS}


def register(table: str, kind: str):
    """Decorator: ``@register("denoiser", "diffusers") def load(argument: str) -> LoadedDenoiser``."""

    def deco(fn):
        _TABLES[table][kind] = fn
        return fn

    return deco


def _ensure_adapters() -> None:
    # Adapter modules register themselves on import; import them here, not at package import (no side effects).
    import cpcluster.demo.models  # noqa: F401
    import importlib.util

    for name in ("cpcluster.models.adapters", "cpcluster.models.datasets", "cpcluster.models.finetuned",
                 "cpcluster.models.finetuned_classifier", "cpcluster.models.netfolder", "cpcluster.models.hf_vit"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def _load(table: str, spec: str):
    _ensure_adapters()
    kind, _, argument = spec.partition(":")
    loaders = _TABLES[table]
    if kind not in loaders:
        raise InputError(f"--{table} {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(sorted(loaders))}")
    loaded = loaders[kind](argument)
    loaded.spec = spec
    if table != "dataset":
        check_finite(loaded.module, f"--{table} {spec}")
    return loaded


def check_finite(module, what: str) -> None:
    """InputError when a parameter of ``module`` holds NaN or inf, or a buffer holds NaN (a diverged training run
    or a damaged checkpoint would otherwise certify with garbage); buffers may hold inf on purpose (masks)."""
    import torch

    for kind, tensors in (("weight", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in tensors:
            if t.is_floating_point() and not t.is_meta and not (
                    torch.isfinite(t).all() if kind == "weight" else ~torch.isnan(t).any()):
                raise InputError(f"{what}: {kind} {name!r} holds NaN or infinite values; the network is broken "
                                 "(a diverged training run or a damaged file), refusing to use it")


def load_denoiser(spec: str) -> LoadedDenoiser:
    """The denoising network named by ``spec``, on the CPU, in eval mode."""
    return _load("denoiser", spec)


def load_classifier(spec: str) -> LoadedClassifier:
    """The classifier named by ``spec`` (pixel-space input, transform inside), on the CPU, in eval mode."""
    return _load("classifier", spec)


def load_dataset(spec: str) -> ImageDataset:
    return _load("dataset", spec)


# Spec kinds whose loading runs code that the spec names or the file holds: python: imports MODULE and calls
# FACTORY; torchscript: deserialising an archive runs its TorchScript code (__setstate__ methods).
CODE_KINDS = ("python", "torchscript")


def runs_code(spec) -> bool:
    """Whether loading ``spec`` runs code it names or holds (its kind is in :data:`CODE_KINDS`)."""
    return isinstance(spec, str) and spec.partition(":")[0] in CODE_KINDS


def confirm_recorded_specs(recorded: dict, given: dict, source: str) -> None:
    """Check the specs a run recorded in a file (``source``, e.g. its ``run.json``) before they are loaded again.

    ``recorded`` and ``given`` map an option (``"--classifier"``) to a spec or None; ``given`` holds what the user
    typed on this command line. A file may name data and weights, never code to run: a recorded spec of a kind in
    :data:`CODE_KINDS` is refused unless the user gives the same spec, and a given spec must equal the recorded
    one. Raises :class:`InputError` saying which option to pass.
    """
    for option, spec in recorded.items():
        typed = given.get(option)
        if typed is not None and typed != spec:
            raise InputError(f"{option} {typed!r} differs from {source}'s {spec!r}; a run resumes with the specs "
                             "it was planned with (start another run with `cpcluster certify` instead)")
        if runs_code(spec) and typed is None:
            raise InputError(f"{source} names {option} {spec!r}, which runs code when loaded; a file may not choose "
                             f"code to run, so confirm it on the command line: {option} '{spec}'")
    unknown = sorted(set(given) - set(recorded))
    if unknown:
        raise InputError(f"{unknown[0]}: not a spec this run records")


def known_kinds(table: str) -> list[str]:
    _ensure_adapters()
    return sorted(_TABLES[table])
