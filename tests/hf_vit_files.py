"""The transformers-written ViT folders of tests/data/hf_vit (see its README.md) and helpers to alter copies."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch

DATA = os.path.join(os.path.dirname(__file__), "data", "hf_vit")


def reference(name: str) -> dict:
    """``images`` (B, H, W, 3) uint8, ``pixel_values`` and ``logits`` as transformers computed them."""
    with np.load(os.path.join(DATA, name + ".npz")) as npz:
        return {k: npz[k] for k in npz.files}


def pixels(ref: dict) -> torch.Tensor:
    """The reference images in cpcluster's pixel space: (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(ref["images"]).permute(0, 3, 1, 2).float() / 255.0


def copy_folder(name: str, dst, drop=(), config: dict | None = None, processor: dict | None = None) -> str:
    """A copy of folder ``name`` in ``dst`` without the files ``drop``; ``config`` / ``processor`` update the JSON
    files (a value None deletes the key)."""
    folder = os.path.join(str(dst), name)
    shutil.copytree(os.path.join(DATA, name), folder)
    for file in drop:
        os.remove(os.path.join(folder, file))
    for file, changes in (("config.json", config), ("preprocessor_config.json", processor)):
        if changes:
            path = os.path.join(folder, file)
            with open(path) as fh:
                record = json.load(fh)
            record.update(changes)
            record = {k: v for k, v in record.items() if v is not None}
            with open(path, "w") as fh:
                json.dump(record, fh)
    return folder
