"""Submitting a list of callables as SLURM job arrays, split where the cluster's ``MaxArraySize`` requires.

submitit alone does not split, and ``sbatch`` refuses an oversized array: :func:`submit_array` submits one array
per chunk of :func:`cpcluster.sharding.arrays.split_array` (the one chunking rule), keeps the user's bound on
running tasks across all of them, and turns a refused ``sbatch`` into one :class:`InputError` line with SLURM's
own words, after cancelling what this call had already submitted. The executor comes from
:func:`cpcluster.orchestrate.slurm.make_executor`.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from typing import Sequence

from cpcluster.sharding.arrays import DEFAULT_MAX_ARRAY_SIZE, split_array
from cpcluster.util.errors import InputError


def parse_max_array_size(config_text: str) -> int | None:
    """``MaxArraySize`` from the text of ``scontrol show config``; None when it is not there."""
    match = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)\s*$", config_text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def cluster_max_array_size(timeout_s: float = 20.0) -> int:
    """The cluster's ``MaxArraySize`` (``scontrol show config``); :data:`DEFAULT_MAX_ARRAY_SIZE` when unreadable.

    An array may hold at most this many tasks (indices ``0 .. MaxArraySize - 1``).
    """
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    value = parse_max_array_size(out.stdout) if out.returncode == 0 else None
    return value if value and value > 0 else DEFAULT_MAX_ARRAY_SIZE


# ------------------------------------------------------------------------------------------------ submission
def _sbatch_message(error: BaseException) -> str:
    """SLURM's own words from a failed submitit submission, as one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


@contextlib.contextmanager
def _cleanup_on_failure(folder):
    """Remove the pickles/scripts that a refused submission leaves in submitit's folder."""
    folder = str(folder)
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    try:
        yield
    except BaseException:
        if os.path.isdir(folder):
            for name in set(os.listdir(folder)) - before:
                if name.endswith((".pkl", ".sh")):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))
        raise


def per_array_parallelism(total: int, n_arrays: int) -> int:
    """Split a bound of ``total`` running tasks over ``n_arrays`` arrays (each throttled on its own by SLURM).

    The sum stays <= ``total`` unless ``total < n_arrays`` (then one task per array runs at a time).
    """
    return max(1, total // max(1, n_arrays))


def _cancel(jobs: Sequence) -> None:
    """Cancel submitted jobs: whole arrays with one ``scancel`` on SLURM, job by job elsewhere."""
    slurm = [j for j in jobs if type(j).__name__ == "SlurmJob"]
    if slurm:
        ids = sorted({str(j.job_id).partition("_")[0] for j in slurm})
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
    for job in jobs:
        if job not in slurm:
            with contextlib.suppress(Exception):
                job.cancel(check=False)


def submit_array(executor, callables: Sequence, max_array_size: int | None = None) -> list:
    """Submit ``callables`` (picklable, no arguments) as job arrays of at most ``max_array_size`` tasks each.

    Parameters
    ----------
    executor : submitit.AutoExecutor
        From :func:`make_executor`.
    callables : sequence of callables
        One array task each, in order; a chunk of one callable is submitted as a plain (non-array) job.
    max_array_size : int, optional
        Default: :func:`cluster_max_array_size` on SLURM, no limit on other executors.

    Returns
    -------
    list of submitit.Job
        One per callable, in the order of ``callables`` (ids ``"<array id>_<task>"`` or ``"<job id>"``).

    Raises
    ------
    InputError
        When ``sbatch`` refuses a submission; the message is SLURM's. Arrays already submitted by this call are
        cancelled first, so a refused call leaves nothing queued.
    """
    from submitit.core.utils import FailedJobError, FailedSubmissionError, JobPaths

    callables = list(callables)
    cluster = getattr(executor, "cluster", "slurm")
    if max_array_size is None:
        max_array_size = cluster_max_array_size() if cluster == "slurm" else max(1, len(callables))
    folder = JobPaths.get_first_id_independent_folder(executor.folder)
    backend = getattr(executor, "_executor", executor)
    chunks = split_array(len(callables), max_array_size)
    throttle = backend.parameters.get("array_parallelism") if cluster == "slurm" else None
    jobs: list = []
    try:
        if throttle is not None:  # keep the user's bound on running tasks across all the arrays
            backend.parameters["array_parallelism"] = per_array_parallelism(throttle, len(chunks))
        for k, chunk in enumerate(chunks):
            try:
                # submitit prints sbatch's stderr before raising: keep it out of the one-line error
                with _cleanup_on_failure(folder), contextlib.redirect_stderr(io.StringIO()):
                    jobs.extend(executor.submit_array([callables[i] for i in chunk]))
            except (FailedJobError, FailedSubmissionError) as e:
                _cancel(jobs)
                where = f" (array {k + 1} of {len(chunks)}; the {k} submitted before were cancelled)" if k else ""
                raise InputError(f"SLURM refused the job{where}: {_sbatch_message(e)}") from None
    finally:
        if throttle is not None:
            backend.parameters["array_parallelism"] = throttle
    return jobs
