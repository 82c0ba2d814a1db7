"""``cpcluster certify --executor slurm``, ``status`` and ``resubmit`` on the live cluster (`make test-slurm`).

* 8 shards (more than the test cluster's MaxArraySize of 5: two arrays) complete, with the counts and the
  aggregate of a local run; the scripts submitted are those ``--dry-run`` printed;
* shards requeued from outside (``scontrol requeue``), preempted (``scancel --batch --signal=USR2``) and
  cancelled (``scancel``: ``status`` says failed, ``resubmit`` finishes it) end with the counts of an
  uninterrupted run, each unit once;
* an unknown partition is SLURM's message in one line; a run folder holding another configuration is refused.
"""
import os
import subprocess
import time

import pytest
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.shards import read_shard, shard_name
from cpcluster.orchestrate.slurm_arrays import cluster_max_array_size
from cpcluster.orchestrate.slurm_jobs import read_jobs
from cpcluster.orchestrate.status import collect
from cpcluster.sharding.arrays import split_array

pytestmark = pytest.mark.slurm
MODELS = ["--denoiser", "demo-random", "--classifier", "demo-random", "--device", "cpu", "--time-min", "10"]
SMALL = [*MODELS, "--max-images", "8", "--n0", "20", "--n", "200", "--block-size", "100", "--draw-batch", "20",
         "--batch", "100", "--sigma", "0.5"]
# one image per shard, about 12 s of work each when 4 run at once on the 2-core test machine
SLOW = [*MODELS, "--max-images", "4", "--n0", "100", "--n", "6000", "--block-size", "500", "--draw-batch", "20",
        "--batch", "100", "--sigma", "0.25"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def wait_for(run_dir, predicate, what, timeout=240):
    """Poll the run's status (files + SLURM) until ``predicate(status)``; return that status."""
    deadline = time.monotonic() + timeout
    while True:
        (status,) = collect([run_dir])
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {[s.state for s in status.shards]}"
        time.sleep(0.5)


def all_complete(status):
    return status.count("complete") == len(status.shards)


def merged(run_dir):
    """{(image, stream, block): (n_draws, counts)} over the run's shard files; a unit in two files fails."""
    out = {}
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("shard-") and n.endswith(".h5"))
    for name in names:
        shard = read_shard(os.path.join(run_dir, name))
        assert shard.complete
        for unit, counts in zip(shard.units.tolist(), shard.counts.tolist()):
            assert tuple(unit[:3]) not in out, f"unit {unit} counted twice"
            out[tuple(unit[:3])] = (unit[3], counts)
    return out


def aggregate(run_dir, out):
    res = cli("aggregate", run_dir, "--out", out, "--no-plot")
    assert res.exit_code == 0, res.output
    tsv = {n: open(os.path.join(out, n)).read() for n in os.listdir(out) if n.endswith(".tsv")}
    table = res.stdout.split("\nCost (device time spent counting")[0]  # the measured cost differs per run
    return table, tsv


def test_eight_shards_on_slurm_equal_a_local_run(tmp_path):
    out = tmp_path / "slurm"
    run_dir = str(out / "certify-consistency-sigma0.5")
    dry = cli("certify", *SMALL, "--shards", 8, "--executor", "slurm", "--out", out, "--dry-run")
    assert dry.exit_code == 0, dry.output
    res = cli("certify", *SMALL, "--shards", 8, "--executor", "slurm", "--out", out)
    assert res.exit_code == 0, res.output
    assert "submitted 8 shard jobs" in res.output

    records = read_jobs(run_dir)
    assert [r["shard"] for r in records] == list(range(8))
    arrays = list(dict.fromkeys(r["job_id"].split("_")[0] for r in records))
    chunks = split_array(8, cluster_max_array_size())
    assert len(arrays) == len(chunks)  # MaxArraySize 5 under `make test-slurm`: arrays of 5 and 3
    submitted = [open(os.path.join(run_dir, "logs", a, f"{a}_submission.sh")).read().rstrip("\n") for a in arrays]
    printed = dry.output.split("dry run: nothing")[0].split("----- sbatch script ")[1:]
    assert [p.split(" -----\n", 1)[1].rstrip("\n") for p in printed] == submitted

    wait_for(run_dir, all_complete, "8 shards to complete")
    res = cli("status", run_dir)
    assert res.exit_code == 0 and "8 complete;" in res.output and "SLURM: reachable" in res.output

    local = tmp_path / "local"
    res = cli("certify", *SMALL, "--shards", 3, "--executor", "debug", "--out", local)
    assert res.exit_code == 0, res.output
    local_dir = str(local / "certify-consistency-sigma0.5")
    assert merged(run_dir) == merged(local_dir)
    assert len(merged(run_dir)) == 8 * 3  # 8 images x (selection + 2 estimation blocks)
    assert aggregate(run_dir, str(tmp_path / "agg-slurm")) == aggregate(local_dir, str(tmp_path / "agg-local"))

    # the same folder with another configuration: refused before anything is submitted
    res = cli("certify", *SMALL, "--shards", 8, "--seed", 1, "--executor", "slurm", "--out", out)
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "holds another run (different seed)" in res.output
    assert len(read_jobs(run_dir)) == 8


def test_unknown_partition_is_slurms_message_in_one_line(tmp_path):
    res = cli("certify", *SMALL, "--shards", 2, "--executor", "slurm", "--partition", "no-such-partition",
              "--out", tmp_path)
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and res.output.endswith(errors[0] + "\n"), res.output  # one line, the last
    assert errors[0].startswith("Error: SLURM refused the job: ")
    assert "invalid partition specified: no-such-partition" in errors[0]
    assert read_jobs(str(tmp_path / "certify-consistency-sigma0.5")) == []
    queued = subprocess.run(["squeue", "-h", "-o", "%P"], capture_output=True, text=True).stdout
    assert "no-such-partition" not in queued


def _units_recorded(run_dir, k, total):
    from cpcluster.core.journal import read_journal

    state = read_journal(os.path.join(run_dir, shard_name(k, total)) + ".journal")
    return 0 if state is None else len(state.units)


def test_requeued_preempted_and_cancelled_shards_end_with_the_counts_of_an_uninterrupted_run(tmp_path):
    out = tmp_path / "slurm"
    run_dir = str(out / "certify-consistency-sigma0.25")
    res = cli("certify", *SLOW, "--shards", 4, "--executor", "slurm", "--out", out)
    assert res.exit_code == 0, res.output
    jobs = {r["shard"]: r["job_id"] for r in read_jobs(run_dir)}
    interrupts = {0: ["scontrol", "requeue"], 1: ["scancel", "--batch", "--signal=USR2"], 2: ["scancel"]}
    # Interrupt each shard as soon as it has 2 units recorded (of 13), polling all three together: the shards
    # run in parallel, so waiting on one before looking at the next let a later one finish before its interrupt.
    pending = dict(interrupts)
    deadline = time.monotonic() + 120
    while pending:
        for k in list(pending):
            assert not os.path.exists(os.path.join(run_dir, shard_name(k, 4))), f"shard {k} finished too early"
            if _units_recorded(run_dir, k, 4) >= 2:
                subprocess.run([*pending.pop(k), jobs[k]], check=True, capture_output=True)
        assert time.monotonic() < deadline, f"shards {sorted(pending)} made no progress"
        time.sleep(0.05)

    # the cancelled shard shows as failed (exit code 1); the others carry on
    status = wait_for(run_dir, lambda s: s.shards[2].state == "failed", "the cancelled shard to show as failed",
                      timeout=60)
    assert status.shards[2].slurm_state == "CANCELLED" and status.shards[2].units_done >= 2
    assert all(s.state != "failed" for s in status.shards if s.index != 2)
    res = cli("status", run_dir)
    assert res.exit_code == 1 and f"failed: shard 2 (job {jobs[2]} CANCELLED" in res.output
    res = cli("resubmit", run_dir, "--executor", "slurm")
    assert res.exit_code == 0, res.output
    assert "1 shard(s) to rerun (2)" in res.output and "submitted 1 shard jobs" in res.output

    # the uninterrupted reference, computed here while the requeued shards wait to restart
    reference = tmp_path / "uninterrupted"
    res = cli("certify", *SLOW, "--shards", 1, "--executor", "debug", "--out", reference)
    assert res.exit_code == 0, res.output

    wait_for(run_dir, all_complete, "every shard to complete")
    assert cli("status", run_dir).exit_code == 0
    res = cli("resubmit", run_dir)
    assert res.exit_code == 0 and "nothing to resubmit" in res.output
    records = read_jobs(run_dir)
    assert len(records) == 5 and records[-1]["shard"] == 2 and records[-1]["job_id"] != jobs[2]
    for k in interrupts:  # each interrupted shard continued from its journal instead of starting over
        assert read_shard(os.path.join(run_dir, shard_name(k, 4))).shard["resumed_units"] >= 2
    log = os.path.join(run_dir, "logs", jobs[1], f"{jobs[1]}_0_log.out")
    assert "Caught signal SIGUSR2" in open(log).read()  # the preempted shard went through checkpoint()
    assert merged(run_dir) == merged(str(reference / "certify-consistency-sigma0.25"))
