"""``cpcluster status``, ``cpcluster resubmit``, ``cpcluster certify --executor slurm --dry-run`` (golden sbatch
scripts) and ``cpcluster aggregate`` on an unfinished run, without a cluster (fake squeue, fake submission)."""
import json
import os
import sys

import pytest
from click.testing import CliRunner
from test_status import (SHARDS, SMALL, SlurmJob, fake_slurm, lock_holder, make_partial,  # noqa: F401 (fixtures)
                         record, reference, run_dir, shard_path)

from cpcluster.cli import main
from cpcluster.core.shards import read_shard
from cpcluster.orchestrate.slurm_jobs import record_jobs

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "certify-dry-run-sbatch.txt")


def cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def merged(run_dir):
    """{(image, stream, block): counts} over the run's shard files; a unit in two files fails the test."""
    out = {}
    for k in range(SHARDS):
        shard = read_shard(shard_path(run_dir, k))
        for unit, counts in zip(shard.units.tolist(), shard.counts.tolist()):
            assert tuple(unit[:3]) not in out, f"unit {unit} counted twice"
            out[tuple(unit[:3])] = (unit[3], counts)
    return out


# ------------------------------------------------------------------------------------------------ status
def test_status_table_json_and_exit_codes(run_dir):
    res = cli("status", run_dir)
    assert res.exit_code == 0, res.output
    assert f"run {run_dir}  (config " in res.output and f"{SHARDS} complete;" in res.output
    assert res.output.count(" complete ") == SHARDS  # one row per shard
    res = cli("status", run_dir, "--json", "--no-slurm")
    data = json.loads(res.output)
    assert data["states"]["complete"] == SHARDS and data["eta_s"] == 0 and len(data["shards"]) == SHARDS

    with open(shard_path(run_dir, 2), "r+b") as fh:
        fh.truncate(64)
    res = cli("status", run_dir)
    assert res.exit_code == 1
    assert "failed: shard 2 (shard file unreadable" in res.output


def test_status_of_several_runs_and_bad_folders(run_dir, tmp_path):
    res = cli("status", run_dir, run_dir, "--all")
    assert res.exit_code == 0 and res.output.count(f"run {run_dir}") == 2
    res = cli("status", str(tmp_path / "nowhere"))
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "no run.json" in res.output


def test_help_shows_runnable_examples():
    for command in ("status", "resubmit"):
        res = cli(command, "--help")
        assert res.exit_code == 0 and f"cpcluster {command} results/" in res.output


# ---------------------------------------------------------------------------------------------- resubmit
def test_resubmit_completes_missing_and_partial_shards_with_identical_counts(run_dir, reference):
    os.remove(shard_path(run_dir, 1))
    partial, _ = make_partial(run_dir, 3, units=2)
    untouched = {k: os.stat(shard_path(run_dir, k)).st_mtime_ns for k in (0, 2, 4)}
    res = cli("resubmit", run_dir, "--executor", "debug")
    assert res.exit_code == 0, res.output
    assert "2 shard(s) to rerun (1, 3); 3 complete" in res.output
    assert merged(run_dir) == merged(reference)
    assert read_shard(shard_path(run_dir, 3)).shard["resumed_units"] == 2  # continued from its journal
    assert {k: os.stat(shard_path(run_dir, k)).st_mtime_ns for k in (0, 2, 4)} == untouched
    res = cli("resubmit", run_dir, "--executor", "debug")
    assert res.exit_code == 0 and "nothing to resubmit" in res.output


def test_resubmit_to_slurm_sends_only_dead_shards_and_records_them(run_dir, fake_slurm, monkeypatch):
    import cpcluster.orchestrate.submit

    calls = []

    def fake_submit(tasks, options):
        calls.append(([t.fn.shard_index for t in tasks], options))
        return [SlurmJob(f"{600 + len(calls)}_{k}", t.folder) for k, t in enumerate(tasks)]

    monkeypatch.setattr(cpcluster.orchestrate.submit, "submit_slurm", fake_submit)
    for k in (1, 2, 3, 4):
        os.remove(shard_path(run_dir, k))
    submitted = {"partition": "gpu", "account": None, "time_min": 30, "array_parallelism": 2,
                 "sbatch_extra": ["mail-type=END"]}  # what certify records with each job
    record_jobs(run_dir, [SlurmJob(f"500_{k}") for k in range(SHARDS)],
                [{"shard": k, "sigma": 0.5, "submit": submitted} for k in range(SHARDS)])
    fake_slurm.answer("squeue", "500_0|COMPLETED|None\n500_1|RUNNING|None\n500_2|PENDING|Priority\n"
                                "500_3|FAILED|NonZeroExitCode\n500_4|CANCELLED|None\n")

    res = cli("resubmit", run_dir, "--executor", "slurm", "--dry-run")
    assert res.exit_code == 0 and "2 shard(s) to rerun (3-4); 1 complete, 1 running, 1 pending" in res.output
    assert calls == []
    res = cli("resubmit", run_dir, "--executor", "slurm")
    assert res.exit_code == 0, res.output
    (shards, options), = calls
    assert shards == [3, 4]  # never the running, pending or complete ones
    assert (options.partition, options.time_min, options.array_parallelism, options.extra) == (
        "gpu", 30, 2, (("mail-type", "END"),))  # as last submitted
    assert options.gpus_per_node is None  # --device cpu
    latest = [json.loads(line) for line in open(os.path.join(run_dir, "jobs.jsonl"))][-2:]
    assert [(r["job_id"], r["shard"]) for r in latest] == [("601_0", 3), ("601_1", 4)]

    fake_slurm.answer("squeue", "500_0|COMPLETED|None\n500_1|RUNNING|None\n500_2|PENDING|Priority\n"
                                "601_0|PENDING|Priority\n601_1|FAILED|None\n")
    res = cli("resubmit", run_dir, "--executor", "slurm", "--partition", "long", "--time-min", "90")
    assert res.exit_code == 0, res.output
    assert calls[-1][0] == [4] and (calls[-1][1].partition, calls[-1][1].time_min) == ("long", 90)


def test_resubmit_refuses_when_slurm_cannot_tell_running_from_dead(run_dir, fake_slurm):
    os.remove(shard_path(run_dir, 1))
    record(run_dir, [1])
    fake_slurm.answer("squeue", "", rc=1, err="slurm_load_jobs error: Unable to contact slurm controller")
    res = cli("resubmit", run_dir, "--executor", "debug")
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "does not answer from here" in res.output
    assert not os.path.exists(shard_path(run_dir, 1))


@pytest.mark.parametrize("damage, message", [
    (lambda r: "{not json", "run record is damaged"),
    (lambda r: json.dumps({**r, "certify_config": {**r["certify_config"], "n": "many"}}), "cannot be read"),
    (lambda r: json.dumps({**r, "shard_config": {**r["shard_config"], "seed": 3}, "config_hash": "0" * 64}),
     "no longer matches what its config resolves to (different seed"),
])
def test_resubmit_refuses_unreadable_or_outdated_run_records(run_dir, damage, message):
    os.remove(shard_path(run_dir, 4))
    path = os.path.join(run_dir, "run.json")
    record_ = json.load(open(path))
    with open(path, "w") as fh:
        fh.write(damage(record_))
    res = cli("resubmit", run_dir, "--executor", "debug")
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and message in res.output
    assert not os.path.exists(shard_path(run_dir, 4))


# ------------------------------------------------------------------------------------- certify --dry-run
def test_certify_slurm_dry_run_prints_the_sbatch_scripts(tmp_path, monkeypatch):
    import cpcluster.orchestrate.slurm_arrays

    monkeypatch.setattr(cpcluster.orchestrate.slurm_arrays, "cluster_max_array_size", lambda timeout_s=20.0: 5)
    out = tmp_path / "d"
    res = cli("certify", *SMALL, "--sigma", "0.5", "--shards", "7", "--executor", "slurm", "--dry-run",
              "--partition", "gpu", "--account", "proj42", "--time-min", "30", "--array-parallelism", "4",
              "--sbatch", "mail-type=END", "--out", str(out))
    assert res.exit_code == 0, res.output
    scripts = res.output[res.output.index("----- sbatch script 1"):res.output.index("dry run: nothing")]
    text = scripts.replace(str(tmp_path), "<tmp>").replace(sys.executable, "<python>")
    if os.environ.get("CPCLUSTER_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as fh:
            fh.write(text)
    with open(GOLDEN) as fh:
        assert text == fh.read(), "sbatch scripts changed; rerun with CPCLUSTER_UPDATE_GOLDEN=1 if intended"
    assert text.count("#SBATCH --array=") == 2  # 7 shards, MaxArraySize 5: arrays of 5 and 2
    assert not out.exists()


# ----------------------------------------------------------------------------------- aggregate unfinished
def test_aggregate_says_what_is_missing_from_an_unfinished_run(run_dir, tmp_path):
    os.remove(shard_path(run_dir, 2))
    res = cli("aggregate", run_dir, "--no-plot", "--out", str(tmp_path / "agg"))
    assert res.exit_code == 0
    assert "1 shard file(s) absent (index 2)" in res.stderr and "cpcluster status RUN_DIR" in res.stderr
    for k in range(SHARDS):
        if k != 2:
            os.remove(shard_path(run_dir, k))
    res = cli("aggregate", run_dir)
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert f"unfinished certify run, none of its {SHARDS} shard files is written yet" in res.output
    assert f"cpcluster status {run_dir}" in res.output



def test_overwrite_is_refused_while_jobs_of_the_old_run_still_run_or_wait(run_dir, fake_slurm, lock_holder):
    out = os.path.dirname(run_dir)
    for k in (1, 2):
        make_partial(run_dir, k, units=1)
    replace = ["certify", *SMALL, "--sigma", "0.5", "--shards", str(SHARDS), "--seed", "7", "--overwrite",
               "--executor", "debug", "--out", out]
    record(run_dir, [1, 2])
    before = {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir)}
    fake_slurm.answer("squeue", "500_1|RUNNING|None\n500_2|PENDING|Priority\n")
    res = CliRunner().invoke(main, replace)
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert f"--overwrite {run_dir}: shard(s) 1, 2 of the run it holds are still running or queued; cancel them " \
           "(scancel 500_1 500_2) first" in res.output
    assert {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir)} == before  # untouched

    # SLURM says they ended, but a process on this machine still holds shard 3's lock
    fake_slurm.answer("squeue", "500_1|COMPLETED|None\n500_2|COMPLETED|None\n")
    os.remove(shard_path(run_dir, 3))
    lock_holder(shard_path(run_dir, 3) + ".journal.lock")
    res = CliRunner().invoke(main, replace)
    assert res.exit_code == 2 and "shard(s) 3 of the run it holds are still running or queued; stop that run" \
        in res.output, res.output
