"""SLURM specifics of submitting cpcluster jobs through submitit.

One frozen :class:`SlurmOptions` holds what a user chooses about a SLURM job (partition, account, qos, time
limit, GPUs, CPUs, memory, constraint, array throttle, extra ``#SBATCH`` options, setup lines). From it:

* :func:`make_executor` builds the ``submitit.AutoExecutor`` (``"slurm"``, or ``"local"``/``"debug"`` for tests),
  with the parameters of :func:`executor_parameters`;
* :func:`submit_array` submits a list of callables as one job array, or as several when the list is longer than
  the cluster's ``MaxArraySize`` (:func:`cluster_max_array_size`, :func:`split_array`) -- submitit alone does not
  split, and ``sbatch`` refuses an oversized array. A refused ``sbatch`` (unknown partition, account, QOS
  limit...) becomes an :class:`~cpcluster.util.errors.InputError` carrying SLURM's own message in one line;
* :func:`cpcluster.slurm_dryrun.render_sbatch` returns the sbatch scripts :func:`submit_array` would submit,
  without a cluster (``--dry-run``); they are produced by submitit's own code, so they are the same text;
* :func:`record_jobs` / :func:`read_jobs` keep the submitted job ids in ``<run_dir>/jobs.jsonl`` so that later
  commands (``status``, ``resubmit``) find them; they live in :mod:`cpcluster.orchestrate.slurm_jobs` with the job-state
  queries (``squeue``/``sacct``) and are re-exported here.

Jobs of several tasks (multi-node fine-tuning) run under ``srun --kill-on-bad-exit=1``: a rank that fails ends the
job, instead of leaving its peers in a collective until the time limit.

Preemption and time limits: submitit asks SLURM to send ``USR2`` ``signal_delay_s`` seconds before the end; its
handler calls the job's ``checkpoint()`` and requeues it, at most ``max_num_timeout`` times. An outside
``scontrol requeue`` or a node failure restarts the job from scratch without a signal, so cpcluster jobs resume
from what they wrote to disk, never from memory. Note: with ``time_min`` under 10 submitit counts every
``USR2`` as a timeout, so each preemption then uses one of the ``max_num_timeout`` requeues.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from cpcluster.orchestrate.slurm_jobs import (JOBS_FILE, read_jobs, record_jobs,  # noqa: F401 (re-exported)
                                              slurm_reachable)
from cpcluster.sharding.arrays import DEFAULT_MAX_ARRAY_SIZE, split_array  # the one chunking rule (re-exported)
from cpcluster.util.errors import InputError

CLUSTERS = ("slurm", "local", "debug")

# sbatch options that SlurmOptions sets through a field (use the field), or that submitit manages itself
# (changing them would break its bookkeeping of arrays, logs and the preemption signal).
_FIELD_KEYS = {
    "partition": "partition", "account": "account", "qos": "qos", "time": "time_min", "nodes": "nodes",
    "ntasks-per-node": "tasks_per_node", "cpus-per-task": "cpus_per_task", "gpus-per-task": "gpus_per_task",
    "gpus-per-node": "gpus_per_node", "mem": "mem_gb", "constraint": "constraint", "job-name": "job_name",
    "signal": "signal_delay_s",
}
_MANAGED_KEYS = {"array", "output", "error", "open-mode", "wrap"}
_KEY_RE = re.compile(r"^[a-z][a-z0-9-]*$")

# Setup lines that pass USR2 sent to the batch shell alone (``scancel --batch --signal=USR2``, sites that preempt
# with ``--signal=B:USR2``) on to the job's tasks, where submitit's checkpoint-and-requeue handler runs. Without
# them bash dies of the signal and the job fails; bash also defers traps while a foreground command runs, hence
# submitit's ``srun`` line is run in the background and waited for (a trapped signal interrupts ``wait``).
FORWARD_USR2_SETUP = (
    "# pass USR2 sent to this batch shell (scancel --batch --signal=USR2) on to the job's tasks",
    "_cpcluster_srun_pid=",
    "trap '[ -n \"$_cpcluster_srun_pid\" ] && kill -USR2 \"$_cpcluster_srun_pid\" 2>/dev/null' USR2",
    "srun() {",
    "  command srun \"$@\" &",
    "  _cpcluster_srun_pid=$!",
    "  local rc",
    "  while :; do",
    "    wait \"$_cpcluster_srun_pid\"; rc=$?",
    "    [ \"$rc\" -gt 128 ] && kill -0 \"$_cpcluster_srun_pid\" 2>/dev/null || break",
    "  done",
    "  return \"$rc\"",
    "}",
)


@dataclass(frozen=True)
class SlurmOptions:
    """Everything a user chooses about the SLURM jobs of one submission. Frozen and picklable.

    Attributes
    ----------
    partition, account, qos, constraint : str or None
        The sbatch options of the same names (None: the cluster's default / no constraint).
    time_min : int
        Time limit per job in minutes (sbatch ``--time``).
    nodes, tasks_per_node : int
        Nodes per job and tasks (processes) per node; a multi-node DDP job uses ``nodes > 1``.
    cpus_per_task, gpus_per_task, gpus_per_node : int or None
        Resources per task / node (None: not requested).
    mem_gb : float or None
        Memory per node in GB (sbatch ``--mem``); None: the cluster's default per CPU.
    array_parallelism : int or None
        At most this many tasks of one submission run at once (``--array=0-N%K``; when the tasks are split into
        several arrays, each gets ``K // n_arrays``, at least 1); None: submitit's default of 256 per array.
    extra : tuple of (str, str or True)
        Further sbatch options as (long name without ``--``, value) pairs; ``True`` writes a flag without value,
        e.g. ``(("mail-type", "END"), ("exclusive", True))``. Build them from ``key=value`` strings with
        :func:`parse_sbatch_options`.
    setup : tuple of str
        Shell lines run in the sbatch script before the job starts (``module load``, ``export``...).
    forward_usr2 : bool
        Prepend :data:`FORWARD_USR2_SETUP` to the setup, so that USR2 sent to the batch shell only also reaches
        the job (checkpoint and requeue) instead of killing it.
    max_num_timeout : int
        How often a job may be requeued after a timeout or preemption signal (submitit's ``max_num_timeout``).
    signal_delay_s : int
        Seconds before the time limit at which SLURM sends ``USR2`` (the checkpoint-and-requeue signal).
    job_name : str
        SLURM job name.
    python : str or None
        Command that runs Python in the job (e.g. a container wrapper); None: this interpreter.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    gpus_per_node: int | None = None
    mem_gb: float | None = None
    constraint: str | None = None
    array_parallelism: int | None = None
    extra: tuple = field(default=())
    setup: tuple = field(default=())
    forward_usr2: bool = True
    max_num_timeout: int = 3
    signal_delay_s: int = 90
    job_name: str = "cpcluster"
    python: str | None = None

    def __post_init__(self):
        for name in ("time_min", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_task", "gpus_per_node",
                     "array_parallelism"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"SLURM option {name} must be a positive integer, got {value!r}")
        for name, low in (("max_num_timeout", 0), ("signal_delay_s", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"SLURM option {name} must be an integer >= {low}, got {value!r}")
        if self.mem_gb is not None and not (isinstance(self.mem_gb, (int, float)) and self.mem_gb > 0):
            raise InputError(f"SLURM option mem_gb must be a positive number of GB, got {self.mem_gb!r}")
        for name in ("partition", "account", "qos", "constraint", "job_name", "python"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or "\n" in value):
                raise InputError(f"SLURM option {name} must be a non-empty one-line string, got {value!r}")
        object.__setattr__(self, "extra", tuple((str(k), v) for k, v in self.extra))
        object.__setattr__(self, "setup", tuple(str(line) for line in self.setup))
        for key, value in self.extra:
            _check_extra(key, value)
        if any("\n" in line for line in self.setup):
            raise InputError("SLURM setup lines must be one line each; pass several lines as several items")


def _check_extra(key: str, value: Any) -> None:
    if not _KEY_RE.match(key):
        raise InputError(f"extra sbatch option {key!r}: give the long option name without dashes, e.g. mail-type")
    if key in _FIELD_KEYS:
        raise InputError(f"extra sbatch option {key!r}: set it with the SLURM option {_FIELD_KEYS[key]} instead")
    if key in _MANAGED_KEYS:
        raise InputError(f"extra sbatch option {key!r} is managed by cpcluster/submitit and cannot be set")
    if value is not True and (not isinstance(value, str) or "\n" in value):
        raise InputError(f"extra sbatch option {key!r}: the value must be a one-line string, got {value!r}")


def parse_sbatch_options(items: Iterable[str]) -> tuple:
    """``["mail-type=END", "--exclusive"]`` -> ``(("mail-type", "END"), ("exclusive", True))`` (checked)."""
    out = []
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().lstrip("-")
        out.append((key, value if sep else True))
        _check_extra(*out[-1])
    return tuple(out)


def executor_parameters(options: SlurmOptions) -> dict:
    """Keyword arguments for ``submitit.AutoExecutor.update_parameters`` (generic and ``slurm_``-prefixed).

    Parameters set to None are left out (submitit's defaults apply). On a non-SLURM AutoExecutor the
    ``slurm_`` keys are ignored by submitit, so the same dict serves the local executor in tests.
    """
    params = {
        "name": options.job_name,
        "timeout_min": options.time_min,
        "nodes": options.nodes,
        "tasks_per_node": options.tasks_per_node,
        "cpus_per_task": options.cpus_per_task,
        "gpus_per_node": options.gpus_per_node,
        "mem_gb": options.mem_gb,
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        "slurm_qos": options.qos,
        "slurm_gpus_per_task": options.gpus_per_task,
        "slurm_constraint": options.constraint,
        "slurm_array_parallelism": options.array_parallelism,
        "slurm_signal_delay_s": options.signal_delay_s,
        "slurm_additional_parameters": dict(options.extra) or None,
        "slurm_setup": [*(FORWARD_USR2_SETUP if options.forward_usr2 else ()), *options.setup] or None,
        # a rank that dies takes the others with it, instead of leaving them in a collective until its timeout
        "slurm_srun_args": ["--kill-on-bad-exit=1"] if (options.nodes or 1) * (options.tasks_per_node or 1) > 1
        else None,
    }
    return {k: v for k, v in params.items() if v is not None}


def _executor_init_kwargs(options: SlurmOptions, cluster: str) -> dict:
    kwargs: dict = {}
    if cluster in ("slurm", "local"):
        kwargs[f"{cluster}_max_num_timeout"] = options.max_num_timeout
        if options.python is not None:
            kwargs[f"{cluster}_python"] = options.python
    return kwargs


def make_executor(folder, options: SlurmOptions, cluster: str = "slurm"):
    """A ``submitit.AutoExecutor`` for ``cluster`` ("slurm", "local" or "debug") configured from ``options``.

    ``folder`` is where submitit keeps pickles and logs (may contain ``%j``); on SLURM it must be on a
    filesystem the compute nodes share. Raises InputError when ``cluster`` is "slurm" and no ``srun`` is on PATH
    or when submitit refuses a parameter.
    """
    import submitit

    if cluster not in CLUSTERS:
        raise InputError(f"executor {cluster!r} is unknown; use one of {', '.join(CLUSTERS)}")
    if cluster == "slurm" and shutil.which("srun") is None:
        raise InputError("the slurm executor needs SLURM's `srun` on PATH: run on a login node of the cluster "
                         "or use the local executor")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **_executor_init_kwargs(options, cluster))
    _update(executor, options)
    return executor


def _update(executor, options: SlurmOptions) -> None:
    try:
        executor.update_parameters(**executor_parameters(options))
    except (ValueError, NameError, AssertionError) as e:
        raise InputError(f"submitit refused the SLURM options: {e}") from None


# ---------------------------------------------------------------------------------------------- array sizes
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


def _per_array_parallelism(total: int, n_arrays: int) -> int:
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
            backend.parameters["array_parallelism"] = _per_array_parallelism(throttle, len(chunks))
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


__all__ = [
    "DEFAULT_MAX_ARRAY_SIZE", "FORWARD_USR2_SETUP", "JOBS_FILE", "SlurmOptions", "cluster_max_array_size",
    "executor_parameters", "make_executor", "parse_max_array_size", "parse_sbatch_options", "read_jobs",
    "record_jobs", "slurm_reachable", "split_array", "submit_array",
]
