"""The ImageNet-64 consistency rows from the released consistency_models ``.pt`` (``cd_imagenet64_lpips.pt``): convert
-> inspect -> fine-tune on 2 ranks -> certify the export -> aggregate.

The stand-in is the upstream-written class-conditional consistency_models UNet of tests/data/openai_unet (16x16, 10
classes), converted with the ``cd_imagenet64_lpips`` preset at its small size; the data are random 3x16x16 images
with 10 classes in an ``npz:`` file and the classifier a random-init timm ResNet-18.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cpcluster.models.specs import load_denoiser
from openai_unet_files import convert_standin
from routes import certify_and_aggregate, cli, finetune_two_ranks, states_differ

torch.set_num_threads(1)
CLASSIFIER = "timm:resnet18?num_classes=10&mean=half"


def test_cd_imagenet64_pt_finetunes_and_certifies(tmp_path):
    spec = convert_standin("cm", tmp_path, preset="cd_imagenet64_lpips")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", x=rng.integers(0, 256, (40, 3, 16, 16), dtype=np.uint8),
             y=rng.integers(0, 10, 40))
    data = f"npz:{tmp_path}/images.npz?num_classes=10"
    den = load_denoiser(spec)
    assert (den.kind, den.meta["c_noise"], den.meta["grid_steps"], den.meta["num_classes"]) == (
        "consistency", "openai", 40, 10)
    report = cli("inspect", "--denoiser", spec, "--classifier", CLASSIFIER, "--dataset", data, "--sigma", "0.5")
    assert "label_policy: random: the class-conditional denoiser (10 classes)" in report

    out = str(tmp_path / "ft")
    output, digests = finetune_two_ranks(spec, out, data=data, eval_data=data,
                                         extra=("--classifier", CLASSIFIER))
    assert len(digests) == 2 and digests[0] == digests[1], output
    tuned = load_denoiser(f"finetuned:{out}/final")
    assert states_differ(den.module.state_dict(), tuned.module.state_dict())
    record = json.loads(open(os.path.join(out, "final", "cpcluster.json")).read())
    assert record["architecture"] == "openai-unet" and record["finetuned"]["base"] == spec
    assert record["finetune_run"]["config"]["purifier_label"] == "random"

    summary = certify_and_aggregate(f"finetuned:{out}/final", str(tmp_path / "results"), "tuned", dataset=data,
                                    classifier=CLASSIFIER)
    assert summary["groups"][0]["images_evaluated"] == 3
