"""Built-in demo data: scikit-learn's handwritten digits (shipped inside scikit-learn, no download).

The 1797 grey 8x8 images (intensities 0..16) are resized bilinearly to 1x16x16 and stored as uint8, 10 classes.
Split (fixed): images 0..1296 train, 1297..1796 test (500 images, like the paper's 500-image CIFAR-10 subset).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from cpcluster.models.loaded import ImageDataset

DEMO_SHAPE = (1, 16, 16)
NUM_TRAIN = 1297


@lru_cache(maxsize=1)
def _digits_16() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float64) / 16.0  # (N, 8, 8) in [0, 1]
    # bilinear 8 -> 16 with half-pixel centres (same as torch interpolate align_corners=False)
    pos = np.clip((np.arange(16) + 0.5) / 2.0 - 0.5, 0, 7)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, 7)
    w = pos - lo
    rows = x[:, lo, :] * (1 - w)[None, :, None] + x[:, hi, :] * w[None, :, None]
    full = rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]
    images = np.round(full * 255).astype(np.uint8)[:, None]  # (N, 1, 16, 16)
    return images, bunch.target.astype(np.int64)


def demo_dataset(split: str = "test") -> ImageDataset:
    """The demo digits as an :class:`ImageDataset`; ``split`` is ``"train"`` or ``"test"``."""
    images, labels = _digits_16()
    sl = slice(0, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, None)
    if split not in ("train", "test"):
        raise ValueError(f"unknown demo split {split!r}")
    x, y = images[sl], labels[sl]
    fp = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    return ImageDataset(name=f"demo-digits-{split}", images=x, labels=y, num_classes=10, fingerprint=fp,
                        spec="demo" if split == "test" else "demo:train")
