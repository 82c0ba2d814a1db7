"""What a certify run will do, before it does it: ``--dry-run``'s plan and cost estimate, the sbatch scripts its
shards would be submitted with, its SLURM options and where submitit keeps its logs.

The cost estimate measures the draws/s of the run's purifier + classifier on this machine's best device
(:func:`estimate_rate`); the sbatch scripts come from submitit's own writer
(:func:`cpcluster.orchestrate.slurm_dryrun.render_sbatch`), so they are the text ``sbatch`` would receive.
"""
from __future__ import annotations

import os
from typing import Callable

# The SLURM settings of array shard jobs when none are given (``--time-min`` in minutes).
SLURM_DEFAULTS = {"partition": None, "account": None, "time_min": 240, "array_parallelism": None, "sbatch_extra": ()}


def print_plan(resolved, models, kind: str, reason: str, slurm: dict, echo: Callable[[str], None]) -> None:
    """``certify --dry-run``: images, units, draws and the estimated device-hours of each run; on SLURM the
    sbatch scripts too. Writes and submits nothing."""
    rate, where = estimate_rate(resolved[0], models)
    echo(f"executor: {kind} ({reason})")
    for run in resolved:
        plan, draws = run.plan, run.plan.shard_draws()
        echo(f"run {run.config.run_dir}  (config {run.config_hash[:12]})")
        echo(f"  images {len(run.image_ids)}, units {len(plan.units)}, draws {plan.total_draws:,}, "
             f"shards {plan.num_shards}: draws per shard {int(draws.min()):,}..{int(draws.max()):,}")
        hours = plan.total_draws / rate / 3600
        echo(f"  estimated cost: {hours:.3g} device-hours in all, {draws.max() / rate / 60:.3g} min for the "
             f"largest shard, at {rate:,.0f} draws/s measured here ({where})")
        if run.config.early_stop is not None:
            from cpcluster.jobs.early_stop import estimate_saving

            echo(f"  {estimate_saving(run)}")
    if kind == "slurm":
        print_sbatch(resolved, slurm, echo)
    echo("dry run: nothing written or submitted")


def print_sbatch(resolved, slurm: dict, echo: Callable[[str], None]) -> None:
    """The sbatch script(s) each run's unfinished shards would be submitted with."""
    from cpcluster.orchestrate import rundir
    from cpcluster.orchestrate.slurm_dryrun import render_sbatch

    options = slurm_options(resolved, slurm)
    for run in resolved:
        todo = run.plan.num_shards - len(rundir.complete_shards(run))
        scripts = render_sbatch(options, todo, log_folder(run, "slurm")) if todo else []
        for i, script in enumerate(scripts, 1):
            echo(f"----- sbatch script {i} of {len(scripts)} for {run.config.run_dir} -----")
            echo(script.rstrip("\n"))


def estimate_rate(run, models) -> tuple[float, str]:
    """Draws/s of the run's purifier + classifier on this machine's best device, and a description of it."""
    import torch

    from cpcluster.core.engine import measure_rate
    from cpcluster.core.runs import build_purifier
    from cpcluster.jobs.certify import resolve_device
    from cpcluster.models.purifier_base import SmoothedBase

    device = resolve_device("cpu" if run.config.device == "cpu" else "auto")
    model = SmoothedBase(build_purifier(run.config, models), models.classifier).to(device).eval()
    x, _ = models.dataset.get(run.image_ids[:1])
    batch = min(run.config.batch, 256 if device.type == "cuda" else 64)
    rate = measure_rate(model, torch.from_numpy(x).to(device), run.config.sigma, batch)
    return rate, f"{device.type}, forwards of {batch}, {torch.get_num_threads()} threads"


def log_folder(run, kind: str) -> str:
    """submitit's folder for a run: ``<run_dir>/logs`` when the run dir is local, else ``./cpcluster-logs/<name>``.

    SLURM jobs get a ``%j`` sub-folder each (submitit fills in the job id).
    """
    from cpcluster.util.fileio import is_local

    if is_local(run.config.run_dir):
        folder = os.path.join(os.path.abspath(run.config.run_dir.removeprefix("file://")), "logs")
    else:
        folder = os.path.abspath(os.path.join("cpcluster-logs", run.config.run_dir.rstrip("/").rsplit("/", 1)[-1]))
    return os.path.join(folder, "%j") if kind == "slurm" else folder


def slurm_options(resolved, slurm: dict):
    """The :class:`~cpcluster.orchestrate.slurm.SlurmOptions` of the shard jobs (one GPU each unless
    ``--device cpu``)."""
    return array_slurm_options(resolved[0].config.device, slurm, "cpcluster-certify")


def array_slurm_options(device: str, slurm: dict, job_name: str):
    """SlurmOptions of array shard jobs (``certify``, ``quality``) from the SLURM settings (``partition``,
    ``account``, ``time_min``, ``array_parallelism``, ``sbatch_extra``): one GPU each unless on the CPU."""
    from cpcluster.orchestrate.slurm import SlurmOptions, parse_sbatch_options

    return SlurmOptions(partition=slurm["partition"], account=slurm["account"], time_min=slurm["time_min"],
                        gpus_per_node=None if device == "cpu" else 1, array_parallelism=slurm["array_parallelism"],
                        extra=parse_sbatch_options(slurm["sbatch_extra"]), job_name=job_name)
