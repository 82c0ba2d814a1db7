"""Progress bars for long local work: live on a terminal, a line every 30 s in a log file.

tqdm redraws with carriage returns; in a log (``make demo | tee``, CI, a SLURM output file) every redraw is kept,
so when stderr is not a terminal the bar redraws at most every :data:`LOG_INTERVAL_S` seconds instead.
"""
from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def progress_bar(total: int, unit: str, desc: str, stream=None):
    """A tqdm bar on ``stream`` (stderr): redrawn every second on a terminal, every 30 s otherwise."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, unit=unit, unit_scale=unit != "step", desc=desc, file=stream,
                mininterval=1.0 if interactive else LOG_INTERVAL_S, dynamic_ncols=interactive)


def advance_to(bar, done: int) -> None:
    """Move ``bar`` to ``done`` (an absolute count polled from disk); redraws only as often as the bar allows."""
    if done > bar.n:
        bar.update(done - bar.n)
