"""What a spec loads into: networks with the metadata the method needs, and datasets.

Units: ``LoadedDenoiser.module`` works in model space [-1, 1]; ``LoadedClassifier.module`` takes pixel space
[0, 1] (its own resize / normalization / quantization inside); ``ImageDataset.get`` returns pixel space [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn


@dataclass
class LoadedDenoiser:
    """A denoising network and how to drive it.

    module : ``module(x, time_input, class_labels)`` -> (B, C, H, W) model-space tensor, x (B, C, H, W) model space.
             For ``kind="consistency"`` / ``"edm"`` the output is the raw network F (the boundary scalings are
             applied by :class:`cpcluster.models.consistency.ConsistencyFunction`); time_input is c_noise.
             For ``kind="ddpm"`` the output is the predicted noise epsilon; time_input is the integer timestep (a
             network trained on ``t * 1000 / T`` scales it itself: ``openai-unet``'s ``time_input_scale``).
    kind : ``"consistency"``, ``"edm"`` or ``"ddpm"``.
    meta : ``c_noise`` ("openai" | "jax"), ``grid_steps`` (Karras N the model was trained on), ``num_classes``
           (None for unconditional networks), ``betas`` (DDPM schedule, list) ...
    spec, sha256 : the spec string and the sha256 of the weights file (None for random init), for the run config.
    architecture : ``{"name": NAME, "config": {...}}`` when ``module`` is an architecture of
           :mod:`cpcluster.models.archs` built from that config (its state_dict then makes a self-contained network
           folder); None for modules only their own code can rebuild (``python:`` factories, TorchScript).
    """

    module: nn.Module
    kind: str
    meta: dict = field(default_factory=dict)
    spec: str = ""
    sha256: str | None = None
    architecture: dict | None = None

    def describe(self) -> dict:
        return {"spec": self.spec, "sha256": self.sha256, "kind": self.kind,
                **{k: v for k, v in self.meta.items() if k != "betas"}}

    def channel_problem(self, image_shape) -> str | None:
        """Why images of shape (C, H, W) cannot reach the network, or None (also when its channels are unknown)."""
        channels = self.meta.get("in_channels")
        if channels and image_shape and channels != image_shape[0]:
            return f"dataset images have {image_shape[0]} channels but the denoiser takes {channels}"
        return None


@dataclass
class LoadedClassifier:
    """``module(x)``: pixel-space (B, C, H, W) in [0, 1] -> logits (B, num_classes); transform is inside.

    architecture : for classifiers cpcluster builds itself from a foreign format (``hf-vit:``), what it built
           (``{"timm": class, "kwargs": ..., "input_size": [H, W], ...}``); None otherwise. It goes into the run
           config only when set, so the configs of other classifiers are unchanged.
    finetuned :  for a classifier fine-tuned behind a purifier (CLS-FT, ``finetuned:DIR``), where it came from
    (base spec, step, purifier); None otherwise (and then absent from :meth:`describe`, so run configs of plain
    classifiers keep their hash).
    """

    module: nn.Module
    num_classes: int
    spec: str = ""
    sha256: str | None = None
    transform: dict = field(default_factory=dict)
    architecture: dict | None = None
    finetuned: dict | None = None

    def describe(self) -> dict:
        out = {"spec": self.spec, "sha256": self.sha256, "num_classes": self.num_classes, "transform": self.transform}
        if self.architecture is not None:
            out["architecture"] = self.architecture
        if self.finetuned is not None:
            out["finetuned"] = self.finetuned
        return out
    def size_problem(self, image_hw) -> str | None:
        """Why pixel-space images of size ``image_hw`` (H, W) cannot reach the network, or None.

        Only for networks with a fixed input size (``architecture["input_size"]``): the transform's resize, or the
        images themselves when there is none, must produce that size.
        """
        need = (self.architecture or {}).get("input_size")
        if not need:
            return None
        size = tuple(self.transform.get("resize") or image_hw)
        if size == tuple(need):
            return None
        how = "the transform resizes them to" if self.transform.get("resize") else "they reach it unresized at"
        return (f"the classifier takes {need[0]}x{need[1]} images but {how} {size[0]}x{size[1]}; "
                f"add resize={need[0]} to its spec options")


@dataclass
class ImageDataset:
    """An evaluation set held in memory.

    images : (N, C, H, W) uint8 (0..255) or float32 in [0, 1]; labels : (N,) int64 in [0, num_classes).
    fingerprint : sha256 of the image and label bytes; goes into the run config.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    fingerprint: str
    spec: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def get(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, C, H, W) float32 pixel space [0, 1] and labels (B,) int64 for the given indices."""
        idx = np.asarray(indices, dtype=np.int64)
        x = self.images[idx]
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        return x, self.labels[idx].astype(np.int64)

    def describe(self) -> dict:
        return {"spec": self.spec, "name": self.name, "size": len(self), "shape": list(self.shape),
                "num_classes": self.num_classes, "fingerprint": self.fingerprint}
