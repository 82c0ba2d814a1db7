"""Table 2's consistency rows from diffusers folders, the way a user runs them: inspect -> finetune on 2 ranks ->
certify the export -> aggregate.

Stand-ins in the released layouts: a UNet2DModel folder with a cpcluster.json (a converted CD model), and a
pipeline folder like ``openai/diffusers-cd_imagenet64_lpips`` (``unet/`` + ``scheduler/`` with the
CMStochasticIterativeScheduler config, class-conditional through ``num_class_embeds``). Random weights, small widths,
the demo digits as data (1x16x16, 10 classes).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from cpcluster.models.specs import load_denoiser
from routes import certify_and_aggregate, cli, finetune_two_ranks, states_differ
from unet_files import CM_SCHEDULER, save_unet

torch.set_num_threads(1)
SMALL = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
             attention_head_dim=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    plain = save_unet(str(root / "cd_demo"), cpcluster={"kind": "consistency", "grid_steps": 18}, **SMALL)
    pipeline = root / "cd_imagenet_style"
    save_unet(str(pipeline / "unet"), seed=3, num_class_embeds=10, **SMALL)
    os.makedirs(pipeline / "scheduler")
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps(CM_SCHEDULER))
    return {"plain": plain, "pipeline": str(pipeline)}


@pytest.mark.parametrize("which, options", [("plain", "?grid_steps=18&c_noise=openai"), ("pipeline", "")])
def test_finetune_export_certify_aggregate(folders, tmp_path, which, options):
    spec = f"diffusers:{folders[which]}{options}"
    report = cli("inspect", "--denoiser", spec, "--classifier", "demo", "--dataset", "demo", "--sigma", "0.5")
    conditional = which == "pipeline"
    assert ("label_policy: random: the class-conditional denoiser (10 classes)" in report) == conditional

    out = str(tmp_path / "ft")
    output, digests = finetune_two_ranks(spec, out)
    assert len(digests) == 2 and digests[0] == digests[1], output  # DDP: both ranks hold the same weights
    base = load_denoiser(spec)
    tuned = load_denoiser(f"finetuned:{out}/final")
    assert states_differ(base.module.state_dict(), tuned.module.state_dict())  # training changed the weights
    record = json.loads(open(os.path.join(out, "final", "cpcluster.json")).read())
    assert record["architecture"] == "diffusers-unet2d" and record["finetuned"]["base"] == spec
    assert tuned.meta["grid_steps"] == base.meta["grid_steps"] and tuned.meta["num_classes"] == (10 if conditional
                                                                                                  else None)
    # the export is self-contained: it certifies after the base folder is gone
    os.rename(folders[which], folders[which] + ".moved")
    try:
        summary = certify_and_aggregate(f"finetuned:{out}/final", str(tmp_path / "results"), "tuned")
    finally:
        os.rename(folders[which] + ".moved", folders[which])
    (group,) = summary["groups"]
    assert group["images_evaluated"] == 3 and group["sigma"] == 0.5
    shard = next(p for p in os.listdir(tmp_path / "results" / "tuned") if p.endswith(".h5"))
    from cpcluster.core.shards import read_shard

    config = read_shard(str(tmp_path / "results" / "tuned" / shard)).config
    assert config["purifier"]["label_policy"] == ("random" if conditional else None)
    assert config["denoiser"]["sha256"] == record["weights"]["sha256"]


def test_finetune_accepts_spec_options_and_checks_the_path(tmp_path, folders):
    from cpcluster.core.config import FinetuneConfig
    from cpcluster.jobs.finetune import preflight
    from cpcluster.util.errors import InputError

    def config(model, data="demo:train"):
        return FinetuneConfig(model=model, data=data, out=str(tmp_path / "o"), lpips_random_backbone=True,
                              lpips_net="alex")

    preflight(config(f"diffusers:{folders['plain']}?grid_steps=18&c_noise=openai"))
    with pytest.raises(InputError, match="/nowhere does not exist"):
        preflight(config("diffusers:/nowhere?grid_steps=18"))


def test_frozen_loaders_are_made_trainable_and_torchscript_is_refused(folders, tmp_path):
    from cpcluster.jobs.finetune import trainable
    from cpcluster.util.errors import InputError

    den = load_denoiser(f"diffusers:{folders['plain']}")
    assert not any(p.requires_grad for p in den.module.parameters()) and not den.module.training
    net = trainable(den)
    assert all(p.requires_grad for p in net.parameters()) and net.training
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 1, 1)), str(scripted))
    with pytest.raises(InputError, match="TorchScript networks cannot be fine-tuned"):
        trainable(load_denoiser(f"torchscript:{scripted}?kind=consistency"))
