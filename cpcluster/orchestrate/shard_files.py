"""What the files of one shard say: its finished HDF5 file (checked as ``aggregate`` checks it), else its journal
and whether a process on this machine holds the journal's lock; and the shard's speed from them.

A journal holding units its shard does not plan, a damaged file and a file of another configuration are ``bad``.
The speed of a journal is that of the latest session that wrote it (the lock file records when it started and how
many draws were already there). :mod:`cpcluster.orchestrate.status` combines this with SLURM's view of the jobs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from cpcluster.core.shards import unplanned_units
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import parse_json, read_regular


@dataclass(frozen=True)
class ShardFiles:
    """What the files of one shard say: ``kind`` is ``complete``, ``journal``, ``none`` or ``bad``."""

    kind: str
    units: int = 0
    draws: int = 0
    draws_per_s: float | None = None
    locked: bool = False  # a process on this machine holds the shard's lock (it is running here)
    detail: str = ""


def held_locks() -> set:
    """``(major, minor, inode)`` of every file with a ``flock`` lock on this machine (``/proc/locks``)."""
    held = set()
    try:
        with open("/proc/locks") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return held
    for line in lines:
        parts = line.split()
        if "FLOCK" not in parts or "->" in parts:  # "->" marks a waiter, not a holder
            continue
        for part in parts:
            fields = part.split(":")
            if len(fields) == 3:
                try:
                    held.add((int(fields[0], 16), int(fields[1], 16), int(fields[2])))
                except ValueError:
                    pass
    return held


def _locked(path: str, held: set) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in held


def _read_complete(url: str, config_hash: str, planned: np.ndarray) -> ShardFiles:
    """A finished shard file, checked as ``certify``, ``resubmit`` and ``aggregate`` check it
    (:func:`cpcluster.core.runs.verified_shard`)."""
    from cpcluster.core.runs import ShardMismatch, verified_shard
    from cpcluster.core.shards import read_shard

    def bad(e: InputError, what: str) -> ShardFiles:
        reason = str(e).removeprefix(f"{url}: ").removesuffix("; re-run that shard")
        return ShardFiles("bad", detail=f"{what}{reason}; resubmit counts it again")

    try:
        shard = read_shard(url)
    except InputError as e:
        return bad(e, "shard file unreadable: ")
    try:
        verified_shard(url, config_hash, planned, shard)
    except ShardMismatch as e:
        return ShardFiles("bad", detail=str(e).removeprefix(f"{url}: "))
    except InputError as e:
        return bad(e, "")
    rate = shard.shard.get("draws_per_s")
    saved = int(shard.skipped[:, 3].sum())  # early stopping: planned, decided, not counted
    return ShardFiles("complete", len(shard.units) + len(shard.skipped), int(shard.units[:, 3].sum()) + saved,
                      float(rate) if isinstance(rate, (int, float)) and rate > 0 else None,
                      detail=f"{saved:,} draws skipped by early stopping" if saved else "")


def shard_files(run_dir: str, index: int, total: int, config_hash: str, planned: np.ndarray,
                held: set | None = None) -> ShardFiles:
    """The file state of shard ``index`` of ``total`` (planned units ``planned``): its HDF5 file, else its journal
    (and lock). A journal holding units its shard does not plan is ``bad``, as the shard job refuses it."""
    from cpcluster.core.journal import journal_path, read_journal
    from cpcluster.core.shards import shard_name
    from cpcluster.util.fileio import exists, join_url

    url = join_url(run_dir, shard_name(index, total))
    if exists(url):
        return _read_complete(url, config_hash, planned)
    journal = journal_path(url, None)
    locked = _locked(journal + ".lock", held_locks() if held is None else held)
    try:
        state = read_journal(journal)
    except InputError as e:
        return ShardFiles("bad", locked=locked, detail=str(e))
    if state is None:
        return ShardFiles("none", locked=locked)
    if state.header.get("config_hash") != config_hash:
        return ShardFiles("bad", locked=locked, detail="journal of another run configuration")
    outside = unplanned_units(state.units, planned)
    if len(outside):
        return ShardFiles("bad", locked=locked, detail=f"{journal}: holds units outside this shard's plan "
                          f"(first {tuple(int(v) for v in state.units[outside[0]])}); delete it")
    draws = int(state.units[:, 3].sum())
    return ShardFiles("journal", len(state.units), draws, _journal_speed(journal, state, draws), locked)


def _journal_speed(journal: str, state, draws: int) -> float | None:
    """Draws/s of the latest session that wrote ``journal``: its new draws over its start -> the last write.

    The session (start time, draws already recorded) is in the lock file the job writes when it starts; without
    one (a journal from an older version), the journal header's first start is used.
    """
    start, before = (state.header.get("shard") or {}).get("start_time"), 0
    try:
        session = parse_json(read_regular(journal + ".lock", max_bytes=4096), "lock file")
        start, before = float(session["start_time"]), int(session["draws_at_start"])
    except (InputError, ValueError, KeyError, TypeError, OverflowError):
        pass
    if not isinstance(start, (int, float)) or draws <= before:
        return None
    elapsed = os.path.getmtime(journal) - start
    return (draws - before) / elapsed if elapsed > 0 else None
