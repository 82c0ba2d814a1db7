"""Real-format models and data through ``cpcluster certify`` and ``cpcluster aggregate``, end to end.

A diffusers UNet2DModel folder written by the test (consistency config, random weights), a timm classifier with its
input transform, and a CIFAR-10 binary batch written in the official format.
"""
import hashlib
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.shards import read_shard
from routes import write_cifar_batch
from unet_files import DDPM_SCHEDULER, save_unet

pytest.importorskip("cpcluster.cli.certify_cmd")
torch.set_num_threads(1)
CLASSIFIER = "timm:resnet18?num_classes=10&mean=cifar10&quantize=uint8"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    y = np.array([3, 1, 4, 1, 5, 9])
    x = write_cifar_batch(root, y)
    small = dict(sample_size=32, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    cm = save_unet(str(root / "cd_cifar10"), cpcluster={"kind": "consistency", "grid_steps": 18}, **small)
    ddpm = save_unet(str(root / "ddpm_cifar10"), seed=1, scheduler=DDPM_SCHEDULER, **small)
    return {"root": root, "cm": cm, "ddpm": ddpm, "x": x, "y": y}


def shards_of(run_dir):
    return [read_shard(os.path.join(run_dir, n)) for n in sorted(os.listdir(run_dir)) if n.endswith(".h5")]


@pytest.mark.parametrize("purifier, folder, t_key, t_value", [
    ("consistency", "cm", "t_sigma", 1.0882), ("onestep-ddpm", "ddpm", "timestep", None)])
def test_diffusers_folder_certifies_end_to_end(files, tmp_path, purifier, folder, t_key, t_value):
    out = str(tmp_path / "results")
    args = ["certify", "--denoiser", f"diffusers:{files[folder]}", "--classifier", CLASSIFIER,
            "--dataset", f"cifar10:{files['root']}", "--purifier", purifier, "--sigma", "0.5", "--n0", "8",
            "--n", "24", "--block-size", "12", "--draw-batch", "4", "--batch", "24", "--skip", "2", "--shards", "2",
            "--executor", "debug", "--out", out, "--name", "run"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run_dir = os.path.join(out, "run")
    shards = shards_of(run_dir)
    assert len(shards) == 2 and all(s.complete for s in shards)
    config = shards[0].config
    weights = os.path.join(files[folder], "diffusion_pytorch_model.safetensors")
    assert config["denoiser"]["sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert config["classifier"]["spec"] == CLASSIFIER and config["classifier"]["transform"]["quantize"] == "uint8"
    assert config["purifier"]["kind"] == purifier
    if t_value is not None:
        assert config["purifier"][t_key] == pytest.approx(t_value, abs=5e-5)
    else:
        abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
        assert config["purifier"][t_key] == int(np.argmax(np.sqrt((1 - abar) / abar) >= 1.0))
    units = np.concatenate([s.units for s in shards])
    counts = np.concatenate([s.counts for s in shards])
    assert sorted(set(units[:, 0].tolist())) == [0, 2, 4]  # --skip 2 over 6 images
    assert (counts.sum(1) == units[:, 3]).all() and counts.sum() == 3 * (8 + 24)
    labels = {int(i): int(lab) for s in shards for i, lab in zip(s.image_index, s.labels)}
    assert labels == {0: 3, 2: 4, 4: 5}
    agg = CliRunner().invoke(main, ["aggregate", run_dir, "--out", str(tmp_path / "agg"), "--no-plot"],
                             catch_exceptions=False)
    assert agg.exit_code == 0, agg.output
    tsv = [n for n in os.listdir(tmp_path / "agg") if n.endswith(".tsv")]
    rows = (tmp_path / "agg" / tsv[0]).read_text().strip().splitlines()
    assert rows[0].split("\t")[:5] == ["idx", "label", "predict", "radius", "correct"] and len(rows) == 4
