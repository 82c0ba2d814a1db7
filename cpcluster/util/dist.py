"""The one distributed helper: process-group set-up and rank queries (after NVlabs/edm ``torch_utils/distributed``).

:func:`init` finds out how the process was launched, in this order:

1. inside a submitit job (``SUBMITIT_EXECUTOR`` set: SLURM, local or debug executor):
   ``submitit.helpers.TorchDistributedEnvironment`` exports ``MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK``,
   the port being :func:`rendezvous_port` of the job id unless ``MASTER_PORT`` is set already;
2. ``RANK`` and ``WORLD_SIZE`` already in the environment (torchrun and friends);
3. otherwise a single process.

With more than one rank it calls ``torch.distributed.init_process_group`` (``nccl`` on CUDA, ``gloo`` on CPU);
with one rank it creates no process group at all, so single-process runs need no free port. Every query below
works in all three cases (rank 0 of 1 when nothing was initialised). Nothing happens at import.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` of ``local_world_size`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # "gloo" | "nccl" | None (single process)
    device: str = "cpu"  # "cpu" or "cuda:<local index>"
    source: str = "single"  # "submitit" | "env" | "single"


_INFO: DistInfo | None = None

# Rendezvous ports lie below Linux's default ephemeral range (32768-60999), from which every outgoing connection on
# the node (srun, slurmstepd, ...) takes its local port. submitit's own choice (20000-60000 from the job id) lands
# there 70% of the time, and rank 0 then fails with EADDRINUSE while the other ranks wait for it.
RENDEZVOUS_PORTS = (20000, 32767)


def rendezvous_port(job_id: str) -> int:
    """The TCP port rank 0 of job ``job_id`` listens on: the same on every rank and every requeue of the job."""
    low, high = RENDEZVOUS_PORTS
    digest = hashlib.sha256(str(job_id).encode()).digest()
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def _launch_env() -> tuple[str, int, int, int, int]:
    """(source, rank, world_size, local_rank, local_world_size) from submitit, the environment, or neither."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(rendezvous_port(JobEnvironment().job_id))
        env = TorchDistributedEnvironment()
        if env.world_size > 1:
            env.export(set_cuda_visible_devices=False, overwrite=True)
        return "submitit", env.rank, env.world_size, env.local_rank, env.local_world_size
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return "env", int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), local_world
    return "single", 0, 1, 0, 1


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Set up this process's rank, device and (for world size > 1) the process group; idempotent.

    Parameters
    ----------
    device : ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``. With CUDA each rank uses GPU
        ``local_rank % device_count`` and the backend is ``nccl``; on CPU the backend is ``gloo``.
    timeout_s : collective timeout; a rank that waits longer (a dead peer) raises instead of hanging forever.
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    import torch

    source, rank_, world, local_rank_, local_world = _launch_env()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device on this node")
    dev = "cpu"
    if use_cuda:
        index = local_rank_ % torch.cuda.device_count()
        torch.cuda.set_device(index)
        dev = f"cuda:{index}"
    backend = None
    if world > 1:
        import torch.distributed as tdist

        backend = "nccl" if use_cuda else "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend, init_method="env://", rank=rank_, world_size=world,
                                     timeout=datetime.timedelta(seconds=timeout_s))
    _INFO = DistInfo(rank_, world, local_rank_, local_world, backend, dev, source)
    return _INFO


def shutdown() -> None:
    """Destroy the process group (if any) and forget the set-up; safe to call more than once."""
    global _INFO
    if _INFO is not None and _INFO.backend is not None:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
    _INFO = None


def info() -> DistInfo:
    """The current set-up; a single-process default before :func:`init`."""
    return _INFO or DistInfo()


def rank() -> int:
    return info().rank


def world_size() -> int:
    return info().world_size


def local_rank() -> int:
    return info().local_rank


def is_main() -> bool:
    """True on global rank 0, the one rank that logs and writes files."""
    return info().rank == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushed, so it reaches submitit's log files promptly)."""
    if is_main():
        print(*args, **{"flush": True, **kwargs})


def barrier() -> None:
    """Wait for every rank (no-op with one rank)."""
    if info().backend is not None:
        import torch.distributed as tdist

        if info().backend == "nccl":
            tdist.barrier(device_ids=[int(info().device.split(":")[1])])
        else:
            tdist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. to create a folder or fill a cache); the others run it after."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def all_reduce_sum(tensor):
    """In-place sum of ``tensor`` over all ranks (no-op with one rank); returns it."""
    if info().backend is not None:
        import torch.distributed as tdist

        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` with one rank)."""
    if info().backend is None:
        return [obj]
    import torch.distributed as tdist

    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out
