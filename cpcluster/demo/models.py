"""Loaders of the built-in demo models and data (specs ``demo``, ``demo-finetuned``, ``demo-random``).

``demo`` loads the weights shipped in this folder (``classifier.safetensors``, ``denoiser.safetensors``,
``denoiser-finetuned.safetensors``), made reproducibly by ``scripts/train_demo.py``. ``demo-random`` is the same
architecture with a seeded random init, for tests; it says so in its description.
"""
from __future__ import annotations

import os

import torch

from cpcluster.demo.data import demo_dataset
from cpcluster.demo.nets import DemoClassifier, DemoUNet
from cpcluster.errors import InputError
from cpcluster.models.loaded import LoadedClassifier, LoadedDenoiser
from cpcluster.models.specs import register
from cpcluster.models.weights import apply_state_dict, load_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
DENOISER_META = {"c_noise": "openai", "grid_steps": 18, "num_classes": None}
WEIGHT_FILES = {"classifier": "classifier.safetensors", "denoiser": "denoiser.safetensors",
                "denoiser-finetuned": "denoiser-finetuned.safetensors"}


def shipped(name: str) -> str:
    """Path of a shipped demo weight file (may not exist before ``scripts/train_demo.py`` has run)."""
    return os.path.join(HERE, WEIGHT_FILES[name])


def _weights(module: torch.nn.Module, name: str) -> str:
    path = shipped(name)
    if not os.path.exists(path):
        raise InputError(f"demo weights {path} are missing; run `python scripts/train_demo.py` to build them")
    state, digest = load_state_dict(path, "demo weights")
    apply_state_dict(module, state, path, "demo weights")
    return digest


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5) if p.ndim > 1
                    else torch.zeros_like(p))
    return module


@register("denoiser", "demo")
def _demo_denoiser(argument: str) -> LoadedDenoiser:
    name = {"": "denoiser", "finetuned": "denoiser-finetuned"}.get(argument)
    if name is None:
        raise InputError(f"--denoiser demo:{argument}: use 'demo' or 'demo:finetuned'")
    net = DemoUNet()
    digest = _weights(net, name)
    return LoadedDenoiser(net.eval(), "consistency", dict(DENOISER_META), sha256=digest)


@register("denoiser", "demo-random")
def _demo_random_denoiser(argument: str) -> LoadedDenoiser:
    conditional = argument == "conditional"
    net = _random(DemoUNet(num_classes=10 if conditional else None), seed=1)
    meta = {**DENOISER_META, "num_classes": 10 if conditional else None, "random_init": True}
    return LoadedDenoiser(net.eval(), "consistency", meta)


@register("classifier", "demo")
def _demo_classifier(argument: str) -> LoadedClassifier:
    net = DemoClassifier()
    digest = _weights(net, "classifier")
    return LoadedClassifier(net.eval(), 10, sha256=digest, transform={"input": "1x16x16 pixel [0,1]"})


@register("classifier", "demo-random")
def _demo_random_classifier(argument: str) -> LoadedClassifier:
    net = _random(DemoClassifier(), seed=2)
    return LoadedClassifier(net.eval(), 10, transform={"input": "1x16x16 pixel [0,1]", "random_init": True})


@register("dataset", "demo")
def _demo_data(argument: str):
    return demo_dataset(argument or "test")
