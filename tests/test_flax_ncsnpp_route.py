"""The CIFAR-10 CP route on the jcm stand-in: convert -> inspect -> certify -> aggregate, through the CLI.

The stand-in (tests/data/flax_ncsnpp) is jcm's NCSN++ at small width written by jcm itself; images are a CIFAR-10
binary batch in the official format; the classifier a random timm ResNet-18 (nothing downloaded).
"""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.shards import read_shard
from routes import write_cifar_batch

torch.set_num_threads(1)
CHECKPOINT = os.path.join(os.path.dirname(__file__), "data", "flax_ncsnpp", "checkpoint_80")
CLASSIFIER = "timm:resnet18?num_classes=10&mean=cifar10&quantize=uint8"
T_SIGMA = {0.25: 0.5853, 0.5: 1.0882, 1.0: 1.9233}  # DESIGN.md: the 18-point grid of the CIFAR-10 CD model


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    write_cifar_batch(root)
    net = root / "cd_cifar10"
    res = invoke("convert", "flax-ncsnpp", CHECKPOINT, net)
    assert res.exit_code == 0, res.output
    assert "ncsnpp: 157 tensors" in res.output and f"--denoiser net:{net}" in res.output
    return {"root": root, "net": net}


def test_inspect_shows_the_grid_times_and_the_network(files):
    res = invoke("inspect", "--denoiser", f"net:{files['net']}", "--classifier", CLASSIFIER,
                 "--dataset", f"cifar10:{files['root']}", "--sigma", "0.25,0.5,1.0", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["problems"] == []
    den = report["denoiser"]
    assert (den["architecture"], den["kind"], den["c_noise"], den["grid_steps"]) == ("ncsnpp", "consistency",
                                                                                      "jax", 18)
    assert den["source"]["format"] == "flax-ncsnpp" and den["source"]["weights"] == "params_ema"
    got = {row["sigma"]: row["t_sigma"] for row in report["purifier"]["per_sigma"]}
    assert got == pytest.approx(T_SIGMA, abs=5e-5)


def test_certify_and_aggregate(files, tmp_path):
    out = tmp_path / "results"
    res = invoke("certify", "--denoiser", f"net:{files['net']}", "--classifier", CLASSIFIER,
                 "--dataset", f"cifar10:{files['root']}", "--sigma", "0.5", "--n0", "4", "--n", "12",
                 "--block-size", "6", "--draw-batch", "2", "--batch", "12", "--max-images", "2", "--shards", "2",
                 "--executor", "debug", "--out", out, "--name", "run")
    assert res.exit_code == 0, res.output
    run_dir = out / "run"
    shards = [read_shard(str(run_dir / n)) for n in sorted(os.listdir(run_dir)) if n.endswith(".h5")]
    assert len(shards) == 2 and all(s.complete for s in shards)
    config = shards[0].config
    assert config["purifier"]["kind"] == "consistency"
    assert config["purifier"]["t_sigma"] == pytest.approx(T_SIGMA[0.5], abs=5e-5)
    assert config["denoiser"]["spec"] == f"net:{files['net']}"
    weights = json.loads((files["net"] / "cpcluster.json").read_text())["weights"]["sha256"]
    assert config["denoiser"]["sha256"] == weights
    counts = np.concatenate([s.counts for s in shards])
    assert counts.sum() == 2 * (4 + 12)
    agg = invoke("aggregate", run_dir, "--out", tmp_path / "agg", "--no-plot")
    assert agg.exit_code == 0, agg.output
    tsv = [n for n in os.listdir(tmp_path / "agg") if n.endswith(".tsv")]
    rows = (tmp_path / "agg" / tsv[0]).read_text().strip().splitlines()
    assert rows[0].split("\t")[:5] == ["idx", "label", "predict", "radius", "correct"] and len(rows) == 3
