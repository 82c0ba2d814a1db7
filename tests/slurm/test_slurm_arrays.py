"""Arrays on the live cluster: split above MaxArraySize and complete; refused submissions; job records."""
import functools
import json
import os
import subprocess
import time

import pytest

import slurm_probes
from cpcluster.orchestrate.slurm import SlurmOptions, make_executor
from cpcluster.orchestrate.slurm_arrays import cluster_max_array_size, submit_array
from cpcluster.orchestrate.slurm_dryrun import render_sbatch
from cpcluster.orchestrate.slurm_jobs import read_jobs, record_jobs
from cpcluster.util.errors import InputError

pytestmark = pytest.mark.slurm
OPTS = SlurmOptions(time_min=5, array_parallelism=3, job_name="cpc-test-array")


def _sacct_states(job_ids):
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("|")[:2] for line in out.splitlines() if line)


def test_array_larger_than_max_array_size_is_split_and_completes(tmp_path, logs):
    max_size = cluster_max_array_size()
    if max_size > 50:
        pytest.skip(f"MaxArraySize is {max_size}: needs the low limit that `make test-slurm` sets")
    n = 2 * max_size + 2  # two full arrays and a third of two tasks
    out = tmp_path / "out"
    out.mkdir()
    ex = make_executor(logs, OPTS)
    jobs = submit_array(ex, [functools.partial(slurm_probes.write_task, str(out), i) for i in range(n)])
    arrays = [j.job_id.split("_")[0] for j in jobs]
    assert len(set(arrays)) == 3 and [len([a for a in arrays if a == b]) for b in dict.fromkeys(arrays)] == [
        max_size, max_size, 2]
    assert [j.result() for j in jobs] == list(range(n))

    reports = [json.loads((out / f"task-{i}.json").read_text()) for i in range(n)]
    assert [(r["array_job_id"], r["array_task_id"]) for r in reports] == [tuple(j.job_id.split("_")) for j in jobs]
    # what went to sbatch is what --dry-run shows
    submitted = [open(os.path.join(os.path.dirname(logs), a, f"{a}_submission.sh")).read()
                 for a in dict.fromkeys(arrays)]
    assert submitted == render_sbatch(OPTS, n, logs)
    assert f"#SBATCH --array=0-{max_size - 1}%1" in submitted[0]  # 3 running tasks over 3 arrays

    # records point at real jobs that accounting (sacct) knows as completed
    run = str(tmp_path / "run")
    record_jobs(run, jobs, tags=[{"shard": i} for i in range(n)])
    records = read_jobs(run)
    assert [r["shard"] for r in records] == list(range(n))
    # accounting reaches slurmdbd a little after the jobs end: poll
    deadline, states = time.monotonic() + 60, {}
    while {states.get(r["job_id"]) for r in records} != {"COMPLETED"} and time.monotonic() < deadline:
        time.sleep(1)
        states = _sacct_states(sorted(set(arrays)))
    assert {r["job_id"]: states.get(r["job_id"]) for r in records} == {r["job_id"]: "COMPLETED" for r in records}


def test_one_array_above_max_array_size_is_what_sbatch_refuses(tmp_path, logs):
    max_size = cluster_max_array_size()
    if max_size > 50:
        pytest.skip(f"MaxArraySize is {max_size}: needs the low limit that `make test-slurm` sets")
    ex = make_executor(logs, OPTS)
    n = max_size + 1
    with pytest.raises(InputError, match="Invalid job array specification"):
        submit_array(ex, [functools.partial(slurm_probes.write_task, str(tmp_path), i) for i in range(n)],
                     max_array_size=n)


def test_unknown_partition_carries_slurms_message(tmp_path, logs):
    ex = make_executor(logs, SlurmOptions(partition="no-such-partition", time_min=5))
    with pytest.raises(InputError) as info:
        submit_array(ex, [functools.partial(slurm_probes.write_task, str(tmp_path), 0)])
    message = str(info.value)
    assert "\n" not in message
    assert "invalid partition specified: no-such-partition" in message
    assert "Invalid partition name specified" in message
    assert "no-such-partition" not in subprocess.run(["squeue", "-h", "-o", "%P"], capture_output=True,
                                                     text=True).stdout
