"""Where a certification run stands: the state of every shard, from its files, refined by SLURM when reachable.

A shard is in one of :data:`STATES`:

* ``complete``: its HDF5 file exists, is marked complete and carries the run's config hash;
* ``running``: SLURM runs its latest job (or the job is requeued and restarting), or a process on this machine
  holds the shard's lock file (a local run);
* ``pending``: its latest job waits in the queue (or was submitted moments ago and is not visible yet; or SLURM
  cannot be asked, the job was submitted and nothing is written yet);
* ``partial``: a journal holds some of its units but nothing works on it (an interrupted local run, or SLURM
  cannot be asked): ``resubmit`` continues it from the journal;
* ``failed``: its latest job ended (FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ..., or COMPLETED
  without writing the file) or is gone from SLURM, or its file is damaged or belongs to another configuration;
* ``missing``: nothing written and no job recorded for it.

Sources, in this order: the job records ``<run>/jobs.jsonl`` and SLURM's view of those jobs
(:func:`cpcluster.orchestrate.slurm_jobs.query_job_states`), then the files. SLURM is asked first because a job writes its
shard before it ends: a job seen COMPLETED is then always seen with its file. A job unknown to SLURM counts as not
visible yet for :data:`UNKNOWN_GRACE_S` after its submission (accounting lags), as gone afterwards.

Draws per second: a complete shard's own measurement (attribute ``shard.draws_per_s``); for a running or
partial shard, the draws in its journal over the time from the journal's creation to its last write (lower than
the true speed when the shard waited in between, e.g. after a requeue). The run's ETA is its remaining draws over
the summed speed of its running shards; unknown when none runs. Journals of runs on fsspec URLs live in each
node's scratch folder, so their progress is visible only on the node that ran them.
"""
from __future__ import annotations

import calendar
import time
from dataclasses import asdict, dataclass

from cpcluster.orchestrate.shard_files import ShardFiles, held_locks, shard_files
from cpcluster.util.errors import InputError

STATES = ("complete", "running", "pending", "partial", "failed", "missing")
RESUBMITTABLE = frozenset({"failed", "missing", "partial"})  # nothing works on them and they are unfinished
UNKNOWN_GRACE_S = 120.0
LOCK_HELD = "lock held on this machine"


@dataclass(frozen=True)
class ShardStatus:
    """One row of ``cpcluster status``."""

    index: int
    state: str
    units_done: int
    units_planned: int
    draws_done: int
    draws_planned: int
    draws_per_s: float | None
    job_id: str | None
    slurm_state: str | None
    detail: str


@dataclass(frozen=True)
class RunStatus:
    """The shards of one run directory, and the run's totals."""

    run_dir: str
    config_hash: str
    sigma: float
    shards: tuple
    slurm: str  # "reachable", "unreachable" or "unused" (no SLURM job recorded, or not asked)

    def count(self, state: str) -> int:
        return sum(s.state == state for s in self.shards)

    @property
    def failed(self) -> tuple:
        return tuple(s for s in self.shards if s.state == "failed")

    @property
    def draws_done(self) -> int:
        return sum(s.draws_done for s in self.shards)

    @property
    def draws_planned(self) -> int:
        return sum(s.draws_planned for s in self.shards)

    @property
    def draws_per_s(self) -> float | None:
        """Summed speed of the running shards (None when none runs or none has a measurement yet)."""
        rates = [s.draws_per_s for s in self.shards if s.state == "running" and s.draws_per_s]
        return float(sum(rates)) if rates else None

    @property
    def eta_s(self) -> float | None:
        """Seconds until the run is done at the current speed: 0 when complete, None when nothing runs."""
        left = self.draws_planned - self.draws_done
        if left <= 0:
            return 0.0
        rate = self.draws_per_s
        return left / rate if rate else None

    def to_dict(self) -> dict:
        counts = {state: self.count(state) for state in STATES}
        return {"run_dir": self.run_dir, "config_hash": self.config_hash, "sigma": self.sigma, "slurm": self.slurm,
                "states": counts, "draws_done": self.draws_done, "draws_planned": self.draws_planned,
                "draws_per_s": self.draws_per_s, "eta_s": self.eta_s, "shards": [asdict(s) for s in self.shards]}


# -------------------------------------------------------------------------------------------------- run record
def load_run(run_dir: str):
    """``(run.json record, CertifyConfig, Plan)`` of ``run_dir``, without loading models; InputError if unreadable.

    The plan is recomputed from the record (image selection from the dataset size it names) and checked against
    the record's unit and draw totals.
    """
    from cpcluster.core.runs import RUN_FILE, recorded_run
    from cpcluster.sharding.plan import plan_from_config

    record, config = recorded_run(run_dir)
    try:
        if not isinstance(record.get("config_hash"), str):
            raise TypeError("config_hash is not a string")
        plan = plan_from_config(record["shard_config"], config.num_shards)
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise InputError(f"{run_dir}/{RUN_FILE} cannot be read as a certify run ({type(e).__name__}: {e}); rerun "
                         "`cpcluster certify` with --overwrite") from None
    if (plan.num_shards, len(plan.units), plan.total_draws) != (record.get("num_shards"), record.get("num_units"),
                                                               record.get("total_draws")):
        raise InputError(f"{run_dir}/{RUN_FILE}: its plan does not match its own totals (written by another "
                         "version?); rerun `cpcluster certify` with --overwrite")
    return record, config, plan


# ---------------------------------------------------------------------------------------------------- decision
def _submitted_at(record: dict) -> float:
    try:
        return float(calendar.timegm(time.strptime(record["submitted_at"], "%Y-%m-%dT%H:%M:%SZ")))
    except (KeyError, TypeError, ValueError):
        return 0.0


def decide(files: ShardFiles, record: dict | None, job, queried: bool, now: float,
           grace_s: float = UNKNOWN_GRACE_S) -> tuple[str, str]:
    """``(state, detail)`` of one shard from its files, its latest job record and SLURM's view of that job.

    Parameters
    ----------
    files : ShardFiles
    record : dict or None
        The shard's latest SLURM job record (``jobs.jsonl``), None when it never went to SLURM.
    job : cpcluster.orchestrate.slurm_jobs.JobState or None
        SLURM's view of ``record``'s job; None when SLURM does not know it (or was not asked).
    queried : bool
        Whether SLURM answered; False means the states come from the files alone.
    now : float
        Unix time of the check (for the grace period of a job not visible yet).
    """
    from cpcluster.orchestrate.slurm_jobs import COMPLETED, PENDING_STATES, RUNNING_STATES

    if files.kind == "complete":
        return "complete", files.detail
    if files.kind == "bad":
        return "failed", files.detail
    jid = record.get("job_id") if record else None
    if record is not None and queried:
        if job is None:
            if not files.locked:
                if now - _submitted_at(record) < grace_s:
                    return "pending", f"job {jid} not visible in SLURM yet"
                return "failed", f"job {jid} is gone from SLURM (cancelled while pending, or purged)"
        elif job.state in RUNNING_STATES:
            return "running", ""
        elif job.state in PENDING_STATES:
            return "pending", job.reason if job.reason not in ("None", "(null)") else ""
        elif not files.locked:
            if job.state == COMPLETED:
                return "failed", f"job {jid} COMPLETED without writing the shard file; see its log"
            return "failed", f"job {jid} {job.state}" + (f" ({job.reason})" if job.source == "sacct"
                                                         and job.reason not in ("", "0:0") else "")
    unconfirmed = f"job {jid}; SLURM not reachable" if record is not None and not queried else ""
    if files.locked:
        return "running", LOCK_HELD
    if files.kind == "journal":
        return "partial", unconfirmed or "stopped; resubmit continues it"
    if record is not None and not queried:
        return "pending", unconfirmed
    return "missing", ""


def _latest_slurm_records(run_dir: str) -> dict:
    from cpcluster.orchestrate.slurm_jobs import read_jobs

    latest = {}
    for r in read_jobs(run_dir):
        if r.get("backend") == "slurm" and isinstance(r.get("shard"), int) and r.get("job_id"):
            latest[r["shard"]] = r
    return latest


def collect(run_dirs, use_slurm: bool = True, now: float | None = None) -> list[RunStatus]:
    """The :class:`RunStatus` of each run directory; SLURM is asked once for all their recorded jobs.

    Raises :class:`InputError` for a folder without a readable ``run.json`` (before anything else is read).
    """
    from cpcluster.orchestrate.slurm_jobs import query_job_states

    loaded = [(run_dir, *load_run(run_dir)) for run_dir in run_dirs]
    records = {run_dir: _latest_slurm_records(run_dir) for run_dir, *_ in loaded}
    ids = [r["job_id"] for recs in records.values() for r in recs.values()]
    states = query_job_states(ids) if ids and use_slurm else None
    queried = states is not None
    slurm = "unused" if not ids or not use_slurm else "reachable" if queried else "unreachable"
    now = time.time() if now is None else now
    held = held_locks()
    out = []
    for run_dir, record, config, plan in loaded:
        draws = plan.shard_draws()
        rows = []
        for k in range(plan.num_shards):
            lo, hi = plan.ranges[k]
            rec = records[run_dir].get(k)
            job = (states or {}).get(rec["job_id"]) if rec else None
            files = shard_files(run_dir, k, plan.num_shards, record["config_hash"], plan.shard_units(k), held)
            state, detail = decide(files, rec, job, queried, now)
            rows.append(ShardStatus(index=k, state=state, units_done=files.units, units_planned=int(hi - lo),
                                    draws_done=files.draws if files.kind != "bad" else 0,
                                    draws_planned=int(draws[k]), draws_per_s=files.draws_per_s,
                                    job_id=rec["job_id"] if rec else None,
                                    slurm_state=job.state if job else None, detail=detail))
        out.append(RunStatus(run_dir, record["config_hash"], config.sigma, tuple(rows), slurm))
    return out


def busy_shards(run_dir: str) -> list:
    """The :class:`ShardStatus` of each shard of ``run_dir``'s run that a live job works on or will: SLURM says its
    job runs or waits (or it was submitted moments ago), or a process on this machine holds its lock.

    Without an answer from SLURM only the local locks count. ``[]`` when the folder holds no readable run record.
    """
    try:
        (status,) = collect([run_dir])
    except InputError:
        return []
    return [s for s in status.shards if s.state in ("running", "pending")
            and (status.slurm == "reachable" and s.job_id is not None or s.detail == LOCK_HELD)]


def resubmittable(status: RunStatus) -> list[int]:
    """Shards to rerun: failed, missing or partial ones (never complete, running or pending ones)."""
    return [s.index for s in status.shards if s.state in RESUBMITTABLE]

