"""Cost accounting: every certify shard records its device time per unit, the device and the network evaluations
per draw; aggregate adds them up per row (duplicates once), reports device-hours and draws/s, and plots accuracy
against cost per image."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cpcluster.core import runs
from cpcluster.orchestrate import rundir
from cpcluster.aggregate.pipeline import run_aggregate
from cpcluster.cli import main
from cpcluster.core.config import AggregateOptions, CertifyConfig
from cpcluster.core.journal import read_journal
from cpcluster.core.shard_writer import ShardWriter
from cpcluster.core.shards import read_shard
from cpcluster.jobs.certify import CertifyShardJob
from cpcluster.util.errors import InputError


def _config(run_dir, **kw):
    base = dict(sigma=0.5, run_dir=str(run_dir), num_shards=3, n0=20, n=100, block_size=50, draw_batch=10,
                batch=50, max_images=4, denoiser="demo-random", classifier="demo-random", threads=1, device="cpu")
    return CertifyConfig(**{**base, **kw})


def _certify(cfg):
    run = runs.resolve(cfg, runs.load_models(cfg))
    rundir.prepare_run_dir(run)
    return [read_shard(CertifyShardJob(cfg, k)()) for k in range(cfg.num_shards)]


def test_shards_record_device_seconds_per_unit_and_the_cost_of_a_draw(tmp_path):
    shards = _certify(_config(tmp_path / "c"))
    for s in shards:
        cost = s.shard["cost"]
        assert cost["device_type"] == "cpu" and cost["nfe_per_draw"] == {"purifier": 1, "classifier": 1}
        assert cost["threads"] == 1 and cost["device_name"]
        assert s.seconds.shape == (len(s.units),) and (s.seconds > 0).all()
        # the units' seconds are the session's counting time, cut at unit completions
        assert 0.5 * s.shard["seconds"] <= s.seconds.sum() <= 1.01 * s.shard["seconds"] + 0.01
        assert s.shard["device_seconds"] == pytest.approx(s.seconds.sum(), rel=1e-12)
    none = _certify(_config(tmp_path / "n", purifier="none", num_shards=1))
    assert none[0].shard["cost"]["nfe_per_draw"] == {"purifier": 0, "classifier": 1}


def test_cost_adds_up_across_shards_and_counts_duplicates_once(tmp_path):
    shards = _certify(_config(tmp_path / "run"))
    shutil.copy(shards[1].path, tmp_path / "run" / "copy-of-shard-1.h5")  # an identical duplicate
    out = tmp_path / "agg"
    res = CliRunner().invoke(main, ["aggregate", str(tmp_path / "run" / "*.h5"), "--out", str(out),
                                    "--cost-radius", "0.1"])
    assert res.exit_code == 0, res.output
    cost = json.loads((out / "summary.json").read_text())["groups"][0]["cost"]
    seconds = sum(float(s.seconds.sum()) for s in shards)
    draws = sum(int(s.units[:, 3].sum()) for s in shards)
    assert cost["device_seconds"] == pytest.approx(seconds, rel=1e-12)
    assert cost["device_hours"] == pytest.approx(seconds / 3600, rel=1e-12)
    assert cost["draws"] == draws == 4 * 120 and cost["images"] == 4
    assert cost["draws_per_s"] == pytest.approx(draws / seconds, rel=1e-12)
    assert cost["device_seconds_per_image"] == pytest.approx(seconds / 4, rel=1e-12)
    assert cost["device_types"] == ["cpu"] and cost["nfe_per_draw"] == {"purifier": 1, "classifier": 1}
    table = res.stdout
    assert "Cost (device time spent counting" in table and f"| {seconds / 3600:.4g} | 480 |" in table
    csv = (out / "cost.csv").read_text().splitlines()
    assert csv[0].startswith("method,sigma,mode,device_types,device_hours") and len(csv) == 2
    assert float(csv[1].split(",")[4]) == pytest.approx(seconds / 3600, rel=1e-12)
    assert os.path.getsize(out / "cost.png") > 1000


def test_resumed_shard_keeps_the_seconds_of_its_first_session(tmp_path):
    cfg = _config(tmp_path / "r", num_shards=1)
    run = runs.resolve(cfg, runs.load_models(cfg))
    rundir.prepare_run_dir(run)
    first = run.plan.shard_units(0)[0]
    w = ShardWriter(run.shard_url(0), config=run.shard_config, shard_info={}, image_index=run.plan.shard_images(0),
                    labels=run.labels, num_classes=10)
    counts = np.zeros(10, dtype=np.int64)
    counts[3] = first[3]
    w.append(first, counts, seconds=12.5)
    w.close()
    assert read_journal(w.journal_path).seconds.tolist() == [12.5]
    shard = read_shard(CertifyShardJob(cfg, 0)())
    assert shard.seconds[0] == 12.5 and (shard.seconds[1:] > 0).all()
    assert shard.shard["device_seconds"] == pytest.approx(shard.seconds.sum())


def test_no_cost_without_timing_and_bad_cost_radius(tmp_path):
    from synth import class_probs, make_config, plan_units, simulate_counts, write_split

    cfg = make_config(0.5)
    units = plan_units(cfg, range(6))
    probs = class_probs(6, 4, seed=0)
    write_split(tmp_path / "s", cfg, units, simulate_counts(units, probs, seed=1), probs.argmax(1), 2)
    res = run_aggregate(AggregateOptions(paths=(str(tmp_path / "s"),)))
    assert "Cost" not in res.table and not any(p.endswith(("cost.csv", "cost.png")) for p in res.written)
    assert json.loads(open(tmp_path / "s" / "aggregate" / "summary.json").read())["groups"][0]["cost"][
        "device_seconds"] is None
    with pytest.raises(InputError, match="--cost-radius"):
        AggregateOptions(paths=("x",), cost_radius=float("nan"))
    res = CliRunner().invoke(main, ["aggregate", str(tmp_path / "s"), "--cost-radius", "abc"])
    assert res.exit_code == 2 and res.stderr.startswith("Error: --cost-radius 'abc'")
