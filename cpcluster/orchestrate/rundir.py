"""A certification run's directory: preparing it, checking it, and the progress of its shards.

A run directory ``<out>/<name>/`` holds ``run.json`` (the resolved config: the shard config of DESIGN.md section 4
and its hash, the :class:`~cpcluster.core.config.CertifyConfig` it came from, the plan's size), the shard files
``shard-XXXXX-of-YYYYY.h5`` (and their journals while they run), ``jobs.jsonl`` (submitted job ids) and, for local
paths, submitit's ``logs/``.

Rules. A run directory belongs to one run configuration and one shard count: preparing it again with the same
config hash and shard count resumes it (finished shards are kept, unfinished ones continue from their journals);
anything else is refused unless ``overwrite``, which first removes the old shard files, journals and job records,
then writes the new ``run.json``. Nothing is written before every check has passed.
"""
from __future__ import annotations

import json
import os

from cpcluster.core.journal import journal_path, read_journal
from cpcluster.core.runs import RUN_FILE, ResolvedRun, read_run, verified_shard
from cpcluster.core.shards import shard_name
from cpcluster.orchestrate.slurm_jobs import JOBS_FILE
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import exists, filesystem, is_local, join_url, write_bytes_atomic


def check_run_dir(run: ResolvedRun, overwrite: bool = False) -> str:
    """What preparing ``run``'s directory would do: ``"new"``, ``"resume"`` or ``"overwrite"``; writes nothing.

    Raises :class:`InputError` when the directory holds another run (different config hash or shard count) and
    ``overwrite`` is False, or when the run record is damaged and ``overwrite`` is False.
    """
    try:
        old = read_run(run.config.run_dir)
    except InputError:
        if overwrite:
            return "overwrite"
        raise
    if old is None:
        leftovers = _leftovers(run.config.run_dir)
        if leftovers and not overwrite:
            raise InputError(f"{run.config.run_dir} holds shard files but no {RUN_FILE} (not made by this tool, or "
                             "damaged); use --overwrite to replace them, or another --out / --name")
        return "overwrite" if leftovers else "new"
    same = old.get("config_hash") == run.config_hash and old.get("num_shards") == run.plan.num_shards
    if same and not overwrite:
        return "resume"
    if overwrite:
        return "overwrite"
    diff = _config_difference(old, run)
    raise InputError(f"{run.config.run_dir} holds another run ({diff}); use --overwrite to replace it, or "
                     "another --out / --name")


def _config_difference(old: dict, run: ResolvedRun) -> str:
    if old.get("config_hash") == run.config_hash:
        return f"planned with {old.get('num_shards')} shards, not {run.plan.num_shards}"
    a, b = old.get("shard_config") or {}, run.shard_config
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "different " + ", ".join(keys[:4]) if keys else "different config"


def _leftovers(run_dir: str) -> list[str]:
    """Shard files, journals, temporaries and job records in ``run_dir`` (local or fsspec).

    Lock files are not listed: a running shard job holds one, and removing it would let a second process in.
    """
    fs, path = filesystem(run_dir)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    keep = [n for n in names if ((n.startswith("shard-") and ".h5" in n) or n in (RUN_FILE, JOBS_FILE))
            and not n.endswith(".lock")]
    return [join_url(run_dir, n) for n in keep]


def prepare_run_dir(run: ResolvedRun, overwrite: bool = False) -> str:
    """Check (see :func:`check_run_dir`), clear on overwrite, write ``run.json``; return the action taken.

    Raises :class:`InputError` naming the directory when it cannot be created or written.
    """
    action = check_run_dir(run, overwrite)
    if action == "overwrite":
        for url in _leftovers(run.config.run_dir):
            if not url.endswith(RUN_FILE):
                fs, path = filesystem(url)
                fs.rm(path)
        if not is_local(run.config.run_dir):  # journals of remote shards live in local scratch
            try:
                old_total = int((read_run(run.config.run_dir) or {}).get("num_shards", 0))
            except (InputError, TypeError, ValueError):
                old_total = 0
            for total in {old_total, run.plan.num_shards} - {0}:
                for k in range(total):
                    journal = journal_path(join_url(run.config.run_dir, shard_name(k, total)), None)
                    if os.path.exists(journal):
                        os.remove(journal)
    if action != "resume":
        try:
            write_bytes_atomic(join_url(run.config.run_dir, RUN_FILE),
                               json.dumps(run.record(), indent=1, sort_keys=True).encode("utf-8"))
        except OSError as e:
            raise InputError(f"--out {run.config.run_dir}: cannot write there ({e.strerror or e}); choose a "
                             "writable folder") from None
    return action


def check_writable(run_dir: str) -> None:
    """Raise :class:`InputError` unless ``run_dir`` (a local path) could be created and written; no-op for URLs."""
    fs, path = filesystem(run_dir)
    if "://" in run_dir and not run_dir.startswith("file://"):
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--out {run_dir}: {probe} is not a writable folder; choose a writable --out")


# ----------------------------------------------------------------------------------------------- progress
def shard_draws_done(run: ResolvedRun, index: int) -> int:
    """Draws of shard ``index`` already recorded: all of them once its file exists, else its journal's."""
    url = run.shard_url(index)
    if exists(url):
        return int(run.plan.shard_draws()[index])
    state = read_journal(journal_path(url, None))
    if state is None or state.header.get("config_hash") != run.config_hash:
        return 0
    return int(state.units[:, 3].sum())


def complete_shards(run: ResolvedRun) -> list[int]:
    """Indices of the shards whose final file exists and passes :func:`verified_shard` (the checks of
    ``cpcluster status`` and ``aggregate``): a truncated or damaged file does not count as done."""
    done = []
    for k in range(run.plan.num_shards):
        url = run.shard_url(k)
        if exists(url):
            try:
                verified_shard(url, run.config_hash, run.plan.shard_units(k))
            except InputError:
                continue
            done.append(k)
    return done
