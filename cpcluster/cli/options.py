"""Options several commands share, defined once: where sharded array jobs run (``certify``, ``quality``), the layout
and submission of a DDP fine-tuning job (``finetune``, ``finetune-classifier``), and how a list of sigmas is read.

A decorator here adds its options to a command; :func:`shard_submit_options` hands the command its SLURM settings
as one ``slurm`` dict, the form :mod:`cpcluster.orchestrate` takes them in.
"""
from __future__ import annotations

import functools

import click

from cpcluster.core.choices import EXECUTORS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
SLURM_KEYS = ("partition", "account", "time_min", "array_parallelism", "sbatch_extra")


def _apply(fn, options):
    for option in reversed(options):
        fn = option(fn)
    return fn


def shard_submit_options(fn):
    """The options that say where sharded array jobs run (``certify``, ``quality``); the command receives
    ``executor``, ``workers`` and ``slurm`` (a dict of :data:`SLURM_KEYS`)."""

    @functools.wraps(fn)
    def command(*args, **kwargs):
        kwargs["slurm"] = {key: kwargs.pop(key) for key in SLURM_KEYS}
        return fn(*args, **kwargs)

    return _apply(command, [
        click.option("--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
                     help="auto = slurm when reachable, else local."),
        click.option("--workers", type=int, default=None,
                     help="Local executor: shards at once [default: one per GPU, or 1 on a CPU-only machine]."),
        click.option("--partition", default=None, help="SLURM partition."),
        click.option("--account", default=None, help="SLURM account."),
        click.option("--time-min", type=int, default=240, show_default=True, help="SLURM time limit per shard job."),
        click.option("--array-parallelism", type=int, default=None, help="SLURM: at most this many shards at once."),
        click.option("--sbatch", "sbatch_extra", multiple=True, metavar="KEY=VALUE",
                     help="Extra sbatch option (repeat)."),
    ])


# The options of job_options that only say where and how the job is submitted (not config fields).
SUBMIT_KEYS = ("executor", "partition", "account", "time_min", "cpus_per_task", "log_dir", "wait", "dry_run")


def job_options(fn):
    """The options of a DDP fine-tuning job's layout and submission (``finetune``, ``finetune-classifier``); the
    command receives ``gpus_per_node``, ``ranks_per_node`` and ``submit`` (a dict of :data:`SUBMIT_KEYS`)."""

    @functools.wraps(fn)
    def command(*args, **kwargs):
        kwargs["submit"] = {key: kwargs.pop(key) for key in SUBMIT_KEYS}
        return fn(*args, **kwargs)

    return _apply(command, [
        click.option("--nodes", default=1, type=int, help="Nodes of the DDP job."),
        click.option("--gpus-per-node", default=0, type=int, help="GPUs per node, one rank each (0: CPU ranks)."),
        click.option("--ranks-per-node", default=None, type=int, help="CPU ranks per node (default: 1)."),
        click.option("--executor", type=click.Choice(EXECUTORS), default="auto",
                     help="auto: SLURM when its controller answers, else local."),
        click.option("--partition", default=None, help="SLURM partition."),
        click.option("--account", default=None, help="SLURM account."),
        click.option("--time-min", default=24 * 60, type=int, help="Job time limit; submitit requeues on timeout."),
        click.option("--cpus-per-task", default=None, type=int, help="CPUs per rank (SLURM)."),
        click.option("--log-dir", default=None, help="submitit logs (default: <out>/submitit, must be local/shared)."),
        click.option("--wait", is_flag=True, help="Wait for the job and print each rank's summary."),
        click.option("--dry-run", is_flag=True, help="Validate and print the config; submit nothing."),
    ])


def parse_sigma_list(ctx, param, values) -> tuple:
    """Click callback: ``--sigma`` values, each one number or a comma-separated list -> a tuple of floats."""
    out = []
    for value in values:
        for part in str(value).split(","):
            try:
                out.append(float(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a number") from None
    return tuple(out)
