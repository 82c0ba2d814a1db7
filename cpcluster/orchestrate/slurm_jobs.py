"""Submitted SLURM jobs after the fact: their records in a run directory, and their states from SLURM.

* :func:`record_jobs` / :func:`read_jobs` keep the submitted job ids in ``<run_dir>/jobs.jsonl`` so that later
  commands (``status``, ``resubmit``) find them;
* :func:`query_job_states` asks SLURM where those jobs stand: ``squeue`` first (the controller's live view: every
  pending and running job, and finished ones for ``MinJobAge`` seconds), then ``sacct`` (accounting, for jobs the
  controller has forgotten). Pending array tasks that ``sacct`` folds into one row (``123_[2-4%2]``) are expanded.

Limits worth knowing. Accounting reaches ``sacct`` a little after the controller, so a job just submitted or just
finished may be missing there for a while; callers treat "unknown" as "not known yet" for a grace period. An array
task cancelled while still pending disappears from both ``squeue`` and ``sacct``: unknown is also what a dead job
looks like once the grace period is over. Functions here never raise for an unreachable SLURM: they return None.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from cpcluster.util.errors import InputError

JOBS_FILE = "jobs.jsonl"

# Job states (squeue / sacct long names) by what they mean for a shard.
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING",
                            "SUSPENDED", "STOPPED"})
PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                            "SPECIAL_EXIT"})
FAILED_STATES = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                           "DEADLINE", "PREEMPTED", "REVOKED"})
COMPLETED = "COMPLETED"


# -------------------------------------------------------------------------------------------- job records
def _job_record(job, tags: dict | None) -> dict:
    job_id = str(job.job_id)
    main, _, task = job_id.partition("_")
    record = {
        "job_id": job_id,
        "array_job_id": main if task else None,
        "array_task": int(task) if task.isdigit() else None,
        "backend": type(job).__name__.replace("Job", "").lower() or "job",
        "log_folder": str(job.paths.folder),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record.update(tags or {})
    return record


@contextlib.contextmanager
def _lock(path: str):
    """Serialize writers of one local file across processes (no-op for non-local URLs)."""
    if "://" in path and not path.startswith("file://"):
        yield
        return
    import fcntl

    local = path[len("file://"):] if path.startswith("file://") else path
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    with open(local + ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def record_jobs(run_dir: str, jobs: Sequence, tags: Sequence[dict] | None = None) -> list[dict]:
    """Append one JSON line per job to ``<run_dir>/jobs.jsonl``, atomically; return the records written.

    Each record holds ``job_id``, ``array_job_id`` and ``array_task`` (None for a plain job), ``backend``
    (``"slurm"``, ``"local"``...), ``log_folder`` and ``submitted_at`` (UTC), plus ``tags[i]`` for job ``i``
    (e.g. ``{"shard": 3, "sigma": 0.5}``). The file is rewritten through a temporary name (readers see the old
    or the new file, never a torn line); concurrent writers on a local filesystem are serialized by a lock file.
    """
    from cpcluster.util.fileio import filesystem, join_url, read_regular, write_bytes_atomic

    if tags is not None and len(tags) != len(jobs):
        raise ValueError(f"record_jobs: {len(jobs)} jobs but {len(tags)} tags")
    url = join_url(str(run_dir), JOBS_FILE)
    records = [_job_record(job, tags[i] if tags is not None else None) for i, job in enumerate(jobs)]
    with _lock(url):
        fs, path = filesystem(url)
        old = read_regular(url, max_bytes=MAX_JOBS_BYTES) if fs.exists(path) else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        new = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
        write_bytes_atomic(url, old + new)
    return records


MAX_JOBS_BYTES = 256 * 2**20


def read_jobs(run_dir: str) -> list[dict]:
    """The records of ``<run_dir>/jobs.jsonl`` in submission order (empty when the file does not exist).

    Every line must be a JSON object whose ``job_id`` is a string or an integer (returned as a string) and whose
    ``shard``, when present, is an integer; anything else is an :class:`InputError` naming the file and the line.
    """
    from cpcluster.util.fileio import filesystem, join_url, parse_json, read_regular

    url = join_url(str(run_dir), JOBS_FILE)
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    out = []
    for n, line in enumerate(read_regular(url, max_bytes=MAX_JOBS_BYTES).splitlines(), 1):
        if line.strip():
            try:
                record = parse_json(line, f"line {n}")
                job_id, shard = record.get("job_id"), record.get("shard")
                if isinstance(job_id, bool) or not isinstance(job_id, (str, int)) or not str(job_id):
                    raise InputError(f"line {n}: job_id must be a string")
                if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int)):
                    raise InputError(f"line {n}: shard must be an integer")
            except InputError as e:
                raise InputError(f"{url}: {e}; the job record file is damaged (remove that line)") from None
            out.append({**record, "job_id": str(job_id)})
    return out


def slurm_reachable(timeout_s: float = 10.0) -> bool:
    """True when ``sinfo`` answers (a controller is reachable from here)."""
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=timeout_s).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# --------------------------------------------------------------------------------------------- job states
@dataclass(frozen=True)
class JobState:
    """Where one SLURM job (or array task) stands.

    Attributes
    ----------
    job_id : str
        ``"<id>"`` or ``"<array id>_<task>"``, as submitit records it.
    state : str
        SLURM's long state name without qualifiers (``"CANCELLED by 0"`` -> ``"CANCELLED"``).
    reason : str
        squeue's reason (``"JobArrayTaskLimit"``...) or sacct's exit code ``"rc:signal"``; may be empty.
    source : str
        ``"squeue"`` or ``"sacct"``.
    """

    job_id: str
    state: str
    reason: str = ""
    source: str = ""


_ARRAY_ROW = re.compile(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$")


def expand_job_id(text: str) -> list[str]:
    """``"123_[2-4,7%2]"`` -> ``["123_2", "123_3", "123_4", "123_7"]``; ``"123_5"`` and ``"123"`` stay as they are.

    That folded form is how ``sacct`` (and ``squeue`` without ``-r``) show the still-pending tasks of an array.
    """
    text = text.strip()
    match = _ARRAY_ROW.match(text)
    if not match:
        return [text]
    main, spec = match.groups()
    out = []
    for item in spec.split(","):
        lo, dash, hi = item.partition("-")
        out += [f"{main}_{t}" for t in (range(int(lo), int(hi) + 1) if dash else [int(lo)])]
    return out


def _clean_state(text: str) -> str:
    return text.strip().split(" ", 1)[0].rstrip("+").upper()


def parse_squeue(text: str) -> dict[str, JobState]:
    """Rows ``JOBID|STATE|REASON`` (``squeue -h -r -t all -o '%i|%T|%r'``) -> ``{job_id: JobState}``."""
    out = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip():
            continue
        for job_id in expand_job_id(parts[0]):
            out[job_id] = JobState(job_id, _clean_state(parts[1]), parts[2].strip() if len(parts) > 2 else "",
                                   "squeue")
    return out


def parse_sacct(text: str) -> dict[str, JobState]:
    """Rows ``JobID|State|ExitCode`` (``sacct -n -X -P -o JobID,State,ExitCode``) -> ``{job_id: JobState}``.

    Job steps (``123.batch``) and heterogeneous components (``123+0``) are skipped; a folded pending array row
    stands for each of its tasks. When accounting lists one id twice, the last row wins (sacct's order).
    """
    out = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip() or "." in parts[0] or "+" in parts[0]:
            continue
        for job_id in expand_job_id(parts[0]):
            out[job_id] = JobState(job_id, _clean_state(parts[1]), parts[2].strip() if len(parts) > 2 else "",
                                   "sacct")
    return out


def _run(command: list[str], timeout_s: float):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None


def query_job_states(job_ids: Iterable[str], timeout_s: float = 30.0) -> dict[str, JobState] | None:
    """The states SLURM knows for ``job_ids`` (plain ids or ``<array>_<task>``); None when SLURM is unreachable.

    ``squeue`` answers for the jobs the controller holds (pending, running, and finished within ``MinJobAge``);
    ``sacct`` fills in the others when accounting runs (without it, those are simply absent). A job in neither is
    absent from the result: not visible yet, cancelled while pending, or forgotten.
    """
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    arrays = sorted({j.partition("_")[0] for j in ids}, key=lambda s: (len(s), s))
    out = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r", "-j", ",".join(arrays)], timeout_s)
    if out is None:
        return None
    if out.returncode != 0:
        if "invalid job id" not in out.stderr.lower():  # squeue fails when none of the ids is known any more
            return None
        live = {}
    else:
        live = parse_squeue(out.stdout)
    states = {}
    missing = [j for j in ids if j not in live]
    if missing:
        acct = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode", "-j",
                     ",".join(sorted({j.partition("_")[0] for j in missing}))], timeout_s)
        if acct is not None and acct.returncode == 0:
            states.update(parse_sacct(acct.stdout))
    states.update(live)  # the controller's view is the newer one
    return {j: states[j] for j in ids if j in states}


__all__ = [
    "COMPLETED", "FAILED_STATES", "JOBS_FILE", "JobState", "PENDING_STATES", "RUNNING_STATES", "expand_job_id",
    "parse_sacct", "parse_squeue", "query_job_states", "read_jobs", "record_jobs", "slurm_reachable",
]
