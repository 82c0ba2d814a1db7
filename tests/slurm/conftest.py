"""Live-SLURM tests: they run against the cluster that `make test-slurm` starts (cpcluster/cluster/slurm-up.sh).

Without a reachable cluster (``sinfo`` fails) they are skipped, unless ``CPCLUSTER_REQUIRE_SLURM=1`` (set by
`make test-slurm`), where a missing cluster is an error: CI must not pass by skipping.
"""
import os

import cloudpickle
import pytest

import slurm_probes
from cpcluster.orchestrate.slurm_jobs import slurm_reachable

# the jobs run in a fresh interpreter that cannot import this test folder: ship the probes by value
cloudpickle.register_pickle_by_value(slurm_probes)


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster():
    if not slurm_reachable():
        if os.environ.get("CPCLUSTER_REQUIRE_SLURM") == "1":
            pytest.fail("no SLURM cluster reachable (sinfo failed) although CPCLUSTER_REQUIRE_SLURM=1")
        pytest.skip("no SLURM cluster reachable (sinfo failed): run `make test-slurm`")


@pytest.fixture
def logs(tmp_path):
    """submitit's folder for one test (the test cluster's nodes share this machine's filesystem)."""
    return str(tmp_path / "logs" / "%j")
