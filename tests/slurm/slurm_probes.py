"""Small picklable jobs for the live-SLURM tests (pickled by value: the jobs do not import this module).

Every job writes what it did to files under ``out`` so that tests check the outcome on disk, the way cpcluster's
real jobs report.
"""
from __future__ import annotations

import json
import os
import socket
import time

import submitit


def write_task(out: str, index: int) -> int:
    """One array task: write ``task-<index>.json`` with where it ran; return ``index``."""
    record = {
        "index": index,
        "node": os.environ.get("SLURMD_NODENAME"),
        "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "job_id": os.environ.get("SLURM_JOB_ID"),
    }
    _write_json(os.path.join(out, f"task-{index}.json"), record)
    return index


def ddp_probe(out: str) -> dict:
    """Two-node gloo job through cpcluster.util.dist: each rank reports where it runs, the rendezvous it used and the
    all_reduce of ``rank + 1`` over all ranks."""
    import torch
    import torch.distributed as tdist

    from cpcluster.util import dist

    torch.set_num_threads(1)
    info = dist.init("cpu")
    try:
        value = dist.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
        gathered = dist.all_gather_object(os.environ.get("SLURMD_NODENAME"))
        backend = tdist.get_backend()
    finally:
        dist.shutdown()
    record = {
        "rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank, "backend": backend,
        "master_addr": os.environ["MASTER_ADDR"], "master_port": int(os.environ["MASTER_PORT"]),
        "node": os.environ.get("SLURMD_NODENAME"), "hostname": socket.gethostname(),
        "all_reduce_sum": value.item(), "nodes_seen": gathered,
    }
    _write_json(os.path.join(out, f"rank-{info.rank}.json"), record)
    return record


def rank_one_dies(out: str) -> None:
    """Two-node job in which rank 1 raises right after the rendezvous while rank 0 works on for 10 minutes."""
    from cpcluster.util import dist

    info = dist.init("cpu")
    if info.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    _write_json(os.path.join(out, "rank-0-working.json"), {"pid": os.getpid()})
    time.sleep(600)
    _write_json(os.path.join(out, "rank-0-done.json"), {})


class StepJob(submitit.helpers.Checkpointable):
    """Does ``steps`` steps of ``step_s`` seconds; each finished step is appended (fsynced) to ``steps.log``.

    It resumes from ``steps.log`` -- what it wrote to disk -- whether it was requeued by submitit's USR2 handler
    (through :meth:`checkpoint`) or restarted from scratch by ``scontrol requeue``. Every start is logged to
    ``starts.log`` with the number of steps found done, so a test can see the resumption.
    """

    def __init__(self, out: str, steps: int, step_s: float):
        self.out, self.steps, self.step_s = out, steps, step_s

    def __call__(self) -> int:
        done = self._done()
        _append(os.path.join(self.out, "starts.log"),
                f"{done} {os.environ.get('SLURM_JOB_ID')} {os.environ.get('SLURM_RESTART_COUNT', '0')}")
        for step in range(done, self.steps):
            time.sleep(self.step_s)
            _append(os.path.join(self.out, "steps.log"), str(step))
        return self.steps

    def _done(self) -> int:
        path = os.path.join(self.out, "steps.log")
        if not os.path.exists(path):
            return 0
        with open(path) as fh:
            return len([line for line in fh if line.strip()])

    def checkpoint(self, *args, **kwargs):
        # the state is on disk already; resubmit the same (stateless) callable
        return submitit.helpers.DelayedSubmission(type(self)(self.out, self.steps, self.step_s))


def _append(path: str, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_json(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)
