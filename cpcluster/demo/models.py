"""Loaders of the built-in demo models and data (specs ``demo``, ``demo:finetuned``, ``demo-random``).

Shipped weights (this folder), made reproducibly by ``scripts/train_demo.py``, which also writes ``metrics.json``
(what it measured on the 500 test digits):

* ``classifier.safetensors`` -- :class:`DemoClassifier` trained on the clean ``demo:train`` digits (spec
  ``--classifier demo``);
* ``denoiser.safetensors`` -- :class:`DemoUNet`, a consistency-parameterised one-step denoiser trained with the L2
  loss at the serving sigmas {0.25, 0.5, 1.0} through the project's fine-tuning job: the purifier *before* LPIPS
  fine-tuning (spec ``--denoiser demo``);
* ``denoiser-finetuned.safetensors`` -- the same after a longer LPIPS fine-tuning (``demo:finetuned``), only when
  the recipe has a ``finetuned`` stage. It has none at present: a 5x longer run measured the same as the demo's
  short one (README.md, "The demo").

``demo-random`` is the same architecture with a seeded random init, for tests; its metadata says so.
"""
from __future__ import annotations

import os

import torch

from cpcluster.demo.data import demo_dataset
from cpcluster.demo.nets import DemoClassifier, DemoUNet
from cpcluster.models.loaded import LoadedClassifier, LoadedDenoiser
from cpcluster.models.weights import apply_state_dict, load_state_dict
from cpcluster.util.errors import InputError

HERE = os.path.dirname(os.path.abspath(__file__))
DENOISER_META = {"c_noise": "openai", "grid_steps": 18, "num_classes": None}
CLASSIFIER_TRANSFORM = {"input": "1x16x16 pixel [0,1]"}
WEIGHT_FILES = {"classifier": "classifier.safetensors", "denoiser": "denoiser.safetensors",
                "denoiser-finetuned": "denoiser-finetuned.safetensors"}
METRICS_FILE = "metrics.json"


def shipped(name: str, folder: str | None = None) -> str:
    """Path of demo weight file ``name`` (a key of :data:`WEIGHT_FILES`) in ``folder`` (default: this package)."""
    return os.path.join(folder or HERE, WEIGHT_FILES[name])


def demo_architecture(num_classes: int | None) -> dict:
    """The ``demo-unet`` architecture record of a :class:`DemoUNet` with default size (see models.archs)."""
    return {"name": "demo-unet", "config": {"channels": 1, "width": 32, "num_classes": num_classes}}


def _weights(module: torch.nn.Module, path: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"demo weights {path} are missing; run `python scripts/train_demo.py` to build them")
    state, digest = load_state_dict(path, "demo weights")
    apply_state_dict(module, state, path, "demo weights")
    return digest


def demo_denoiser(path: str) -> LoadedDenoiser:
    """A :class:`DemoUNet` consistency denoiser (model space [-1, 1]) with the weights of ``path``, eval mode."""
    net = DemoUNet()
    digest = _weights(net, path)
    return LoadedDenoiser(net.eval(), "consistency", dict(DENOISER_META), sha256=digest,
                          architecture=demo_architecture(None))


def demo_classifier(path: str) -> LoadedClassifier:
    """A :class:`DemoClassifier` (pixel space [0, 1] in, 10 logits out) with the weights of ``path``, eval mode."""
    net = DemoClassifier()
    digest = _weights(net, path)
    return LoadedClassifier(net.eval(), 10, sha256=digest, transform=dict(CLASSIFIER_TRANSFORM))


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5) if p.ndim > 1
                    else torch.zeros_like(p))
    return module


def load_demo_denoiser(argument: str) -> LoadedDenoiser:
    name = {"": "denoiser", "finetuned": "denoiser-finetuned"}.get(argument)
    if name is None:
        raise InputError(f"--denoiser demo:{argument}: use 'demo' or 'demo:finetuned'")
    if name == "denoiser-finetuned" and not os.path.exists(shipped(name)):
        raise InputError("--denoiser demo:finetuned: this version ships no longer-trained demo denoiser (the recipe "
                         "in scripts/train_demo.py has no 'finetuned' stage); fine-tune one with `cpcluster demo` "
                         "and use --denoiser finetuned:demo-out/finetune/final")
    return demo_denoiser(shipped(name))


def load_demo_random_denoiser(argument: str) -> LoadedDenoiser:
    conditional = argument == "conditional"
    net = _random(DemoUNet(num_classes=10 if conditional else None), seed=1)
    meta = {**DENOISER_META, "num_classes": 10 if conditional else None, "random_init": True}
    return LoadedDenoiser(net.eval(), "consistency", meta, architecture=demo_architecture(meta["num_classes"]))


def load_demo_classifier(argument: str) -> LoadedClassifier:
    if argument:
        raise InputError(f"--classifier demo:{argument}: the demo has one classifier; use 'demo'")
    return demo_classifier(shipped("classifier"))


def load_demo_random_classifier(argument: str) -> LoadedClassifier:
    net = _random(DemoClassifier(), seed=2)
    return LoadedClassifier(net.eval(), 10, transform={**CLASSIFIER_TRANSFORM, "random_init": True})


def load_demo_dataset(argument: str):
    if argument not in ("", "test", "train"):
        raise InputError(f"--dataset demo:{argument}: use 'demo' (500 test digits) or 'demo:train' (1297 digits)")
    return demo_dataset(argument or "test")
