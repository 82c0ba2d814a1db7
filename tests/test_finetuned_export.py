"""Exporting the same weights twice gives the same bytes (certify runs pin the weights' sha256)."""
import json

import torch

from cpcluster.models.finetuned import export_finetuned
from cpcluster.models.specs import load_denoiser


def test_export_is_byte_deterministic(tmp_path):
    base = load_denoiser("demo-random")
    state = {k: v.clone() for k, v in base.module.state_dict().items()}
    digests = set()
    for k in range(6):
        folder = tmp_path / f"e{k}"
        export_finetuned(str(folder), state, base, "ema", 3, {"steps": 3})
        digests.add(json.loads((folder / "cpcluster.json").read_text())["weights"]["sha256"])
    assert len(digests) == 1
    loaded = load_denoiser(f"finetuned:{tmp_path / 'e0'}")
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in state.items())
