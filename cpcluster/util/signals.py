"""SIGTERM as a request to stop at the next safe point, for the jobs (``scancel``, ``scontrol requeue``, a drain).

submitit ignores SIGTERM in its jobs (it checkpoints on USR2), so without this a cancelled job would keep working
through SLURM's ``KillWait`` and be killed mid-step. Inside :func:`stop_on_sigterm` a SIGTERM only sets a flag;
the job stops at its next safe point (after a recorded unit, after a checkpoint) and raises :class:`Terminated`.
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger("cpcluster")


class Terminated(RuntimeError):
    """SIGTERM arrived: the job stopped at a safe point; rerunning it continues from what it wrote."""


@contextmanager
def stop_on_sigterm(what: str):
    """Within the block SIGTERM sets a flag; yields ``terminated() -> bool``; restores the previous handler.

    ``what`` names the safe point in the warning ("after the unit in progress is recorded"). Outside the main
    thread, where Python cannot install signal handlers, the flag never rises.
    """
    received: list = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def note(signum, frame):
        if not received:
            log.warning("SIGTERM received: stopping %s", what)
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
