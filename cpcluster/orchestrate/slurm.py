"""SLURM specifics of submitting cpcluster jobs through submitit.

One frozen :class:`SlurmOptions` holds what a user chooses about a SLURM job (partition, account, qos, time
limit, GPUs, CPUs, memory, constraint, array throttle, extra ``#SBATCH`` options, setup lines). From it:

* :func:`make_executor` builds the ``submitit.AutoExecutor`` (``"slurm"``, or ``"local"``/``"debug"`` for tests),
  with the parameters of :func:`executor_parameters`;
* :func:`cpcluster.orchestrate.slurm_arrays.submit_array` submits a list of callables as one job array, or as
  several when the list is longer than the cluster's ``MaxArraySize`` -- submitit alone does not split, and
  ``sbatch`` refuses an oversized array. A refused ``sbatch`` (unknown partition, account, QOS limit...) becomes
  an :class:`~cpcluster.util.errors.InputError` carrying SLURM's own message in one line;
* :func:`cpcluster.orchestrate.slurm_dryrun.render_sbatch` returns the sbatch scripts ``submit_array`` would
  submit, without a cluster (``--dry-run``); they are produced by submitit's own code, so they are the same text;
* :mod:`cpcluster.orchestrate.slurm_jobs` keeps the submitted job ids in ``<run_dir>/jobs.jsonl`` so that later
  commands (``status``, ``resubmit``) find them, and asks SLURM (``squeue``/``sacct``) where they stand.

Jobs of several tasks (multi-node fine-tuning) run under ``srun --kill-on-bad-exit=1``: a rank that fails ends the
job, instead of leaving its peers in a collective until the time limit.

Preemption and time limits: submitit asks SLURM to send ``USR2`` ``signal_delay_s`` seconds before the end; its
handler calls the job's ``checkpoint()`` and requeues it, at most ``max_num_timeout`` times. An outside
``scontrol requeue`` or a node failure restarts the job from scratch without a signal, so cpcluster jobs resume
from what they wrote to disk, never from memory. Note: with ``time_min`` under 10 submitit counts every
``USR2`` as a timeout, so each preemption then uses one of the ``max_num_timeout`` requeues.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable

from cpcluster.core.choices import EXECUTORS
from cpcluster.util.errors import InputError

CLUSTERS = tuple(e for e in EXECUTORS if e != "auto")  # what make_executor builds

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


def executor_init_kwargs(options: SlurmOptions, cluster: str) -> dict:
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
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **executor_init_kwargs(options, cluster))
    apply_options(executor, options)
    return executor


def apply_options(executor, options: SlurmOptions) -> None:
    try:
        executor.update_parameters(**executor_parameters(options))
    except (ValueError, NameError, AssertionError) as e:
        raise InputError(f"submitit refused the SLURM options: {e}") from None
