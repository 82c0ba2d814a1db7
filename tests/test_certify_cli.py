"""``cpcluster certify`` end to end: sharding invariance, run-directory rules, bad input, executors."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.shards import read_shard

SMALL = ["--denoiser", "demo-random", "--classifier", "demo-random", "--max-images", "8", "--n0", "20",
         "--n", "200", "--block-size", "100", "--draw-batch", "20", "--batch", "100"]


def certify(*args):
    return CliRunner().invoke(main, ["certify", *args], catch_exceptions=False)


def merged_counts(run_dir):
    """{(image, stream, block): counts} over every shard file of a run, refusing duplicated units."""
    out = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("shard-") and name.endswith(".h5"):
            shard = read_shard(os.path.join(run_dir, name))
            assert shard.complete
            for unit, counts in zip(shard.units, shard.counts):
                key = tuple(int(v) for v in unit[:3])
                assert key not in out, f"unit {key} counted twice"
                out[key] = counts.tolist()
    return out


def test_shard_count_changes_nothing_in_the_counts_or_the_aggregate(tmp_path):
    results = {}
    for shards in (1, 3, 8):
        out = str(tmp_path / f"s{shards}")
        res = certify(*SMALL, "--sigma", "0.5", "--shards", str(shards), "--executor", "debug", "--out", out)
        assert res.exit_code == 0, res.output
        run_dir = os.path.join(out, "certify-consistency-sigma0.5")
        assert len([n for n in os.listdir(run_dir) if n.endswith(".h5")]) == shards
        agg = CliRunner().invoke(main, ["aggregate", run_dir, "--out", str(tmp_path / f"agg{shards}"),
                                        "--no-plot"], catch_exceptions=False)
        assert agg.exit_code == 0, agg.output
        tsv = [n for n in os.listdir(tmp_path / f"agg{shards}") if n.endswith(".tsv")]
        table, cost = agg.stdout.split("\nCost (device time spent counting")  # the measured cost differs per run
        assert "| 1,760 |" in cost  # ... and it counts every draw of the run once
        results[shards] = (merged_counts(run_dir), table,
                           {n: (tmp_path / f"agg{shards}" / n).read_text() for n in tsv})
    counts1, table1, tsv1 = results[1]
    assert len(counts1) == 8 * 3 and {k[0] for k in counts1} == set(range(8))
    assert sum(sum(c) for c in counts1.values()) == 8 * 220
    for shards in (3, 8):
        assert results[shards][0] == counts1
        assert results[shards][1] == table1
        assert results[shards][2] == tsv1


def test_run_directory_resumes_refuses_and_overwrites(tmp_path):
    out = str(tmp_path / "r")
    run_dir = os.path.join(out, "certify-consistency-sigma0.5")
    assert certify(*SMALL, "--sigma", "0.5", "--shards", "2", "--executor", "debug", "--out", out).exit_code == 0
    files = {n: os.stat(os.path.join(run_dir, n)).st_mtime_ns for n in os.listdir(run_dir) if n.endswith(".h5")}
    record = json.loads(open(os.path.join(run_dir, "run.json")).read())
    assert record["num_shards"] == 2 and record["certify_config"]["n"] == 200
    assert record["config_hash"] == read_shard(os.path.join(run_dir, sorted(files)[0])).config_hash

    again = certify(*SMALL, "--sigma", "0.5", "--shards", "2", "--executor", "debug", "--out", out)
    assert again.exit_code == 0 and "resume, 2 of 2 shards complete" in again.output
    assert {n: os.stat(os.path.join(run_dir, n)).st_mtime_ns for n in files} == files, "nothing recomputed"

    for change, why in ((["--shards", "2", "--seed", "1"], "different seed"),
                        (["--shards", "3"], "planned with 2 shards")):
        res = certify(*SMALL, "--sigma", "0.5", "--executor", "debug", "--out", out, *change)
        assert res.exit_code == 2 and why in res.output and "--overwrite" in res.output
        assert res.output.strip().count("\n") == 0
        assert {n: os.stat(os.path.join(run_dir, n)).st_mtime_ns for n in files} == files

    with open(os.path.join(run_dir, "run.json"), "w") as fh:
        fh.write("[1, 2]")
    res = certify(*SMALL, "--sigma", "0.5", "--shards", "2", "--executor", "debug", "--out", out)
    assert res.exit_code == 2 and "run record is damaged" in res.output

    res = certify(*SMALL, "--sigma", "0.5", "--shards", "3", "--seed", "1", "--executor", "debug", "--out", out,
                  "--overwrite")
    assert res.exit_code == 0, res.output
    names = sorted(n for n in os.listdir(run_dir) if n.endswith(".h5"))
    assert names == [f"shard-0000{k}-of-00003.h5" for k in range(3)]
    assert all(read_shard(os.path.join(run_dir, n)).config["seed"] == 1 for n in names)


@pytest.mark.parametrize("args,message", [
    (["--sigma", "0"], "--sigma 0.0: must be a positive"),
    (["--sigma", "-0.5"], "--sigma -0.5: must be a positive"),
    (["--sigma", "0.5", "--n0", "0"], "--n0 0: must be an integer >= 1"),
    (["--sigma", "0.5", "--n", "0"], "--n 0: must be an integer >= 1"),
    (["--sigma", "0.5", "--shards", "0"], "--shards 0: must be an integer >= 1"),
    (["--sigma", "0.5", "--shards", "25"], "more than the 24 work units"),
    (["--sigma", "0.5", "--max-images", "0"], "--max-images 0: must be at least 1"),
    (["--sigma", "0.5", "--dataset", "nosuch"], "--dataset 'nosuch': unknown kind"),
    (["--sigma", "0.5", "--denoiser", "nosuch:x"], "--denoiser 'nosuch:x': unknown kind"),
    (["--sigma", "0.5", "--classifier", "nosuch"], "--classifier 'nosuch': unknown kind"),
    (["--sigma", "0.5", "--block-size", "90"], "not a multiple of --draw-batch 20"),
    (["--sigma", "0.5", "--indices", "3,600"], "image 600 is outside"),
    (["--sigma", "0.5", "--early-stop", "0.5"], "--early-stop 0.5: give the largest alpha"),
    (["--sigma", "0.5", "--early-stop", "0.01", "--mode", "predict"], "--early-stop needs --mode certify"),
    (["--sigma", "0.5", "--early-stop", "0.01", "--shards", "9"], "every shard holds whole images; use 1 to 8"),
    (["--sigma", "0.5", "--n", "40000000", "--draw-batch", "1", "--block-size", "1"], "at most 33554432 noise"),
    ([], "--sigma is required"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = certify(*SMALL, "--executor", "debug", "--out", str(out), *args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.output
    assert not out.exists()


def test_unreadable_checkpoint_and_unwritable_output(tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a torchscript archive")
    res = certify(*SMALL, "--sigma", "0.5", "--classifier", f"torchscript:{garbage}?num_classes=10",
                  "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "not a TorchScript archive" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = certify(*SMALL, "--sigma", "0.5", "--denoiser", f"torchscript:{tmp_path / 'missing.pt'}",
                  "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "no such file" in res.output
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = certify(*SMALL, "--sigma", "0.5", "--executor", "debug", "--out", str(blocker / "sub"))
    assert res.exit_code == 2 and "not a writable folder" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    res = certify(*SMALL, "--sigma", "0.25", "--sigma", "0.5", "--shards", "3", "--dry-run",
                  "--out", str(tmp_path / "d"), "--executor", "local")
    assert res.exit_code == 0, res.output
    assert "executor: local (as requested)" in res.output
    assert res.output.count("images 8, units 24, draws 1,760, shards 3: draws per shard") == 2
    assert "device-hours" in res.output and "draws/s measured here (cpu" in res.output
    assert not (tmp_path / "d").exists()


def test_auto_executor_says_why_it_runs_locally(monkeypatch):
    import shutil

    from cpcluster.orchestrate.submit import choose_executor

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert choose_executor("auto") == ("local", "auto: no SLURM here (sbatch is not on PATH)")
    assert choose_executor("debug") == ("debug", "as requested")


def test_predict_mode_and_several_sigmas_through_the_local_executor(tmp_path):
    """Real subprocesses through submitit's LocalExecutor; PREDICT has estimation units only."""
    out = str(tmp_path / "loc")
    res = certify("--denoiser", "demo-random", "--classifier", "demo-random", "--max-images", "2", "--n", "120",
                  "--block-size", "60", "--draw-batch", "20", "--batch", "60", "--mode", "predict",
                  "--sigma", "0.25", "--sigma", "0.5", "--executor", "local", "--workers", "2", "--out", out)
    assert res.exit_code == 0, res.output
    assert "executor: local (as requested), 2 shard(s) at a time" in res.output
    assert f"cpcluster aggregate {out}/predict-consistency-sigma0.25 {out}/predict-consistency-sigma0.5" in res.output
    for sigma in ("0.25", "0.5"):
        counts = merged_counts(os.path.join(out, f"predict-consistency-sigma{sigma}"))
        assert sorted(counts) == [(i, 1, b) for i in range(2) for b in range(2)]
        shard = read_shard(os.path.join(out, f"predict-consistency-sigma{sigma}", "shard-00000-of-00001.h5"))
        assert shard.config["mode"] == "predict" and shard.config["n0"] == 0
        assert shard.config["sigma"] == float(sigma) and shard.shard["rng_device"] == "cpu"
        assert np.all(shard.counts.sum(1) == shard.units[:, 3])


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_a_failing_shard_job_is_reported_in_one_line(tmp_path, executor):
    """A shard another process holds makes its job fail; the command names the shard and the reason, exit 2."""
    import fcntl

    out = tmp_path / "f"
    args = ["--denoiser", "demo-random", "--classifier", "demo-random", "--max-images", "1", "--n", "40",
            "--block-size", "20", "--draw-batch", "20", "--batch", "20", "--sigma", "0.5", "--out", str(out),
            "--executor", executor]
    assert certify(*args, "--dry-run").exit_code == 0
    run_dir = out / "certify-consistency-sigma0.5"
    run_dir.mkdir(parents=True)
    with open(run_dir / "shard-00000-of-00001.h5.journal.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = certify(*args)
    assert res.exit_code == 2, res.output
    error = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "another process is running this shard" in error[0]
    if executor == "local":
        assert "sigma=0.5 shard=0: job failed" in error[0]
    assert not (run_dir / "shard-00000-of-00001.h5").exists()


def test_slurm_submission_gets_one_array_per_run_and_records_job_ids(tmp_path, monkeypatch):
    """The SLURM path up to sbatch: which shards are submitted, with which options, and what is recorded."""
    import types

    import cpcluster.orchestrate.submit
    from cpcluster.jobs.certify import CertifyShardJob
    from cpcluster.orchestrate.slurm_jobs import read_jobs

    calls = []

    def fake_submit(tasks, options):
        calls.append((list(tasks), options))
        return [types.SimpleNamespace(job_id=f"{100 + len(calls)}_{k}", paths=types.SimpleNamespace(
            folder=tasks[k].folder)) for k in range(len(tasks))]

    monkeypatch.setattr(cpcluster.orchestrate.submit, "submit_slurm", fake_submit)
    out = str(tmp_path / "s")
    res = certify(*SMALL, "--sigma", "0.25", "--sigma", "0.5", "--shards", "3", "--executor", "slurm",
                  "--partition", "gpu", "--array-parallelism", "2", "--out", out)
    assert res.exit_code == 0, res.output
    assert "submitted 3 shard jobs" in res.output and "SLURM job(s) 101" in res.output
    assert "when the jobs have finished: cpcluster aggregate" in res.output
    assert len(calls) == 2
    for (tasks, options), sigma in zip(calls, (0.25, 0.5)):
        assert [t.fn.shard_index for t in tasks] == [0, 1, 2]
        assert all(isinstance(t.fn, CertifyShardJob) and t.fn.config.sigma == sigma for t in tasks)
        assert tasks[0].folder.endswith(f"certify-consistency-sigma{sigma:g}/logs/%j")
        assert options.partition == "gpu" and options.gpus_per_node == 1 and options.array_parallelism == 2
    records = read_jobs(os.path.join(out, "certify-consistency-sigma0.5"))
    assert [(r["job_id"], r["shard"], r["sigma"]) for r in records] == [(f"102_{k}", k, 0.5) for k in range(3)]


@pytest.mark.parametrize("args, message", [
    (["certify", "--shards", "abc"], "Error: Invalid value for '--shards': 'abc' is not a valid integer. "
                                     "(see 'cpcluster certify --help')"),
    (["certify", "--bogus"], "Error: No such option '--bogus'"),
    (["certfy"], "Error: No such command 'certfy'. (see 'cpcluster --help')"),
    (["aggregate"], "Error: Missing argument 'PATHS...'. (see 'cpcluster aggregate --help')"),
])
def test_click_usage_errors_are_one_line_with_the_help_to_read(args, message):
    res = CliRunner().invoke(main, args, prog_name="cpcluster")
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith(message), res.output
