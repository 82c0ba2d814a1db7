"""Spec strings -> loaded models and datasets, through explicit registries (name -> loader).

A spec is ``KIND`` or ``KIND:ARGUMENT``, e.g. ``demo``, ``demo-random``, ``python:my.module:factory``,
``torchscript:/ckpt/model.pt``, ``diffusers:/ckpt/cd_imagenet64_lpips``, ``timm:resnet50:/ckpt/r50.safetensors``,
``cifar10:/data/cifar-10-batches-py``, ``npz:/data/val.npz``. Loaders raise :class:`InputError` naming the spec
and the fix. Adapter modules register more kinds with :func:`register`.
"""
from __future__ import annotations

from typing import Callable

from cpcluster.errors import InputError
from cpcluster.models.loaded import ImageDataset, LoadedClassifier, LoadedDenoiser

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
                 "cpcluster.models.finetuned_classifier", "cpcluster.models.netfolder"):
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
    return loaded


def load_denoiser(spec: str) -> LoadedDenoiser:
    """The denoising network named by ``spec``, on the CPU, in eval mode."""
    return _load("denoiser", spec)


def load_classifier(spec: str) -> LoadedClassifier:
    """The classifier named by ``spec`` (pixel-space input, transform inside), on the CPU, in eval mode."""
    return _load("classifier", spec)


def load_dataset(spec: str) -> ImageDataset:
    return _load("dataset", spec)


def known_kinds(table: str) -> list[str]:
    _ensure_adapters()
    return sorted(_TABLES[table])
