"""cpcluster.util.dist: single-process defaults, env-var launch, and two gloo ranks under submitit's LocalExecutor."""
import os
import sys
import time

import cloudpickle
import pytest

from cpcluster.util import dist

LAUNCH_VARS = ("SUBMITIT_EXECUTOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    dist.shutdown()
    yield monkeypatch
    dist.shutdown()


def test_defaults_before_init(clean_env, capsys):
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.is_main()) == (0, 1, 0, True)
    dist.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    dist.barrier()
    with dist.main_first():
        pass
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]


def test_single_process_init_creates_no_process_group(clean_env):
    import torch
    import torch.distributed as tdist

    info = dist.init("cpu")
    assert (info.source, info.world_size, info.backend, info.device) == ("single", 1, None, "cpu")
    assert dist.init("cpu") is info  # idempotent
    assert not tdist.is_initialized()
    t = torch.tensor([2.0])
    assert dist.all_reduce_sum(t) is t and t.item() == 2.0
    dist.shutdown()
    assert dist.info() == dist.DistInfo()


def test_env_vars_launch_with_one_rank(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    info = dist.init("cpu")
    assert info.source == "env" and info.world_size == 1 and info.backend is None


def test_cuda_requested_without_cuda_fails(clean_env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="cuda"):
        dist.init("cuda")


def _two_rank_worker(marker: str) -> dict:
    """Runs on each rank of a 2-task local submitit job."""
    import torch

    info = dist.init("cpu")
    try:
        order = []
        with dist.main_first():
            # rank 0 runs this block alone first; rank 1 must see what it did
            if dist.is_main():
                time.sleep(0.5)
                with open(marker, "w") as fh:
                    fh.write("rank0")
            order.append(os.path.exists(marker))
        total = dist.all_reduce_sum(torch.tensor([float(dist.rank() + 1)]))
        gathered = dist.all_gather_object(("rank", dist.rank()))
        dist.barrier()
        return {"info": info, "saw_marker": order[0], "sum": total.item(), "gathered": gathered,
                "port": int(os.environ["MASTER_PORT"])}
    finally:
        dist.shutdown()


def test_two_gloo_ranks_through_submitit(tmp_path):
    import submitit

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test module is not importable in the job
    try:
        executor = submitit.LocalExecutor(folder=str(tmp_path / "logs"))
        executor.update_parameters(tasks_per_node=2, timeout_min=3)
        job = executor.submit(_two_rank_worker, str(tmp_path / "marker"))
        results = job.results()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert [r["info"].rank for r in results] == [0, 1]
    for r in results:
        assert (r["info"].world_size, r["info"].backend, r["info"].source) == (2, "gloo", "submitit")
        assert r["saw_marker"] is True  # main_first: rank 1 entered after rank 0 finished
        assert r["sum"] == 3.0
        assert r["gathered"] == [("rank", 0), ("rank", 1)]
        assert r["port"] == dist.rendezvous_port(job.job_id)  # both ranks, from the job id


def test_rendezvous_ports_stay_below_the_ephemeral_range_and_depend_on_the_job_only():
    ports = [dist.rendezvous_port(f"{job}_{task}") for job in range(1000, 1200) for task in range(5)]
    assert all(20000 <= p <= 32767 for p in ports)  # Linux's ephemeral ports start at 32768
    assert len(set(ports)) > 900  # spread out: two jobs on one node rarely pick the same port
    assert dist.rendezvous_port("1234_5") == dist.rendezvous_port("1234_5")
