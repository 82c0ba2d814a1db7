"""Options several commands share, defined once: where sharded array jobs run (``certify``, ``quality``), the layout
and submission of a DDP fine-tuning job (``finetune``, ``finetune-classifier``), the cluster options with their
``CPCLUSTER_`` environment defaults, and the spellings every command uses for sigmas (``--sigma``, repeated or
comma-separated), the purifier time rule (``--time-rule``) and solver steps (``--solver-steps``).

A decorator here adds its options to a command; :func:`shard_submit_options` hands the command its SLURM settings
as one ``slurm`` dict, the form :mod:`cpcluster.orchestrate` takes them in. Older spellings (``--time``,
``--sigmas``, ``--steps`` for solver steps, ``--purifier-steps``) still work as hidden aliases.
"""
from __future__ import annotations

import functools

import click

from cpcluster.core.choices import EXECUTORS, SOLVER_STEPS_GRID, TIME_RULES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
SLURM_KEYS = ("partition", "account", "time_min", "array_parallelism", "sbatch_extra")
# The environment variables that give the cluster options their defaults (a value on the command line wins).
CLUSTER_ENV = {"executor": "CPCLUSTER_EXECUTOR", "partition": "CPCLUSTER_PARTITION",
               "account": "CPCLUSTER_ACCOUNT", "time_min": "CPCLUSTER_TIME_MIN"}


class AliasedOption(click.Option):
    """An option whose first name is the one ``--help`` shows; the other names are accepted as hidden aliases."""

    def get_help_record(self, ctx):
        shown, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def time_rule_option(fn):
    """``--time-rule nearest|exact`` (hidden alias ``--time``): how a purifier picks t_sigma."""
    return click.option("--time-rule", "--time", "time_rule", cls=AliasedOption, type=click.Choice(TIME_RULES),
                        default="nearest", show_default=True,
                        help="t_sigma: the training-grid point nearest 2 sigma, or exactly 2 sigma.")(fn)


class SolverSteps(click.ParamType):
    """``K`` (an integer >= 1) or ``grid``."""

    name = "K|grid"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value == SOLVER_STEPS_GRID:
            return value
        try:
            steps = int(value)
        except ValueError:
            steps = 0
        if steps < 1:
            self.fail(f"{value!r}: give a number of steps >= 1, or 'grid'", param, ctx)
        return steps


def solver_steps_option(*aliases: str, dest: str = "steps"):
    """``--solver-steps K|grid`` (hidden ``aliases``): steps of the pf-ode purifier; received as ``dest``."""
    return click.option("--solver-steps", *aliases, dest, cls=AliasedOption, type=SolverSteps(), default=None,
                        help="Solver steps of the pf-ode purifier [default: 10]; 'grid': the rest of the network's "
                             "training grid from t_sigma (needs --time-rule nearest and grid_steps).")


def sigma_option(*aliases: str, default=None, help="Pixel-space noise level (images in [0,1]).", **kwargs):
    """``--sigma`` repeated and/or comma-separated (hidden ``aliases``); received as the tuple ``sigmas``."""
    return click.option("--sigma", *aliases, "sigmas", cls=AliasedOption, multiple=True, metavar="SIGMA[,SIGMA]",
                        default=default, callback=parse_sigma_list, help=help + " Repeat or comma-separate.",
                        **kwargs)


def _cluster_options(time_min_default: int, executor_help: str) -> list:
    """``--executor --partition --account --time-min``, each with its ``CPCLUSTER_`` default (:data:`CLUSTER_ENV`)."""
    return [
        click.option("--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
                     envvar=CLUSTER_ENV["executor"], show_envvar=True, help=executor_help),
        click.option("--partition", default=None, envvar=CLUSTER_ENV["partition"], show_envvar=True,
                     help="SLURM partition."),
        click.option("--account", default=None, envvar=CLUSTER_ENV["account"], show_envvar=True,
                     help="SLURM account."),
        click.option("--time-min", type=int, default=time_min_default, show_default=True,
                     envvar=CLUSTER_ENV["time_min"], show_envvar=True,
                     help="SLURM time limit per job in minutes (submitit requeues a job that reaches it)."),
    ]


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

    return _apply(command, _cluster_options(240, "auto = slurm when reachable, else local.") + [
        click.option("--workers", type=int, default=None,
                     help="Local executor: shards at once [default: one per GPU, or 1 on a CPU-only machine]."),
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
        *_cluster_options(24 * 60, "auto: SLURM when its controller answers, else local."),
        click.option("--cpus-per-task", default=None, type=int, help="CPUs per rank (SLURM)."),
        click.option("--log-dir", default=None, help="submitit logs (default: <out>/submitit, must be local/shared)."),
        click.option("--wait", is_flag=True, help="Wait for the job and print each rank's summary."),
        click.option("--dry-run", is_flag=True, help="Validate and print the config; submit nothing."),
    ])


def training_progress_options(fn):
    """How often a fine-tuning job evaluates, checkpoints and logs (``finetune``, ``finetune-classifier``)."""
    return _apply(fn, [
        click.option("--eval-images", default=256, type=int, help="Held-out images per evaluation (0: none)."),
        click.option("--eval-every", default=500, type=int, help="Evaluate every K steps (and at the start and end)."),
        click.option("--eval-batch", default=128, type=int),
        click.option("--checkpoint-every", default=500, type=int, help="Checkpoint every K steps (and at the end)."),
        click.option("--log-every", default=10, type=int),
    ])


def parse_sigma_list(ctx, param, values) -> tuple:
    """Click callback: ``--sigma`` values, each one number or a comma-separated list -> a tuple of floats (their
    range is checked by the configs)."""
    out = []
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise click.BadParameter(f"{part!r} is not a number, e.g. --sigma 0.25,0.5,1.0",
                                             param_hint="'--sigma'") from None
    return tuple(out)
