"""Certify runs from their configs: check every run folder, then run (local, debug) or submit (SLURM) the shards.

``cpcluster certify`` and the demo call :func:`build_configs` (one :class:`~cpcluster.core.config.CertifyConfig`
per sigma, each in its own run folder) and :func:`certify_runs`: resolve the configs against the loaded models
(:mod:`cpcluster.core.runs`), check every run folder before writing any (:mod:`cpcluster.orchestrate.rundir`), then
:func:`execute` runs or submits :class:`cpcluster.jobs.certify.CertifyShardJob` for every unfinished shard and
says where the shards are and which ``cpcluster aggregate`` command comes next. ``cpcluster resubmit`` calls
:func:`execute` for the shards it reruns. Lines of output go through ``echo``.
"""
from __future__ import annotations

import os
from typing import Callable

from cpcluster.core.config import CertifyConfig
from cpcluster.orchestrate.certify_plan import log_folder, print_plan, slurm_options
from cpcluster.util.errors import InputError, RunError

DEFAULT_NAME = "{mode}-{purifier}-sigma{sigma}"


def run_name(template: str, config: CertifyConfig) -> str:
    """The run folder name from ``--name`` (placeholders ``{sigma}``, ``{mode}``, ``{purifier}``, ``{seed}``)."""
    try:
        name = template.format(sigma=f"{config.sigma:g}", mode=config.mode, purifier=config.purifier,
                               seed=config.seed, n=config.n)
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(f"--name {template!r}: unknown placeholder {e}; use {{sigma}}, {{mode}}, {{purifier}}, "
                         "{seed}, {n}") from None
    if not name or "/" in name or name in (".", "..") or len(name) > 255:
        raise InputError(f"--name {template[:60]!r}: must give a plain folder name (no '/', at most 255 "
                         "characters)")
    return name


def build_configs(sigmas, out: str, name: str = DEFAULT_NAME, **fields) -> list[CertifyConfig]:
    """One validated config per sigma, each with its own run directory ``<out>/<name>``; ``fields`` are the other
    :class:`CertifyConfig` fields."""
    from cpcluster.util.fileio import join_url

    if not sigmas:
        raise InputError("--sigma is required, e.g. --sigma 0.5 (repeat it for several runs)")
    configs = []
    for sigma in sigmas:
        probe = CertifyConfig(sigma=sigma, run_dir=out, **fields)
        configs.append(CertifyConfig(sigma=sigma, run_dir=join_url(out, run_name(name, probe)), **fields))
    dirs = [c.run_dir for c in configs]
    if len(set(dirs)) != len(dirs):
        raise InputError(f"--name {name!r} gives several sigmas the same folder; put {{sigma}} in it")
    return configs


def certify_runs(configs: list[CertifyConfig], executor: str, slurm: dict, *, workers: int | None = None,
                 overwrite: bool = False, dry_run: bool = False, echo: Callable[[str], None] = print) -> None:
    """Run or submit the unfinished shards of ``configs`` (their models are loaded once, from the first).

    ``executor``: ``auto``, ``local``, ``slurm`` or ``debug``; ``slurm``: the SLURM settings
    (``partition``, ``account``, ``time_min``, ``array_parallelism``, ``sbatch_extra``). Every run folder is
    checked before any is written (another run in it is refused unless ``overwrite``, and even then while its
    jobs still run); ``dry_run`` prints the plan and the estimated cost and writes nothing.
    """
    from cpcluster.core import runs
    from cpcluster.orchestrate import rundir
    from cpcluster.orchestrate.submit import choose_executor, refuse_process_local

    models = runs.load_models(configs[0])
    resolved = [runs.resolve(c, models) for c in configs]  # every check of the request before asking SLURM
    kind, reason = choose_executor(executor)
    for config in configs:
        refuse_process_local(config.run_dir, kind)
    if dry_run:
        print_plan(resolved, models, kind, reason, slurm, echo)
        return
    for run in resolved:
        rundir.check_writable(run.config.run_dir)
        if rundir.check_run_dir(run, overwrite) == "overwrite":
            refuse_while_jobs_work(run.config.run_dir)
    execute(resolved, kind, reason, overwrite=overwrite, workers=workers, slurm=slurm, echo=echo)


def refuse_while_jobs_work(run_dir: str) -> None:
    """InputError when jobs of the run being replaced still run or wait: they would write into the new run."""
    from cpcluster.orchestrate.status import busy_shards

    busy = busy_shards(run_dir)
    if busy:
        ids = sorted({s.job_id for s in busy if s.job_id})
        stop = f"cancel them (scancel {' '.join(ids)})" if ids else "stop that run"
        raise InputError(f"--overwrite {run_dir}: shard(s) {', '.join(str(s.index) for s in busy)} of the run it "
                         f"holds are still running or queued; {stop} first, or wait for them to end")


def execute(resolved, kind: str, reason: str, *, overwrite: bool, workers: int | None, slurm: dict,
            only: dict | None = None, echo: Callable[[str], None] = print) -> None:
    """Prepare every run directory, then run (local, debug) or submit (slurm) its unfinished shards.

    ``only`` (``{run_dir: shard indices}``, used by ``cpcluster resubmit``) restricts each run to those shards.
    """
    import dataclasses

    from cpcluster.jobs.certify import CertifyShardJob
    from cpcluster.orchestrate import rundir
    from cpcluster.orchestrate.submit import Task

    gpus = 0
    if kind == "local" and resolved[0].config.device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: must be at least 1")
    workers = workers or max(1, gpus)
    threads = max(1, (os.cpu_count() or 1) // workers) if kind == "local" and not gpus else None
    extra = f", {workers} shard(s) at a time" + (f" on {gpus} GPU(s)" if gpus else "") if kind == "local" else ""
    echo(f"executor: {kind} ({reason}){extra}")
    tasks = []
    for run in resolved:
        action = rundir.prepare_run_dir(run, overwrite)
        done = set(rundir.complete_shards(run))
        echo(f"run {run.config.run_dir}: {action}, {len(done)} of {run.plan.num_shards} shards complete")
        config = dataclasses.replace(run.config, threads=threads) if threads else run.config
        tasks += [Task(CertifyShardJob(config, k), log_folder(run, kind), {"sigma": run.config.sigma, "shard": k})
                  for k in range(run.plan.num_shards)
                  if k not in done and (only is None or k in only.get(run.config.run_dir, ()))]
    if kind == "slurm":
        _submit(resolved, tasks, slurm, echo)
    elif tasks:
        _run_here(resolved, tasks, kind, workers, gpus)
    _summary(resolved, kind, echo)


def _run_here(resolved, tasks, kind: str, workers: int, gpus: int) -> None:
    from cpcluster.jobs.certify import ShardTerminated
    from cpcluster.orchestrate import rundir
    from cpcluster.orchestrate.submit import run_debug, run_local
    from cpcluster.util.progress import advance_to, progress_bar

    shards = [(run, k) for run in resolved for k in range(run.plan.num_shards)]
    bar = progress_bar(sum(run.plan.total_draws for run in resolved), unit="draw", desc="certify")

    def poll():
        advance_to(bar, sum(rundir.shard_draws_done(run, k) for run, k in shards))

    try:
        if kind == "local":
            run_local(tasks, workers=workers, gpus=gpus, poll=poll)
        else:
            run_debug(tasks, poll=poll)
        poll()
    except (KeyboardInterrupt, ShardTerminated) as e:
        how = "stopped by SIGTERM" if isinstance(e, ShardTerminated) else "interrupted"
        raise RunError(f"{how}; recorded units are kept: rerun the same command to resume") from None
    finally:
        bar.close()


def _submit(resolved, tasks, slurm: dict, echo: Callable[[str], None]) -> None:
    from cpcluster.orchestrate.slurm_jobs import record_jobs
    from cpcluster.orchestrate.submit import submit_slurm

    options = slurm_options(resolved, slurm)
    submit = {k: list(v) if k == "sbatch_extra" else v for k, v in slurm.items()}  # for `cpcluster resubmit`
    for run in resolved:
        mine = [t for t in tasks if t.fn.config.run_dir == run.config.run_dir]
        if not mine:
            continue
        jobs = submit_slurm(mine, options)
        record_jobs(run.config.run_dir, jobs, [{**t.tags, "submit": submit} for t in mine])
        ids = sorted({str(j.job_id).partition("_")[0] for j in jobs})
        echo(f"submitted {len(jobs)} shard jobs of {run.config.run_dir} as SLURM job(s) {', '.join(ids)}; "
             f"logs in {os.path.dirname(mine[0].folder)}")


def _summary(resolved, kind: str, echo: Callable[[str], None]) -> None:
    from cpcluster.orchestrate import rundir

    for run in resolved:
        n = len(rundir.complete_shards(run))
        echo(f"shards: {run.config.run_dir}/shard-*-of-{run.plan.num_shards:05d}.h5 "
             f"({n} of {run.plan.num_shards} complete)")
    dirs = " ".join(run.config.run_dir for run in resolved)
    when = "when the jobs have finished" if kind == "slurm" else "next"
    echo(f"{when}: cpcluster aggregate {dirs}")
