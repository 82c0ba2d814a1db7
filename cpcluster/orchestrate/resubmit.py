"""``cpcluster resubmit`` as a function: rerun the shards of certify runs that failed, are missing or stopped
partway, never a complete, running or pending one.

Each run is rebuilt from its ``run.json`` and must resolve to the same configuration (same models, data and code);
a recorded spec that runs code when loaded is used only when the user repeats it. The shards go through the same
path ``cpcluster certify`` uses (:func:`cpcluster.orchestrate.certify.execute`), which records the new jobs. SLURM
settings not given are those of the runs' latest submission.
"""
from __future__ import annotations

from typing import Callable

from cpcluster.orchestrate.certify_plan import SLURM_DEFAULTS
from cpcluster.util.errors import InputError


def resubmit_runs(run_dirs, executor: str, given_specs: dict, slurm_given: dict, slurm_fallback: dict | None = None,
                  *, workers: int | None = None, dry_run: bool = False, echo: Callable[[str], None] = print) -> None:
    """Rerun the failed, missing and partial shards of ``run_dirs``; say per run how many and which.

    ``given_specs``: ``{"--denoiser": spec or None, "--classifier": ...}`` as typed (they must confirm the
    recorded specs that run code); ``slurm_given`` / ``slurm_fallback``: SLURM settings given on the command line /
    from the environment (see :func:`slurm_settings`). ``dry_run`` says which shards would run and submits
    nothing.
    """
    from cpcluster.orchestrate.certify import execute
    from cpcluster.orchestrate.status import collect, resubmittable
    from cpcluster.orchestrate.submit import choose_executor

    statuses = collect(list(run_dirs))
    unreachable = [s.run_dir for s in statuses if s.slurm == "unreachable"]
    if unreachable:
        raise InputError(f"{unreachable[0]}: its shards went to SLURM, which does not answer from here, so running "
                         "jobs cannot be told from dead ones; run resubmit where squeue works")
    todo = {s.run_dir: resubmittable(s) for s in statuses}
    resolved = [resolve_recorded(run_dir, given_specs) for run_dir in todo if todo[run_dir]]  # refuses outdated
    for s in statuses:
        others = ", ".join(f"{s.count(st)} {st}" for st in ("complete", "running", "pending") if s.count(st))
        echo(f"{s.run_dir}: {len(todo[s.run_dir])} shard(s) to rerun"
             + (f" ({ranges(todo[s.run_dir])})" if todo[s.run_dir] else "") + (f"; {others}" if others else ""))
    if not any(todo.values()):
        echo("nothing to resubmit")
        return
    if dry_run:
        echo("dry run: nothing submitted")
        return
    kind, reason = choose_executor(executor)
    slurm = slurm_settings([r.config.run_dir for r in resolved], slurm_given, slurm_fallback)
    execute(resolved, kind, reason, overwrite=False, workers=workers, slurm=slurm,
            only={run_dir: set(shards) for run_dir, shards in todo.items()}, echo=echo)


def ranges(indices) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            out.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(out)


def resolve_recorded(run_dir: str, given: dict):
    """The run of ``run_dir`` rebuilt from its ``run.json`` (models loaded); refused when it no longer matches.

    ``given``: the specs typed on the command line, which must confirm any recorded spec that runs code
    (:func:`cpcluster.models.specs.confirm_recorded_specs`), checked before anything is loaded.
    """
    from cpcluster.core import runs
    from cpcluster.models.specs import confirm_recorded_specs

    record, config = runs.recorded_run(run_dir)
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


def slurm_settings(run_dirs, given: dict, fallback: dict | None = None) -> dict:
    """The SLURM settings for resubmitting, each from the first source that has it: ``given`` (the command line),
    the runs' latest recorded submission, ``fallback`` (the ``CPCLUSTER_`` environment), :data:`SLURM_DEFAULTS`."""
    from cpcluster.orchestrate.slurm_jobs import read_jobs

    last = {}
    for run_dir in run_dirs:
        for record in read_jobs(run_dir):
            if isinstance(record.get("submit"), dict):
                last = record["submit"]
    out = {}
    for key, default in SLURM_DEFAULTS.items():
        for source in (given, last, fallback or {}):
            value = source.get(key)
            if value not in (None, (), []):
                out[key] = value
                break
        else:
            out[key] = default
    out["sbatch_extra"] = tuple(out["sbatch_extra"] or ())
    return out
