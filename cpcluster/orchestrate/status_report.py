"""The text ``cpcluster status`` prints: one table per run (:func:`format_status`), durations (:func:`format_duration`).

The states and numbers come from :func:`cpcluster.orchestrate.status.collect`; nothing here reads files or asks SLURM.
"""
from __future__ import annotations

from cpcluster.orchestrate.status import RunStatus, STATES


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``"1m 15s"``, ``90000`` -> ``"1d 1h"``; None -> ``"unknown"``."""
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {s % size // subsize}{sub}"
    return f"{s}s"


def format_status(status: RunStatus, all_shards: bool | None = None) -> str:
    """The table ``cpcluster status`` prints for one run (every shard when ``all_shards`` or at most 40 shards,
    else the unfinished ones), then the totals and, if any, the failed shards."""
    shown = status.shards if (all_shards or (all_shards is None and len(status.shards) <= 40)) else \
        [s for s in status.shards if s.state != "complete"]
    lines = [f"run {status.run_dir}  (config {status.config_hash[:12]}, sigma {status.sigma:g}, "
             f"{len(status.shards)} shards; SLURM: {status.slurm})"]
    head = ("shard", "state", "units", "draws", "draws/s", "job", "slurm", "note")
    rows = [(str(s.index), s.state, f"{s.units_done}/{s.units_planned}", f"{s.draws_done:,}/{s.draws_planned:,}",
             f"{s.draws_per_s:,.0f}" if s.draws_per_s else "-", s.job_id or "-", s.slurm_state or "-", s.detail)
            for s in shown]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        lines.append("  ".join(c.rjust(w) if i in (0, 2, 3, 4) else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    if len(shown) < len(status.shards):
        lines.append(f"({len(status.shards) - len(shown)} complete shards not listed; --all lists them)")
    counts = ", ".join(f"{status.count(st)} {st}" for st in STATES if status.count(st))
    done, planned = status.draws_done, status.draws_planned
    rate = status.draws_per_s
    speed = f"{rate:,.0f} draws/s" if rate else "done" if done >= planned else \
        "speed not measured yet" if status.count("running") else "no shard running"
    lines.append(f"total: {counts}; draws {done:,}/{planned:,} ({100 * done / planned:.1f}%); {speed}; "
                 f"ETA {format_duration(status.eta_s)}")
    if status.failed:
        lines.append("failed: " + "; ".join(f"shard {s.index} ({s.detail})" for s in status.failed))
        lines.append(f"rerun them with: cpcluster resubmit {status.run_dir}")
    return "\n".join(lines) + "\n"
