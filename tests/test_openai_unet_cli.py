"""The OpenAI-format route through the CLI: convert -> inspect -> certify -> aggregate, and refused inputs.

The stand-ins are upstream-written ``.pt`` files (tests/data/openai_unet, see openai_unet_files.py); the classifier
and dataset are those of test_models_e2e.py (timm ResNet-18, a CIFAR-10 binary batch).
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.shards import read_shard
from openai_unet_files import set_args, write_pt
from routes import write_cifar_batch

torch.set_num_threads(1)
CLASSIFIER = "timm:resnet18?num_classes=10&mean=cifar10&quantize=uint8"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_batch(root)
    return str(root)


@pytest.mark.parametrize("name, purifier, extra, shown", [
    ("id_uncond", "onestep-ddpm", [], "timestep: 1984"),  # cosine T=4000: first t with sqrt((1-abar)/abar) >= 1
    ("cm", "pf-ode", ["--time-rule", "exact", "--solver-steps", "2"], "times: [1, 0.002, 0]"),
])
def test_upstream_file_converts_inspects_certifies_and_aggregates(tmp_path, cifar, name, purifier, extra, shown):
    net = tmp_path / "net"
    res = cli("convert", "openai-unet", write_pt(name, tmp_path), net, *set_args(name))
    assert res.exit_code == 0, res.output
    assert f"use it as: --denoiser net:{net}" in res.output and "sha256" in res.output
    record = json.loads((net / "cpcluster.json").read_text())
    assert record["architecture"] == "openai-unet" and record["source"]["preset"] == set_args(name)[1][7:]
    common = ["--denoiser", f"net:{net}", "--purifier", purifier, "--sigma", "0.5", *extra]
    res = cli("inspect", *common, "--classifier", CLASSIFIER, "--dataset", f"cifar10:{cifar}")
    assert res.exit_code == 0, res.output
    assert shown in res.output and "architecture: openai-unet" in res.output
    out = tmp_path / "results"
    res = cli("certify", *common, "--classifier", CLASSIFIER, "--dataset", f"cifar10:{cifar}", "--n0", "4",
              "--n", "8", "--block-size", "4", "--draw-batch", "4", "--batch", "8", "--shards", "1",
              "--executor", "debug", "--out", out, "--name", "run")
    assert res.exit_code == 0, res.output
    shard = read_shard(str(next((out / "run").glob("*.h5"))))
    assert shard.complete and shard.config["denoiser"]["sha256"] == record["weights"]["sha256"]
    assert shard.config["purifier"]["kind"] == purifier
    assert shard.counts.sum() == 4 * (4 + 8)
    agg = cli("aggregate", out / "run", "--out", tmp_path / "agg", "--no-plot")
    assert agg.exit_code == 0, agg.output
    tsv = next((tmp_path / "agg").glob("*.tsv")).read_text().strip().splitlines()
    assert len(tsv) == 1 + 4


def _truncated(tmp_path):
    path = write_pt("id_uncond", tmp_path)
    raw = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    return path


def _needs_globals(tmp_path):
    path = str(tmp_path / "namespace.pt")
    torch.save({"time_embed.0.weight": torch.zeros(2, 2), "args": argparse.Namespace(cmd="rm")}, path)
    return path


def _other_architecture(tmp_path):
    from cpcluster.models.specs import load_denoiser

    path = str(tmp_path / "demo.pt")
    torch.save(load_denoiser("demo-random").module.state_dict(), path)
    return path


def _standin(name):
    return lambda tmp_path: write_pt(name, tmp_path)


CIFAR = ["--set", "preset=cifar10_uncond_50M_500K"]


@pytest.mark.parametrize("make, sets, message", [
    (_truncated, set_args("id_uncond"), "cannot be loaded with weights_only=True"),
    (_needs_globals, set_args("id_uncond"), "cannot be loaded with weights_only=True"),
    (_other_architecture, set_args("id_uncond"), "tensor 'time_embed.0.weight' (128, 32) is missing"),
    (_standin("id_uncond"), set_args("id_uncond", "imagenet64_cond_270M_250K"),
     "does not fit preset imagenet64_cond_270M_250K: tensor 'label_emb.weight' (1000, 128) is missing; "
     "its tensors say num_classes=none"),
    (_standin("cm"), set_args("id_cond"), "does not fit preset imagenet64_cond_270M_250K: tensor "
     "'input_blocks.1.0.emb_layers.1.weight' has shape (64, 128), the architecture needs (32, 128); its tensors "
     "say out_channels=3 attention_conv_dims=2 use_scale_shift_norm=true resblock_updown=true "
     "attention_resolutions=1,2"),
    (_standin("id_uncond"), CIFAR,
     "its tensors say model_channels=32 num_res_blocks=1 channel_mult=1,1 attention_resolutions=2 "),
    (_standin("id_uncond"), [], "add --set preset=NAME"),
    (_standin("id_uncond"), ["--set", "preset=cifar10"], "add --set preset=NAME"),
    (_standin("id_uncond"), [*set_args("id_uncond"), "--set", "widht=3"], "unknown --set key 'widht'"),
    (_standin("id_uncond"), [*CIFAR, "--set", "channel_mult=1,x"], "is not an integer"),
    (_standin("cm"), [*set_args("cm"), "--set", "rescale_timesteps=true"], "DDPM presets only"),
    (_standin("id_uncond"), [*CIFAR, "--set", "model_channels=1000000"], "model_channels=1000000"),
    (_standin("id_uncond"), [*CIFAR, "--set", "attention_resolutions=16,8"], "must be downsample rates"),
    (lambda p: str(p / "missing.pt"), set_args("id_uncond"), "no such file"),
])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(tmp_path, make, sets, message):
    out = tmp_path / "out"
    res = cli("convert", "openai-unet", make(tmp_path), out, *sets)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.output
    assert not out.exists()


def test_convert_list_shows_the_presets():
    res = cli("convert", "list")
    assert res.exit_code == 0
    assert "openai-unet:" in res.output and "cd_imagenet64_lpips" in res.output and "--set rescale_timesteps" \
        in res.output
