"""Where array jobs run: choosing the executor, and running them locally or in-process with a progress hook.

Executors (``--executor``):

* ``slurm``: one job array per run through submitit (:mod:`cpcluster.orchestrate.slurm` builds the executor, splits arrays
  above ``MaxArraySize`` and records job ids); the command returns once the arrays are queued.
* ``local``: submitit's :class:`LocalExecutor`, one subprocess per shard, at most ``workers`` at a time (one per
  GPU, or one on a CPU-only machine), each pinned to its own GPU; the command waits for them.
* ``debug``: submitit's :class:`DebugExecutor`, the shards one after the other inside this process.
* ``auto``: ``slurm`` when ``sbatch`` is on PATH and the controller answers (``sinfo``), else ``local``.

The choice and its reason are returned by :func:`choose_executor` so the command can print them; it never
happens silently.
"""
from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from cpcluster.core.choices import EXECUTORS, check_choice
from cpcluster.util.errors import InputError

LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # local jobs are not time-limited in practice
POLL_S = 0.5


def choose_executor(requested: str) -> tuple[str, str]:
    """``(executor, reason)`` for ``--executor requested`` (``auto`` looks for a reachable SLURM)."""
    check_choice("--executor", requested, EXECUTORS)
    if requested != "auto":
        return requested, "as requested"
    if shutil.which("sbatch") is None:
        return "local", "auto: no SLURM here (sbatch is not on PATH)"
    from cpcluster.orchestrate.slurm_jobs import slurm_reachable

    if not slurm_reachable():
        return "local", "auto: sbatch is on PATH but the SLURM controller does not answer (sinfo)"
    return "slurm", "auto: sbatch is on PATH and the SLURM controller answers"


def refuse_process_local(out: str, kind: str) -> None:
    """InputError for an ``--out`` that only this process can see (``memory://``) when jobs run in other processes
    (every executor but ``debug``): they would write where nobody reads, and nothing would be kept."""
    from cpcluster.util.fileio import process_local

    if kind != "debug" and process_local(out, "--out"):
        raise InputError(f"--out {out}: lives in this process's memory, but the {kind} executor runs the jobs in "
                         "other processes, and nothing would be kept; give a folder or a shared URL (s3://, gs://, "
                         "...), or --executor debug to run them in this process")


@dataclass(frozen=True)
class Task:
    """One array task: a picklable callable, submitit's log folder for it, and tags for the job record."""

    fn: Callable
    folder: str
    tags: dict


def _failure(job, task: Task) -> InputError:
    """The last line of a failed job's traceback (usually ``...InputError: <message>``) as one InputError."""
    err = job.exception()
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    trace = [line for line in lines if not line.startswith(("You can check", "or at paths", "- /"))]
    last = trace[-1] if trace else type(err).__name__
    last = last.split("InputError: ", 1)[-1]
    what = " ".join(f"{k}={v}" for k, v in task.tags.items()) or "job"
    return InputError(f"{what}: job failed: {last} (logs in {task.folder})")


def run_local(tasks: Sequence[Task], *, workers: int = 1, gpus: int = 0, poll: Callable[[], None] | None = None,
              setup: Sequence[str] = ()) -> list:
    """Run ``tasks`` through submitit's LocalExecutor, at most ``workers`` at once; return their results in order.

    With ``gpus > 0`` each running task sees one GPU of its own (``CUDA_VISIBLE_DEVICES``), so ``workers`` should
    not exceed ``gpus``. ``poll()`` is called about twice a second. The first failed task stops the submission
    of new ones; the running ones are waited for, then an :class:`InputError` names the failure. Ctrl-C cancels
    the running tasks (their recorded progress stays on disk) and re-raises.
    """
    import submitit

    executors: dict[str, submitit.LocalExecutor] = {}
    queue = list(enumerate(tasks))
    running: dict[int, tuple] = {}  # slot -> (position, job, task)
    results: list = [None] * len(tasks)
    failure = None
    try:
        while queue or running:
            for slot in [s for s, (_, job, _) in running.items() if job.done()]:
                pos, job, task = running.pop(slot)
                if job.exception() is not None:
                    failure = failure or _failure(job, task)
                else:
                    results[pos] = job.result()
            while queue and failure is None and len(running) < max(1, workers):
                pos, task = queue.pop(0)
                ex = executors.get(task.folder)
                if ex is None:
                    ex = executors[task.folder] = submitit.LocalExecutor(folder=task.folder)
                    ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, setup=list(setup))
                slot = next(s for s in range(max(1, workers)) if s not in running)
                if gpus:
                    ex.update_parameters(gpus_per_node=1, visible_gpus=[slot % gpus])
                running[slot] = (pos, ex.submit(task.fn), task)
            if failure is not None and not running:
                break
            if poll is not None:
                poll()
            if running:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        for _, job, _ in running.values():
            job.cancel(check=False)
        raise
    if failure is not None:
        raise failure
    return results


def run_debug(tasks: Sequence[Task], poll: Callable[[], None] | None = None) -> list:
    """Run ``tasks`` one after the other in this process (submitit's DebugExecutor); ``poll`` runs in a thread."""
    import submitit

    stop = threading.Event()

    def poller():
        while not stop.wait(POLL_S):
            poll()

    thread = threading.Thread(target=poller, daemon=True) if poll is not None else None
    if thread is not None:
        thread.start()
    results = []
    try:
        for task in tasks:
            job = submitit.DebugExecutor(folder=task.folder).submit(task.fn)
            err = job.exception()  # runs the task here; unlike result() it does not open pdb on failure
            if err is not None:
                raise err
            results.append(job.result())
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    if poll is not None:
        poll()
    return results


def submit_slurm(tasks: Sequence[Task], options) -> list:
    """Submit ``tasks`` (all with the same log folder) as SLURM job arrays; return the submitit jobs."""
    from cpcluster.orchestrate.slurm import make_executor
    from cpcluster.orchestrate.slurm_arrays import submit_array

    if not tasks:
        return []
    executor = make_executor(tasks[0].folder, options, "slurm")
    return submit_array(executor, [t.fn for t in tasks])
