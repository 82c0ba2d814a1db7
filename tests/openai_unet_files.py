"""The OpenAI-format stand-ins of tests/data/openai_unet (made by scripts/dev/make_openai_unet_reference.py).

Each is a state dict written by upstream's ``torch.save(model.state_dict())`` (stored xz-compressed; :func:`write_pt`
writes the plain ``.pt`` a user would have) and an ``.npz`` of inputs and upstream outputs. :data:`STANDINS` gives
the preset each one stands in for and the ``--set`` overrides of its small size.
"""
from __future__ import annotations

import json
import lzma
import os

import numpy as np

DATA = os.path.join(os.path.dirname(__file__), "data", "openai_unet")
SMALL = ["model_channels=32", "num_res_blocks=1", "channel_mult=1,1", "attention_resolutions=2", "image_size=16"]
STANDINS = {
    "id_uncond": ("cifar10_uncond_50M_500K", SMALL),
    "id_cond": ("imagenet64_cond_270M_250K",
                [*SMALL, "num_classes=10", "use_scale_shift_norm=false", "num_heads_upsample=2"]),
    "cm": ("edm_imagenet64_ema", [*SMALL[:3], "attention_resolutions=1,2", "image_size=16", "num_classes=10",
                                  "num_head_channels=16"]),
}


def reference(name: str) -> dict:
    """The upstream inputs and outputs of stand-in ``name`` (numpy arrays)."""
    with np.load(os.path.join(DATA, name + ".npz")) as data:
        return dict(data)


def preset_layouts() -> dict:
    with open(os.path.join(DATA, "presets.json")) as fh:
        return json.load(fh)


def write_pt(name: str, folder) -> str:
    """Decompress stand-in ``name`` to ``folder/NAME.pt`` (the bytes upstream's torch.save wrote); returns the path."""
    path = os.path.join(str(folder), name + ".pt")
    with open(os.path.join(DATA, name + ".pt.xz"), "rb") as fh:
        raw = lzma.decompress(fh.read())
    with open(path, "wb") as fh:
        fh.write(raw)
    return path


def set_args(name: str, preset: str | None = None) -> list[str]:
    """``["--set", "preset=...", "--set", ...]`` converting stand-in ``name`` (under another ``preset`` if given)."""
    default, overrides = STANDINS[name]
    items = [f"preset={preset or default}", *overrides]
    return [a for item in items for a in ("--set", item)]


def convert_standin(name: str, folder, preset: str | None = None) -> str:
    """Convert stand-in ``name`` into ``folder/net_NAME`` with the library call; returns the ``net:`` spec."""
    from cpcluster.convert import run_conversion

    out = os.path.join(str(folder), f"net_{name}_{preset or 'default'}")
    run_conversion("openai-unet", write_pt(name, folder), out, set_args(name, preset)[1::2])
    return f"net:{out}"
