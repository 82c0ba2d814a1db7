"""A 2-node job across the two slurmd nodes, with torch.distributed (gloo) through submitit."""
import functools
import json
import subprocess

import pytest

import slurm_probes
from cpcluster.orchestrate.slurm import SlurmOptions, make_executor
from cpcluster.orchestrate.slurm_arrays import submit_array
from cpcluster.util.dist import rendezvous_port

pytestmark = pytest.mark.slurm


def _node_count():
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout
    return len(set(out.split()))


def _two_node_job(tmp_path, logs, probe, name):
    """Submit ``probe(out)`` as one job of 2 nodes x 1 task (5-minute limit); return (job, out folder)."""
    if _node_count() < 2:
        pytest.skip("needs a cluster with 2 nodes (make test-slurm starts NODES=2)")
    out = tmp_path / "out"
    out.mkdir()
    ex = make_executor(logs, SlurmOptions(nodes=2, tasks_per_node=1, time_min=5, job_name=name))
    (job,) = submit_array(ex, [functools.partial(probe, str(out))])
    return job, out


def test_two_node_gloo_all_reduce(tmp_path, logs):
    job, out = _two_node_job(tmp_path, logs, slurm_probes.ddp_probe, "cpc-test-ddp")
    results = job.results()  # one per rank
    reports = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and results == reports
    assert {r["node"] for r in reports} == {"n1", "n2"}  # really on both slurmd nodes
    assert all(r["world_size"] == 2 and r["master_addr"] == reports[0]["node"] for r in reports)
    assert all(r["backend"] == "gloo" and r["master_port"] == rendezvous_port(job.job_id) for r in reports)
    assert [r["all_reduce_sum"] for r in reports] == [3.0, 3.0]  # (0 + 1) + (1 + 1)
    assert all(r["nodes_seen"] == [reports[0]["node"], reports[1]["node"]] for r in reports)


def test_a_rank_that_dies_ends_the_job_instead_of_leaving_the_others_waiting(tmp_path, logs):
    """srun --kill-on-bad-exit: rank 1 raises, and rank 0 is killed at once rather than at the 5-minute limit."""
    job, out = _two_node_job(tmp_path, logs, slurm_probes.rank_one_dies, "cpc-test-dies")
    with pytest.raises(Exception, match="rank 1 fails on purpose|has not produced any output"):
        job.results()
    assert (out / "rank-0-working.json").exists() and not (out / "rank-0-done.json").exists()
    assert job.state == "FAILED"  # not TIMEOUT: nothing waited for the time limit
