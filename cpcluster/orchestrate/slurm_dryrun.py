"""``--dry-run`` for SLURM: the sbatch scripts :func:`~cpcluster.orchestrate.slurm_arrays.submit_array` would submit,
without a cluster.

They are produced by submitit's own script writer on an executor that never calls ``srun``, so the text is the one
``sbatch`` would receive, byte for byte (tested against a fake ``sbatch`` and on the live test cluster).
"""
from __future__ import annotations

from cpcluster.orchestrate import slurm_arrays
from cpcluster.orchestrate.slurm import SlurmOptions, executor_init_kwargs, apply_options
from cpcluster.orchestrate.slurm_arrays import per_array_parallelism
from cpcluster.sharding.arrays import split_array


def _offline_auto_executor(folder, options: SlurmOptions):
    """An AutoExecutor on SLURM's submitit backend that never needs ``srun``: for rendering scripts only."""
    from submitit.auto.auto import AutoExecutor
    from submitit.core import plugins
    from submitit.core.core import Executor
    from submitit.slurm.slurm import SlurmExecutor

    class _OfflineSlurmExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    class _OfflineAutoExecutor(AutoExecutor):
        def __init__(self):  # AutoExecutor.__init__ with the offline backend in place of the detected one
            self.cluster = "slurm"
            init = {k[len("slurm_"):]: v for k, v in executor_init_kwargs(options, "slurm").items()}
            self._executor = _OfflineSlurmExecutor(folder, **init)
            valid = self._valid_parameters()
            self._deprecated_args = {arg: f"{name}_{arg}" for name, ex in plugins.get_executors().items()
                                     for arg in ex._valid_parameters() if arg not in valid}
            Executor.__init__(self, self._executor.folder, self._executor.parameters)

    executor = _OfflineAutoExecutor()
    apply_options(executor, options)
    return executor


def render_sbatch(options: SlurmOptions, n_tasks: int, folder, max_array_size: int | None = None) -> list[str]:
    """The sbatch scripts that ``submit_array(make_executor(folder, options), <n_tasks callables>)`` submits.

    One script per array (see :func:`split_array`); a single task gives a plain job script. Needs no cluster:
    ``max_array_size`` defaults to :func:`cpcluster.orchestrate.slurm_arrays.cluster_max_array_size` (1001 without SLURM). The text
    comes from submitit's own script writer, so it is what would be submitted (``folder`` is made absolute first).
    """
    executor = _offline_auto_executor(folder, options)
    backend = executor._executor
    if max_array_size is None:
        max_array_size = slurm_arrays.cluster_max_array_size()  # looked up at call time: tests replace it
    scripts = []
    chunks = split_array(n_tasks, max_array_size)
    for chunk in chunks:
        params = dict(backend.parameters)
        if "array_parallelism" in params:
            params["array_parallelism"] = per_array_parallelism(params["array_parallelism"], len(chunks))
        if len(chunk) > 1:
            params["map_count"] = len(chunk)  # what SlurmExecutor sets on its array copy
        saved, backend.parameters = backend.parameters, params
        try:
            scripts.append(backend._make_submission_file_text(backend._submitit_command_str, "dry-run"))
        finally:
            backend.parameters = saved
    return scripts
