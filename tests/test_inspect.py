"""``cpcluster inspect``: describes what would be loaded, runs no network, reports problems with exit code 2."""
import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cpcluster.cli import main
from cpcluster.models.specs import load_dataset, load_denoiser
from unet_files import CM_SCHEDULER, save_unet

torch.set_num_threads(1)


class Exploding(nn.Module):
    """Any forward pass fails: proves inspect never runs a network."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(7, 3))

    def forward(self, *args):
        raise AssertionError("inspect ran a forward pass")


def exploding():
    return Exploding()


def run(*args):
    result = CliRunner().invoke(main, ["inspect", *args])
    assert "Traceback" not in result.output
    return result


def test_inspect_demo_random_text():
    r = run("--denoiser", "demo-random", "--classifier", "demo-random", "--dataset", "demo", "--sigma", "0.25,0.5",
            "--sigma", "1.0")
    assert r.exit_code == 0, r.output
    for t in ("0.585348", "1.08817", "1.92334"):
        assert f"t_sigma: {t}" in r.output
    den = load_denoiser("demo-random")
    assert f"parameters: {sum(p.numel() for p in den.module.parameters())}" in r.output
    assert f"fingerprint: {load_dataset('demo').fingerprint}" in r.output
    assert "type: cpu" in r.output and "problems: none" in r.output


def test_inspect_json_real_folder_timm_and_npz(tmp_path):
    folder = save_unet(str(tmp_path / "cd"), scheduler=CM_SCHEDULER, num_class_embeds=10)
    x = np.random.default_rng(0).integers(0, 256, (12, 3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12) % 10)
    clf = "timm:resnet18?num_classes=10&resize=32&interp=bicubic&mean=imagenet&quantize=uint8"
    r = run("--denoiser", f"diffusers:{folder}", "--classifier", clf, "--dataset", f"npz:{tmp_path}/d.npz",
            "--sigma", "0.25,0.5,1.0", "--purifier-label", "random", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert [row["t_sigma"] for row in rep["purifier"]["per_sigma"]] == pytest.approx([0.4700, 1.0717, 1.7672],
                                                                                    abs=5e-5)
    assert all(row["label_policy"] == "random" for row in rep["purifier"]["per_sigma"])
    weights = open(f"{folder}/diffusion_pytorch_model.safetensors", "rb").read()
    assert rep["denoiser"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert rep["denoiser"]["grid_steps"] == 40 and rep["denoiser"]["num_classes"] == 10
    transform = rep["classifier"]["transform"]
    assert transform["resize"] == [32, 32] and transform["quantize"] == "uint8"
    assert rep["classifier"]["parameters"] > 10_000_000 and rep["dataset"]["size"] == 12
    assert rep["problems"] == []


def test_inspect_never_runs_a_network():
    r = run("--denoiser", "python:test_inspect:exploding?kind=consistency&grid_steps=18",
            "--classifier", "python:test_inspect:exploding", "--dataset", "demo", "--sigma", "0.5")
    assert r.exit_code == 0, r.output
    assert "parameters: 21" in r.output


def test_inspect_reports_problems_with_exit_2(tmp_path):
    np.savez(tmp_path / "five.npz", x=np.zeros((5, 1, 16, 16), np.uint8), y=np.arange(5))
    r = run("--denoiser", "demo-random:conditional", "--classifier", "demo-random", "--dataset",
            f"npz:{tmp_path}/five.npz", "--sigma", "0.5", "--purifier-label", "fixed:12")
    assert r.exit_code == 2
    assert "dataset has 5 classes but the classifier outputs 10" in r.output and "fixed:K" in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: 2 problem(s)")


@pytest.mark.parametrize("args, message", [
    (["--denoiser", "nope:x"], "unknown kind 'nope'"),
    (["--classifier", "timm:resnet18?colour=1"], "unknown option 'colour'"),
    (["--sigma", "0"], "positive"),
    (["--dataset", "cifar10:/no/such/dir"], "no test_batch.bin"),
    (["--purifier", "onestep-ddpm"], "not a DDPM noise predictor")])
def test_inspect_bad_input_one_line(args, message):
    base = {"--denoiser": "demo-random", "--classifier": "demo-random", "--dataset": "demo", "--sigma": "0.5"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    r = run(*[v for kv in base.items() for v in kv])
    assert r.exit_code == 2 and message in r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("Error:")


def test_inspect_time_rules_and_purifier_none(tmp_path):
    folder = save_unet(str(tmp_path / "nogrid"))
    spec = f"diffusers:{folder}?kind=consistency"
    r = run("--denoiser", spec, "--classifier", "demo-random", "--dataset", "", "--sigma", "0.5")
    assert r.exit_code == 2 and "--time-rule exact" in r.output
    r = run("--denoiser", spec, "--classifier", "demo-random", "--dataset", "", "--sigma", "0.5", "--time-rule", "exact",
            "--json")
    assert r.exit_code == 0 and json.loads(r.output)["purifier"]["per_sigma"][0]["t_sigma"] == 1.0
    r = run("--purifier", "none", "--denoiser", "nope:ignored", "--classifier", "demo-random", "--dataset", "demo",
            "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 0 and rep["denoiser"] is None and [row["sigma"] for row in rep["purifier"]["per_sigma"]] == [
        0.25, 0.5, 1.0]


def test_inspect_help_has_runnable_example():
    r = CliRunner().invoke(main, ["inspect", "--help"])
    assert r.exit_code == 0 and "cpcluster inspect --denoiser demo-random" in r.output
