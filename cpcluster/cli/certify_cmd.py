"""``cpcluster certify``: plan, prepare and run (or submit) the sharded certification of a dataset.

Options -> one :class:`~cpcluster.core.config.CertifyConfig` per sigma -> :mod:`cpcluster.runs` (resolve; check every
run directory before writing any) -> :mod:`cpcluster.orchestrate.submit` (run or submit
:class:`cpcluster.jobs.certify.CertifyShardJob` for every unfinished shard) -> where the shards are and the
``cpcluster aggregate`` command to run.
"""
from __future__ import annotations

import os

import click

from cpcluster.cli.inspect_cmd import PURIFIER_NAMES
from cpcluster.core.config import CERTIFY_DEVICES, CERTIFY_DTYPES, CERTIFY_MODES, CertifyConfig
from cpcluster.orchestrate.submit import EXECUTORS
from cpcluster.util.errors import InputError

DEFAULT_NAME = "{mode}-{purifier}-sigma{sigma}"
MAX_INDICES = 10**7


def parse_indices(text: str | None) -> tuple | None:
    """``"0,5,10-19"`` -> (0, 5, 10, 11, ..., 19); None stays None."""
    if text is None:
        return None
    out = []
    try:
        for item in (t.strip() for t in text.split(",")):
            lo, dash, hi = item.partition("-")
            part = range(int(lo), int(hi) + 1) if dash else [int(item)]
            if len(out) + len(part) > MAX_INDICES:
                raise InputError(f"--indices {text[:40]!r}: more than {MAX_INDICES:,} indices; use --skip and "
                                 "--max-images for large selections")
            out.extend(part)
    except ValueError:
        raise InputError(f"--indices {text!r}: give comma-separated indices or ranges, e.g. --indices 0,5,10-19") \
            from None
    return tuple(out)


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


def build_configs(sigmas, out: str, name: str, **fields) -> list[CertifyConfig]:
    """One validated config per sigma, each with its own run directory ``<out>/<name>``."""
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


def shard_submit_options(fn):
    """The options that say where sharded array jobs run (shared by ``certify`` and ``quality``)."""
    options = [
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
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--sigma", "sigmas", type=float, multiple=True, metavar="SIGMA",
              help="Pixel-space noise level (images in [0,1]); repeat for one run per sigma. Required.")
@click.option("--shards", type=int, default=1, show_default=True, help="Number of shard jobs per run.")
@click.option("--n0", type=int, default=100, show_default=True, help="Selection draws per image (CERTIFY).")
@click.option("--n", "n", type=int, default=100_000, show_default=True, help="Estimation draws per image.")
@click.option("--batch", type=int, default=1000, show_default=True, help="Draws per forward pass.")
@click.option("--block-size", type=int, default=10_000, show_default=True,
              help="Estimation draws per work unit (a multiple of --draw-batch).")
@click.option("--draw-batch", type=int, default=100, show_default=True,
              help="Draws per seeded noise batch; fixes the noise, so keep it to reproduce a run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed.")
@click.option("--skip", type=int, default=1, show_default=True, help="Every K-th image (Cohen's --skip).")
@click.option("--max-images", type=int, default=None, help="At most this many images.")
@click.option("--indices", default=None, metavar="LIST", help="Image indices to evaluate, e.g. 0,5,10-19.")
@click.option("--dataset", default="demo", show_default=True, metavar="SPEC", help="Evaluation dataset spec.")
@click.option("--denoiser", default=None, metavar="SPEC", help="Denoiser spec [default: demo].")
@click.option("--classifier", default="demo", show_default=True, metavar="SPEC", help="Classifier spec.")
@click.option("--purifier", type=click.Choice(PURIFIER_NAMES), default="consistency", show_default=True,
              help="How each noisy copy is purified before the classifier sees it.")
@click.option("--steps", type=int, default=None, help="Solver steps (pf-ode).")
@click.option("--time", "time_rule", type=click.Choice(["nearest", "exact"]), default="nearest", show_default=True,
              help="Purifier time: nearest training-grid point to 2 sigma, or exactly 2 sigma.")
@click.option("--purifier-label", default="random", show_default=True,
              help="Labels a class-conditional purifier sees: random (uniform, from the noise seed) or fixed:K; "
                   "never the true label. Ignored for unconditional purifiers.")
@click.option("--mode", type=click.Choice(CERTIFY_MODES), default="certify", show_default=True,
              help="certify (selection + estimation) or predict (estimation only).")
@click.option("--early-stop", "early_stop", type=float, default=None, metavar="MAX_ALPHA",
              help="Skip estimation draws that cannot change certified accuracy or ACR at any alpha <= MAX_ALPHA: "
                   "images whose selection picks a wrong class, and the rest of an image once it must abstain. "
                   "Recorded in the run; aggregate refuses a larger --alpha. Use --block-size <= n/10 so images "
                   "can stop early.")
@click.option("--dtype", type=click.Choice(CERTIFY_DTYPES), default="float32", show_default=True,
              help="Forward precision (autocast).")
@click.option("--device", type=click.Choice(CERTIFY_DEVICES), default="auto", show_default=True,
              help="Where shards run: auto = CUDA when the job sees a GPU, else CPU.")
@click.option("--out", default="results", show_default=True, metavar="DIR", help="Results folder or fsspec URL.")
@click.option("--name", default=DEFAULT_NAME, show_default=True,
              help="Run folder name under --out; placeholders {sigma} {mode} {purifier} {seed} {n}.")
@shard_submit_options
@click.option("--dry-run", is_flag=True, help="Print the plan and an estimated cost; write and submit nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder holding another configuration.")
def certify(sigmas, shards, out, name, executor, workers, partition, account, time_min, array_parallelism,
            sbatch_extra, dry_run, overwrite, indices, denoiser, purifier, **fields):
    """Certify a dataset with randomized smoothing + purification, as sharded, resumable jobs.

    Each run (one per --sigma) evaluates CERTIFY (or PREDICT) for every selected image with n0 selection and n
    estimation draws, cut into --shards jobs that write per-image class counts to
    <out>/<name>/shard-*-of-*.h5. Rerunning the same command resumes unfinished shards; a different
    configuration in the same folder is refused unless --overwrite.

    \b
    Examples:
      cpcluster certify --shards 64 --sigma 1.0
      cpcluster certify --sigma 0.25 --sigma 0.5 --n 10000 --skip 20 --shards 8 --dry-run
      cpcluster certify --sigma 0.5 --n 2000 --max-images 20 --denoiser demo-random --classifier demo-random \\
          --executor local --out /tmp/cp
    """
    from cpcluster.core import runs
    from cpcluster.orchestrate import rundir
    from cpcluster.orchestrate.submit import choose_executor, refuse_process_local

    if denoiser is None and purifier != "none":
        denoiser = "demo"
    configs = build_configs(sigmas, out, name, num_shards=shards, indices=parse_indices(indices),
                            denoiser=denoiser, purifier=purifier, **fields)
    kind, reason = choose_executor(executor)
    refuse_process_local(out, kind)
    models = runs.load_models(configs[0])
    resolved = [runs.resolve(c, models) for c in configs]
    slurm = dict(partition=partition, account=account, time_min=time_min, array_parallelism=array_parallelism,
                 sbatch_extra=sbatch_extra)
    if dry_run:
        _print_plan(resolved, models, kind, reason, slurm)
        return
    for run in resolved:
        rundir.check_writable(run.config.run_dir)
        if rundir.check_run_dir(run, overwrite) == "overwrite":
            refuse_while_jobs_work(run.config.run_dir)
    execute(resolved, kind, reason, overwrite=overwrite, workers=workers, slurm=slurm)


def refuse_while_jobs_work(run_dir: str) -> None:
    """InputError when jobs of the run being replaced still run or wait: they would write into the new run."""
    from cpcluster.orchestrate.status import busy_shards

    busy = busy_shards(run_dir)
    if busy:
        ids = sorted({s.job_id for s in busy if s.job_id})
        stop = f"cancel them (scancel {' '.join(ids)})" if ids else "stop that run"
        raise InputError(f"--overwrite {run_dir}: shard(s) {', '.join(str(s.index) for s in busy)} of the run it "
                         f"holds are still running or queued; {stop} first, or wait for them to end")


def _print_plan(resolved, models, kind: str, reason: str, slurm: dict) -> None:
    rate, where = estimate_rate(resolved[0], models)
    click.echo(f"executor: {kind} ({reason})")
    for run in resolved:
        plan, draws = run.plan, run.plan.shard_draws()
        click.echo(f"run {run.config.run_dir}  (config {run.config_hash[:12]})")
        click.echo(f"  images {len(run.image_ids)}, units {len(plan.units)}, draws {plan.total_draws:,}, "
                   f"shards {plan.num_shards}: draws per shard {int(draws.min()):,}..{int(draws.max()):,}")
        hours = plan.total_draws / rate / 3600
        click.echo(f"  estimated cost: {hours:.3g} device-hours in all, {draws.max() / rate / 60:.3g} min for the "
                   f"largest shard, at {rate:,.0f} draws/s measured here ({where})")
        if run.config.early_stop is not None:
            from cpcluster.jobs.early_stop import estimate_saving

            click.echo(f"  {estimate_saving(run)}")
    if kind == "slurm":
        _print_sbatch(resolved, slurm)
    click.echo("dry run: nothing written or submitted")


def _print_sbatch(resolved, slurm: dict) -> None:
    """The sbatch script(s) each run's unfinished shards would be submitted with (cpcluster.orchestrate.slurm_dryrun.render_sbatch)."""
    from cpcluster.orchestrate import rundir
    from cpcluster.orchestrate.slurm_dryrun import render_sbatch

    options = slurm_options(resolved, slurm)
    for run in resolved:
        todo = run.plan.num_shards - len(rundir.complete_shards(run))
        scripts = render_sbatch(options, todo, _log_folder(run, "slurm")) if todo else []
        for i, script in enumerate(scripts, 1):
            click.echo(f"----- sbatch script {i} of {len(scripts)} for {run.config.run_dir} -----")
            click.echo(script.rstrip("\n"))


def estimate_rate(run, models) -> tuple[float, str]:
    """Draws/s of the run's purifier + classifier on this machine's best device, and a description of it."""
    import torch

    from cpcluster.core.engine import measure_rate
    from cpcluster.core.runs import build_purifier
    from cpcluster.jobs.certify import resolve_device
    from cpcluster.models.purifiers import SmoothedBase

    device = resolve_device("cpu" if run.config.device == "cpu" else "auto")
    model = SmoothedBase(build_purifier(run.config, models), models.classifier).to(device).eval()
    x, _ = models.dataset.get(run.image_ids[:1])
    batch = min(run.config.batch, 256 if device.type == "cuda" else 64)
    rate = measure_rate(model, torch.from_numpy(x).to(device), run.config.sigma, batch)
    return rate, f"{device.type}, forwards of {batch}, {torch.get_num_threads()} threads"


def _log_folder(run, kind: str) -> str:
    """submitit's folder for a run: ``<run_dir>/logs`` when the run dir is local, else ``./cpcluster-logs/<name>``.

    SLURM jobs get a ``%j`` sub-folder each (submitit fills in the job id).
    """
    from cpcluster.util.fileio import is_local

    if is_local(run.config.run_dir):
        folder = os.path.join(os.path.abspath(run.config.run_dir.removeprefix("file://")), "logs")
    else:
        folder = os.path.abspath(os.path.join("cpcluster-logs", run.config.run_dir.rstrip("/").rsplit("/", 1)[-1]))
    return os.path.join(folder, "%j") if kind == "slurm" else folder


def execute(resolved, kind: str, reason: str, *, overwrite: bool, workers: int | None, slurm: dict,
            only: dict | None = None) -> None:
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
    click.echo(f"executor: {kind} ({reason}){extra}")
    tasks = []
    for run in resolved:
        action = rundir.prepare_run_dir(run, overwrite)
        done = set(rundir.complete_shards(run))
        click.echo(f"run {run.config.run_dir}: {action}, {len(done)} of {run.plan.num_shards} shards complete")
        config = dataclasses.replace(run.config, threads=threads) if threads else run.config
        tasks += [Task(CertifyShardJob(config, k), _log_folder(run, kind), {"sigma": run.config.sigma, "shard": k})
                  for k in range(run.plan.num_shards)
                  if k not in done and (only is None or k in only.get(run.config.run_dir, ()))]
    if kind == "slurm":
        _submit(resolved, tasks, slurm)
    elif tasks:
        _run_here(resolved, tasks, kind, workers, gpus)
    _summary(resolved, kind)


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
        raise click.ClickException(f"{how}; recorded units are kept: rerun the same command to resume") from None
    finally:
        bar.close()


def slurm_options(resolved, slurm: dict):
    """The :class:`~cpcluster.orchestrate.slurm.SlurmOptions` of the shard jobs (one GPU each unless ``--device cpu``)."""
    return array_slurm_options(resolved[0].config.device, slurm, "cpcluster-certify")


def array_slurm_options(device: str, slurm: dict, job_name: str):
    """SlurmOptions of array shard jobs from :func:`shard_submit_options`' values: one GPU each unless CPU."""
    from cpcluster.orchestrate.slurm import SlurmOptions, parse_sbatch_options

    return SlurmOptions(partition=slurm["partition"], account=slurm["account"], time_min=slurm["time_min"],
                        gpus_per_node=None if device == "cpu" else 1, array_parallelism=slurm["array_parallelism"],
                        extra=parse_sbatch_options(slurm["sbatch_extra"]), job_name=job_name)


def _submit(resolved, tasks, slurm: dict) -> None:
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
        click.echo(f"submitted {len(jobs)} shard jobs of {run.config.run_dir} as SLURM job(s) {', '.join(ids)}; "
                   f"logs in {os.path.dirname(mine[0].folder)}")


def _summary(resolved, kind: str) -> None:
    from cpcluster.orchestrate import rundir

    for run in resolved:
        n = len(rundir.complete_shards(run))
        click.echo(f"shards: {run.config.run_dir}/shard-*-of-{run.plan.num_shards:05d}.h5 "
                   f"({n} of {run.plan.num_shards} complete)")
    dirs = " ".join(run.config.run_dir for run in resolved)
    when = "when the jobs have finished" if kind == "slurm" else "next"
    click.echo(f"{when}: cpcluster aggregate {dirs}")
