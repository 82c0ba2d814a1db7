"""``cpcluster status`` and ``cpcluster resubmit``: where certify runs stand, and rerunning their dead shards.

Both read a run folder's ``run.json``, shard files, journals and job records
(:func:`cpcluster.orchestrate.status.collect`), and ask SLURM about the recorded jobs when it is reachable;
``resubmit`` is :func:`cpcluster.orchestrate.resubmit.resubmit_runs`.
"""
from __future__ import annotations

import json

import click

from cpcluster.cli.options import CONTEXT
from cpcluster.core.choices import EXECUTORS


@click.command(context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--all", "all_shards", is_flag=True, default=None,
              help="List every shard (default: all of them up to 40 shards, else the unfinished ones).")
@click.option("--no-slurm", is_flag=True, help="Do not ask SLURM; states from the files alone.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per run instead of the table.")
def status(run_dirs, all_shards, no_slurm, as_json):
    """Show every shard of certify runs: state, units and draws done, draws/s, and an ETA for the run.

    States: complete, running, pending, partial (a stopped shard with some units recorded), failed (its SLURM job
    ended without finishing it, or its file is damaged) and missing (never submitted). SLURM's view of the jobs
    recorded in RUN_DIR/jobs.jsonl refines the states when the controller answers. Exit code 1 when a shard
    failed (rerun those with `cpcluster resubmit RUN_DIR`), 0 otherwise.

    \b
    Examples:
      cpcluster status results/certify-consistency-sigma0.5
      cpcluster status results/*/ --no-slurm --json
    """
    from cpcluster.orchestrate.status import collect
    from cpcluster.orchestrate.status_report import format_status

    runs = collect(list(run_dirs), use_slurm=not no_slurm)
    for i, run in enumerate(runs):
        if as_json:
            click.echo(json.dumps(run.to_dict(), sort_keys=True))
        else:
            click.echo(("\n" if i else "") + format_status(run, all_shards), nl=False)
    if any(run.failed for run in runs):
        click.get_current_context().exit(1)


@click.command(context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
              help="auto = slurm when reachable, else local.")
@click.option("--workers", type=int, default=None, help="Local executor: shards at once.")
@click.option("--partition", default=None, help="SLURM partition [default: as last submitted].")
@click.option("--account", default=None, help="SLURM account [default: as last submitted].")
@click.option("--time-min", type=int, default=None, help="SLURM time limit per shard job [default: as last "
              "submitted, else 240].")
@click.option("--array-parallelism", type=int, default=None,
              help="SLURM: at most this many shards at once [default: as last submitted].")
@click.option("--sbatch", "sbatch_extra", multiple=True, metavar="KEY=VALUE",
              help="Extra sbatch option (repeat) [default: as last submitted].")
@click.option("--denoiser", default=None, metavar="SPEC",
              help="Confirm the run's denoiser spec (required when it runs code: python:..., torchscript:...).")
@click.option("--classifier", default=None, metavar="SPEC",
              help="Confirm the run's classifier spec (required when it runs code: python:..., torchscript:...).")
@click.option("--dry-run", is_flag=True, help="Say which shards would be rerun; submit nothing.")
def resubmit(run_dirs, executor, workers, partition, account, time_min, array_parallelism, sbatch_extra, dry_run,
             denoiser, classifier):
    """Rerun the shards of certify runs that failed, are missing or stopped partway; never a complete, running
    or pending one.

    The shards continue from what they recorded. Each run is rebuilt from RUN_DIR/run.json and must resolve to
    the same configuration (same models and code); SLURM options not given are those of the run's last
    submission. A spec that runs code when loaded (python:..., torchscript:...) is never taken from run.json alone:
    repeat it with --denoiser / --classifier.

    \b
    Examples:
      cpcluster resubmit results/certify-consistency-sigma0.5
      cpcluster resubmit results/certify-consistency-sigma0.5 --partition long --time-min 600
      cpcluster resubmit results/certify-consistency-sigma0.5 --executor local --dry-run
    """
    from cpcluster.orchestrate.resubmit import resubmit_runs

    slurm = dict(partition=partition, account=account, time_min=time_min, array_parallelism=array_parallelism,
                 sbatch_extra=sbatch_extra)
    resubmit_runs(run_dirs, executor, {"--denoiser": denoiser, "--classifier": classifier}, slurm,
                  workers=workers, dry_run=dry_run, echo=click.echo)
