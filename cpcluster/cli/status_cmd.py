"""``cpcluster status`` and ``cpcluster resubmit``: where certify runs stand, and rerunning their dead shards.

Both read a run folder's ``run.json``, shard files, journals and job records (:mod:`cpcluster.orchestrate.status`), and ask
SLURM about the recorded jobs when it is reachable. ``resubmit`` then hands the failed, missing and partial shards
to the same path ``cpcluster certify`` uses (:func:`cpcluster.cli.certify_cmd.execute`), which records the new jobs.
"""
from __future__ import annotations

import json

import click

from cpcluster.orchestrate.submit import EXECUTORS
from cpcluster.util.errors import InputError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


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
    from cpcluster.orchestrate.status import collect, resubmittable
    from cpcluster.orchestrate.submit import choose_executor

    statuses = collect(list(run_dirs))
    unreachable = [s.run_dir for s in statuses if s.slurm == "unreachable"]
    if unreachable:
        raise InputError(f"{unreachable[0]}: its shards went to SLURM, which does not answer from here, so running "
                         "jobs cannot be told from dead ones; run resubmit where squeue works")
    todo = {s.run_dir: resubmittable(s) for s in statuses}
    given = {"--denoiser": denoiser, "--classifier": classifier}
    resolved = [_resolve(run_dir, given) for run_dir in todo if todo[run_dir]]  # refuses outdated records first
    for s in statuses:
        others = ", ".join(f"{s.count(st)} {st}" for st in ("complete", "running", "pending") if s.count(st))
        click.echo(f"{s.run_dir}: {len(todo[s.run_dir])} shard(s) to rerun"
                   + (f" ({_ranges(todo[s.run_dir])})" if todo[s.run_dir] else "") + (f"; {others}" if others else ""))
    if not any(todo.values()):
        click.echo("nothing to resubmit")
        return
    if dry_run:
        click.echo("dry run: nothing submitted")
        return
    kind, reason = choose_executor(executor)
    slurm = _slurm_settings([r.config.run_dir for r in resolved], partition=partition, account=account,
                            time_min=time_min, array_parallelism=array_parallelism, sbatch_extra=sbatch_extra)
    from cpcluster.cli.certify_cmd import execute

    execute(resolved, kind, reason, overwrite=False, workers=workers, slurm=slurm,
            only={run_dir: set(shards) for run_dir, shards in todo.items()})


def _ranges(indices) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            out.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(out)


def _resolve(run_dir: str, given: dict):
    """The run of ``run_dir`` rebuilt from its ``run.json`` (models loaded); refused when it no longer matches.

    ``given``: the specs typed on the command line, which must confirm any recorded spec that runs code
    (:func:`cpcluster.models.specs.confirm_recorded_specs`), checked before anything is loaded.
    """
    from cpcluster.core import runs
    from cpcluster.core.config import CertifyConfig
    from cpcluster.models.specs import confirm_recorded_specs

    record = runs.read_run(run_dir)
    if record is None:
        raise InputError(f"{run_dir}: no run.json; not a certify run folder")
    try:
        config = CertifyConfig.from_dict({**record["certify_config"], "run_dir": run_dir})
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise InputError(f"{run_dir}/run.json: its certify config cannot be read ({e}); rerun `cpcluster certify` "
                         "with --overwrite") from None
    confirm_recorded_specs({"--denoiser": config.denoiser, "--classifier": config.classifier,
                            "--dataset": config.dataset}, {k: v for k, v in given.items() if v is not None},
                           f"{run_dir}/run.json")
    run = runs.resolve(config, runs.load_models(config))
    if (run.config_hash, run.plan.num_shards) != (record.get("config_hash"), record.get("num_shards")):
        old = record.get("shard_config") or {}
        keys = sorted(k for k in set(old) | set(run.shard_config) if old.get(k) != run.shard_config.get(k))
        raise InputError(f"{run_dir}: its run.json no longer matches what its config resolves to (different "
                         f"{', '.join(keys[:4]) or 'shard count'}: models, data or code changed since it was "
                         "planned); nothing resubmitted")
    return run


def _slurm_settings(run_dirs, **given) -> dict:
    """The SLURM settings for resubmitting: those given, else those of the runs' latest recorded submission."""
    from cpcluster.orchestrate.slurm_jobs import read_jobs

    last = {}
    for run_dir in run_dirs:
        for record in read_jobs(run_dir):
            if isinstance(record.get("submit"), dict):
                last = record["submit"]
    defaults = {"partition": None, "account": None, "time_min": 240, "array_parallelism": None,
                "sbatch_extra": ()}
    out = {}
    for key, default in defaults.items():
        value = given.get(key)
        out[key] = value if value not in (None, ()) else last.get(key, default)
    out["sbatch_extra"] = tuple(out["sbatch_extra"] or ())
    return out
