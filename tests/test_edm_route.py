"""The EDM route end to end: EDM pickle -> convert -> inspect -> certify (onestep-edm, pf-ode) -> aggregate.

The pickle is the conditional DDPM++ reference case in EDM's persistence layout (tests/edm_files.py); the network
is convolutional, so its 8x8 training resolution runs on the 32x32 CIFAR-10 batch written here. The pickle is
deleted after conversion: inspect and certify read only the network folder.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.shards import read_shard
from edm_files import write_edm_pickle
from routes import write_cifar_batch
from test_models_e2e import CLASSIFIER

torch.set_num_threads(1)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm-route")
    write_cifar_batch(root)
    pkl = write_edm_pickle(str(root / "edm-cifar10-32x32-cond-vp.pkl"), "ddpmpp-cond")
    converted = cli("convert", "edm-pickle", pkl, root / "edm-net")
    assert converted.exit_code == 0, converted.output
    os.remove(pkl)
    common = ["--denoiser", f"net:{root / 'edm-net'}", "--classifier", CLASSIFIER,
              "--dataset", f"cifar10:{root}", "--purifier-label", "random", "--time-rule", "exact"]
    return {"root": root, "common": common}


@pytest.mark.parametrize("purifier, steps, times", [("onestep-edm", [], None),
                                                    ("pf-ode", ["--solver-steps", "2"], [1.0, 0.002, 0.0])])
def test_inspect_shows_the_edm_purifiers(setup, purifier, steps, times):
    result = cli("inspect", *setup["common"], "--purifier", purifier, *steps, "--sigma", "0.25,0.5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["denoiser"]["kind"] == "edm" and report["denoiser"]["preconditioned"] is True
    assert report["denoiser"]["num_classes"] == 10 and report["problems"] == []
    rows = report["purifier"]["per_sigma"]
    assert [r["t_sigma"] for r in rows] == pytest.approx([0.5, 1.0]) and rows[0]["label_policy"] == "random"
    if times:
        assert rows[1]["times"] == pytest.approx(times)
    nearest = cli("inspect", *setup["common"][:-2], "--purifier", purifier, *steps, "--sigma", "0.5")
    assert nearest.exit_code == 2 and nearest.output.startswith("Error: ") and "--time-rule exact" in nearest.output


def test_pf_ode_walks_the_rest_of_the_grid_of_a_converted_edm_pickle(setup):
    """--solver-steps grid on the converted NVlabs-format network with grid_steps=18 (the paper's PF-ODE EDM): from
    the grid point nearest 2 sigma along every later point of the 18-point Karras grid, then 0."""
    i = np.arange(18)
    grid = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    common = ["--denoiser", f"net:{setup['root'] / 'edm-net'}?grid_steps=18", *setup["common"][2:-2]]
    result = cli("inspect", *common, "--purifier", "pf-ode", "--solver-steps", "grid", "--sigma", "0.25,0.5,1.0",
                 "--json")
    assert result.exit_code == 0, result.output
    for sigma, row in zip((0.25, 0.5, 1.0), json.loads(result.output)["purifier"]["per_sigma"]):
        start = int(np.argmin(np.abs(grid - 2 * sigma)))
        assert row["time_rule"] == "nearest" and row["steps"] == 18 - start
        assert row["times"] == pytest.approx([*grid[start:], 0.0], rel=1e-5)


def test_certify_and_aggregate_both_rows(setup, tmp_path):
    out = tmp_path / "results"
    weights = setup["root"] / "edm-net" / "model.safetensors"
    for purifier, steps in (("onestep-edm", []), ("pf-ode", ["--solver-steps", "2"])):
        result = cli("certify", *setup["common"], "--purifier", purifier, *steps, "--sigma", "0.5", "--n0", "8",
                     "--n", "16", "--block-size", "8", "--draw-batch", "4", "--batch", "16", "--shards", "2",
                     "--executor", "debug", "--out", out, "--name", f"{purifier}-sigma{{sigma}}")
        assert result.exit_code == 0, result.output
        run_dir = out / f"{purifier}-sigma0.5"
        shards = [read_shard(str(run_dir / n)) for n in sorted(os.listdir(run_dir)) if n.endswith(".h5")]
        assert len(shards) == 2 and all(s.complete for s in shards)
        config = shards[0].config
        assert config["purifier"]["kind"] == purifier and config["purifier"]["t_sigma"] == pytest.approx(1.0)
        assert config["purifier"]["label_policy"] == "random"
        assert config["denoiser"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        counts = np.concatenate([s.counts for s in shards])
        assert counts.sum() == 4 * (8 + 16)
    agg = cli("aggregate", out / "onestep-edm-sigma0.5", out / "pf-ode-sigma0.5", "--out", tmp_path / "agg",
              "--no-plot")
    assert agg.exit_code == 0, agg.output
    table = (tmp_path / "agg" / "table.md").read_text()
    assert "onestep-edm" in table and "pf-ode" in table
    tsvs = sorted(n for n in os.listdir(tmp_path / "agg") if n.endswith(".tsv"))
    assert len(tsvs) == 2
    for name in tsvs:
        rows = (tmp_path / "agg" / name).read_text().strip().splitlines()
        assert rows[0].split("\t")[:5] == ["idx", "label", "predict", "radius", "correct"] and len(rows) == 5
