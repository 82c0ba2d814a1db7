"""Spec strings -> loaded models and datasets, through one explicit table per kind of spec (kind -> loader).

A spec is ``KIND`` or ``KIND:ARGUMENT``, e.g. ``demo``, ``demo-random``, ``python:my.module:factory``,
``torchscript:/ckpt/model.pt``, ``diffusers:/ckpt/cd_imagenet64_lpips``, ``timm:resnet50:/ckpt/r50.safetensors``,
``hf-vit:/ckpt/vit-cifar10``, ``cifar10:/data/cifar-10-batches-py``, ``npz:/data/val.npz``. A table maps each kind
to its loader as ``"module:function"``; the module is imported only when a spec of that kind is loaded, and the
loader gets ``ARGUMENT``. Loaders raise :class:`InputError` naming the spec and the fix.
"""
from __future__ import annotations

import importlib

from cpcluster.models.loaded import ImageDataset, LoadedClassifier, LoadedDenoiser
from cpcluster.util.errors import InputError

DENOISERS = {
    "demo": "cpcluster.demo.models:load_demo_denoiser",
    "demo-random": "cpcluster.demo.models:load_demo_random_denoiser",
    "diffusers": "cpcluster.models.adapters:load_diffusers",
    "net": "cpcluster.models.netfolder:load_net",
    "finetuned": "cpcluster.models.finetuned:load_finetuned",
    "python": "cpcluster.models.adapters:load_python_denoiser",  # runs code the spec names (CODE_KINDS)
    "torchscript": "cpcluster.models.adapters:load_torchscript_denoiser",
}
CLASSIFIERS = {
    "demo": "cpcluster.demo.models:load_demo_classifier",
    "demo-random": "cpcluster.demo.models:load_demo_random_classifier",
    "timm": "cpcluster.models.adapters:load_timm",
    "hf-vit": "cpcluster.models.hf_vit:load_hf_vit_classifier",
    "finetuned": "cpcluster.models.finetuned_classifier:load_finetuned_classifier",
    "python": "cpcluster.models.adapters:load_python_classifier",
    "torchscript": "cpcluster.models.adapters:load_torchscript_classifier",
}
DATASETS = {
    "demo": "cpcluster.demo.models:load_demo_dataset",
    "cifar10": "cpcluster.models.datasets:load_cifar10",
    "imagenet64": "cpcluster.models.datasets:load_imagenet64",
    "npz": "cpcluster.models.datasets:load_npz",
    "folder": "cpcluster.models.datasets:load_image_folder",
}
TABLES = {"denoiser": DENOISERS, "classifier": CLASSIFIERS, "dataset": DATASETS}


def loader(table: str, kind: str):
    """The loader function of spec kind ``kind`` in ``table`` (its module imported now); KeyError if unknown."""
    module, attribute = TABLES[table][kind].split(":")
    return getattr(importlib.import_module(module), attribute)


def _load(table: str, spec: str):
    kind, _, argument = spec.partition(":")
    if kind not in TABLES[table]:
        raise InputError(f"--{table} {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(known_kinds(table))}")
    loaded = loader(table, kind)(argument)
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
    """The spec kinds of ``table`` (``denoiser``, ``classifier``, ``dataset``), sorted."""
    return sorted(TABLES[table])
