"""The certify shard job: one shard of a run, resumable, as a small picklable callable for submitit.

``CertifyShardJob(config, shard_index)()`` loads the dataset slice and the models on its device (CUDA when
available), recomputes the run's plan, and counts every unit of its shard that the shard's journal does not hold
yet, appending each unit's counts durably as soon as it is complete (:class:`cpcluster.core.shard_writer.ShardWriter`). At the
end it writes the HDF5 shard atomically. Killed at any moment and rerun (or requeued by submitit through
:meth:`CertifyShardJob.checkpoint`), it continues after the last recorded unit; a finished shard is a no-op.
SIGTERM (``scancel``, ``scontrol requeue``, a node drain) stops the shard right after the unit in progress is
recorded, with :class:`ShardTerminated` and the journal intact, instead of counting on until SLURM's SIGKILL.

By hand: ``python -m cpcluster.jobs.certify RUN_DIR SHARD_INDEX`` runs one shard of a prepared run directory.
"""
from __future__ import annotations

import logging
import socket
import sys
import time
from contextlib import contextmanager

from cpcluster.core.config import CertifyConfig
from cpcluster.util.errors import InputError
from cpcluster.util.signals import Terminated, stop_on_sigterm

log = logging.getLogger("cpcluster.certify")
LOG_EVERY_S = 30.0

# glibc mallopt parameters (malloc.h): keep freed memory instead of handing it back to the OS on every call
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_allocator() -> bool:
    """Stop glibc from unmapping large tensor buffers after every forward (DESIGN.md section 6); True if applied.

    Same effect as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` in the environment, but set from inside
    the process, for allocations made from now on. A no-op where glibc is not the C library.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class ShardTerminated(Terminated):
    """SIGTERM arrived while the shard was counting: it stopped after recording the unit in progress."""


class CertifyShardJob:
    """One shard of a certification run. Picklable; the work is in ``__call__``, which returns the shard URL."""

    def __init__(self, config: CertifyConfig, shard_index: int):
        self.config = config
        self.shard_index = int(shard_index)

    def __call__(self) -> str:
        import torch

        from cpcluster.core import runs

        _ensure_log_handler()
        config = self.config
        device = resolve_device(config.device)
        if device.type == "cpu" and config.tune_malloc:
            tune_allocator()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        models = runs.load_models(config)
        purifier = runs.build_purifier(config, models)
        run = runs.resolve(config, models, purifier)
        _check_run_record(run)
        return run_shard(run, models, purifier, self.shard_index, device)

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption / timeout hook: resubmit the same shard; progress is in its journal on disk."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.config, self.shard_index))

    def __repr__(self) -> str:
        return f"CertifyShardJob(sigma={self.config.sigma}, shard={self.shard_index}, run_dir={self.config.run_dir!r})"


def resolve_device(name: str):
    """``"auto"``: CUDA when available, else CPU. ``"cuda"`` without a GPU is an :class:`InputError`."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to this process; use --device auto or cpu")
    return torch.device(name)


def _check_run_record(run) -> None:
    """Refuse to add shards to a run directory whose ``run.json`` names another configuration."""
    from cpcluster.core.runs import read_run

    record = read_run(run.config.run_dir)
    if record is not None and (record.get("config_hash") != run.config_hash
                               or record.get("num_shards") != run.plan.num_shards):
        raise InputError(f"{run.config.run_dir}: run.json describes another run (config hash or shard count "
                         "differs; models or code changed since submission?); resubmit with --overwrite")


def run_shard(run, models, purifier, index: int, device) -> str:
    """Count the missing units of shard ``index`` of ``run`` on ``device``; finish the file; return its URL."""
    import numpy as np
    import torch

    from cpcluster.core.journal import journal_path, read_journal
    from cpcluster.core.shard_writer import ShardWriter
    from cpcluster.core.shards import unplanned_units

    url = run.shard_url(index)
    total = run.plan.num_shards
    if _finished(run, url, index, repair=False):
        return url
    units = run.plan.shard_units(index)
    images = run.plan.shard_images(index)
    label_of = dict(zip(run.image_ids.tolist(), run.labels.tolist()))
    labels = [label_of[int(i)] for i in images]
    start = time.time()
    info = {"index": index, "total": total, "unit_range": list(run.plan.ranges[index]), "host": socket.gethostname(),
            "device": str(device), "rng_device": device.type, "batch": run.config.batch,
            "torch": torch.__version__, "numpy": np.__version__, "start_time": start,
            "cost": cost_info(device, purifier)}
    with _shard_lock(journal_path(url, None)) as lock:
        if _finished(run, url, index, repair=True):  # another process finished it while we waited to start
            return url
        _remove_temporaries(url)
        first = read_journal(journal_path(url, None))
        if first is not None and first.header.get("shard", {}).get("rng_device") not in (None, device.type):
            info["rng_device"] = "mixed"  # valid, but the noise of this shard is not bit-reproducible
            info["cost"]["device_type"] = "mixed"  # its unit seconds come from two kinds of device
        writer = ShardWriter(url, config=run.shard_config, shard_info=info, image_index=images, labels=labels,
                             num_classes=run.shard_config["num_classes"])
        try:
            done = writer.done
            _note_session(lock, draws_at_start=sum(done.values()))
            outside = unplanned_units(np.asarray([(*k, v) for k, v in done.items()], dtype=np.int64), units)
            if len(outside):
                raise InputError(f"{writer.journal_path}: holds units outside this shard's plan; delete it")
            todo = np.asarray([u for u in units if tuple(int(v) for v in u[:3]) not in done],
                              dtype=np.int64).reshape(-1, 4)
            log.info("shard %d/%d on %s: %d units (%d draws) planned to do, %d already recorded", index, total,
                     device, len(todo), int(todo[:, 3].sum()), len(done))
            counter = _Counter(run, models, purifier, images, device, writer, index)
            skipped = None
            if run.config.early_stop is not None:
                from cpcluster.jobs.early_stop import count_in_rounds

                skipped = count_in_rounds(counter, units, dict(zip(images.tolist(), labels)), writer,
                                          run.config.n, run.config.early_stop)
            elif len(todo):
                counter.count(todo)
            info_end = counter.summary()
            result = writer.finish({"end_time": time.time(), "resumed_units": len(done), **info_end}, skipped)
        finally:
            writer.close()
    log.info("shard %d/%d complete: %s", index, total, result)
    return result


def cost_info(device, purifier) -> dict:
    """The shard attribute's ``cost`` entry: what one device-second buys (device type and name, torch threads on a
    CPU) and the network evaluations per draw (purifier NFE + one classifier forward)."""
    import platform

    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
        except OSError:
            pass
    return {"device_type": device.type, "device_name": name, "devices": 1,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "nfe_per_draw": {"purifier": int(purifier.nfe), "classifier": 1}}


def _finished(run, url: str, index: int, repair: bool) -> bool:
    """True when the shard file exists and is a finished shard of this run (:func:`cpcluster.core.runs.verified_shard`).

    A file of another run configuration is an :class:`InputError` (never replaced). A damaged one (truncated,
    edited, marked incomplete, other units) is not finished: with ``repair`` (only under the shard's lock) it is
    moved aside to ``<file>.damaged`` so that the shard is counted again.
    """
    from cpcluster.core.runs import ShardMismatch, verified_shard
    from cpcluster.util.fileio import exists

    if not exists(url):
        return False
    try:
        verified_shard(url, run.config_hash, run.plan.shard_units(index))
    except ShardMismatch:
        raise InputError(f"{url}: exists but belongs to another run configuration; use --overwrite") from None
    except InputError as e:
        if repair:
            log.warning("shard %d/%d: %s; moved to %s.damaged, counting the shard again", index,
                        run.plan.num_shards, e, url)
            _move(url, url + ".damaged")
        return False
    log.info("shard %d/%d: already complete at %s", index, run.plan.num_shards, url)
    return True


def _move(src: str, dst: str) -> None:
    from cpcluster.util.fileio import filesystem

    fs, path = filesystem(src)
    fs.mv(path, filesystem(dst)[1])


def _remove_temporaries(url: str) -> None:
    """Delete what a process killed while finishing this shard left: ``<file>.*.tmp`` / ``<file>.tmp`` (they are
    partial copies of the shard file; its journal still holds every unit)."""
    from cpcluster.util.fileio import filesystem

    fs, path = filesystem(url)
    for stale in fs.glob(path + ".*tmp"):
        if stale.endswith(".tmp"):
            log.info("removing %s, left by a process killed while finishing this shard", stale)
            fs.rm(stale)


class _Counter:
    """Counts units of one shard with one engine (built on first use), recording each unit in the shard's journal
    with the device-seconds since the previous unit completed (its cost; the units of a forward share it).

    ``count(units)`` may be called several times (early stopping counts in rounds); SIGTERM stops it right after
    the unit in progress is recorded, with :class:`ShardTerminated`.
    """

    def __init__(self, run, models, purifier, images, device, writer, index: int):
        self.run, self.models, self.purifier, self.images = run, models, purifier, images
        self.device, self.writer, self.index = device, writer, index
        self.engine, self.draws, self.seconds, self.forwards = None, 0, 0.0, 0
        self._last_log = self._last_unit = time.perf_counter()

    def _build(self):
        import torch

        from cpcluster.core.engine import CountingEngine
        from cpcluster.models.purifier_base import SmoothedBase

        x, _ = self.models.dataset.get(self.images)
        model = SmoothedBase(self.purifier, self.models.classifier).to(self.device).eval()
        cfg = self.run.config
        return CountingEngine(model, torch.from_numpy(x).to(self.device), self.images, sigma=cfg.sigma,
                              seed=cfg.seed, block_size=cfg.block_size, draw_batch=cfg.draw_batch, batch=cfg.batch,
                              num_classes=self.run.shard_config["num_classes"], dtype=cfg.dtype)

    def count(self, units) -> None:
        """Count ``units`` (u, 4) and record each in the journal as it completes."""
        if self.engine is None:
            self.engine = self._build()
        planned = int(units[:, 3].sum())

        def progress(stats):
            if time.perf_counter() - self._last_log >= LOG_EVERY_S:
                self._last_log = time.perf_counter()
                eta = (planned - stats.draws) / stats.draws_per_s if stats.draws_per_s else float("nan")
                log.info("shard %d: %d/%d draws of this round, %.0f draws/s, ETA %.0f s", self.index, stats.draws,
                         planned, stats.draws_per_s, eta)

        self._last_unit = time.perf_counter()
        with stop_on_sigterm("after the unit in progress is recorded") as terminated:
            def record(unit, counts):
                now = time.perf_counter()  # device time since the previous unit's completion: this unit's cost
                self.writer.append(unit, counts, seconds=now - self._last_unit)
                self._last_unit = now
                if terminated():
                    raise ShardTerminated(f"shard {self.index}: stopped by SIGTERM after {len(self.writer.done)} "
                                          "recorded units; rerun it (cpcluster resubmit RUN_DIR) to continue from "
                                          "its journal")

            stats = self.engine.run(units, on_unit=record, on_progress=progress)
        self.draws += stats.draws
        self.seconds += stats.seconds
        self.forwards += stats.forwards
        log.info("shard %d: %d draws in %.1f s, %.0f draws/s", self.index, stats.draws, stats.seconds,
                 stats.draws_per_s)

    def summary(self) -> dict:
        """Shard-info entries of this session's counting (none when it counted nothing); ``padded_draws``: rows
        of fixed-shape forwards that held no draw (the last forward of every engine run is padded)."""
        if not self.draws:
            return {}
        return {"draws_per_s": round(self.draws / max(self.seconds, 1e-9), 3), "seconds": round(self.seconds, 3),
                "forwards": self.forwards, "padded_draws": self.forwards * self.run.config.batch - self.draws}


def _note_session(lock_file, draws_at_start: int) -> None:
    """Write this session's start into the held lock file, for ``cpcluster status`` to measure its speed.

    The journal's header keeps the first session's start; after a requeue its draws over that span would count the
    time spent dead or in the queue, so the status reads the running session's draws and start from here.
    """
    import json
    import os

    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(json.dumps({"start_time": time.time(), "draws_at_start": int(draws_at_start),
                                "host": socket.gethostname(), "pid": os.getpid()}))
    lock_file.flush()


@contextmanager
def _shard_lock(journal_path: str):
    """Hold an exclusive lock on ``<journal>.lock`` so two processes never append to one shard at once."""
    import fcntl
    import os

    fh = open(journal_path + ".lock", "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()  # another process holds it: its lock file stays
        raise InputError(f"{journal_path}: another process is running this shard right now") from None
    try:
        yield fh
    finally:  # also when the shard fails or is stopped: the lock file only means something while held
        fh.close()
        try:
            os.remove(journal_path + ".lock")
        except OSError:
            pass


def _ensure_log_handler() -> None:
    """Send cpcluster's INFO lines to stdout (submitit's log file) unless logging is configured already."""
    logger = logging.getLogger("cpcluster")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


USAGE = "usage: python -m cpcluster.jobs.certify RUN_DIR SHARD_INDEX [--denoiser SPEC] [--classifier SPEC]"


def main(argv=None) -> int:
    """``python -m cpcluster.jobs.certify RUN_DIR SHARD_INDEX``: run one shard of a prepared run by hand.

    The run is rebuilt from ``RUN_DIR/run.json``; a recorded spec that runs code when loaded must be repeated with
    ``--denoiser`` / ``--classifier`` (:func:`cpcluster.models.specs.confirm_recorded_specs`).
    """
    from cpcluster.core.runs import recorded_run
    from cpcluster.models.specs import confirm_recorded_specs

    args = list(sys.argv[1:] if argv is None else argv)
    given = {}
    while len(args) > 2 and args[-2] in ("--denoiser", "--classifier"):
        given[args[-2]] = args[-1]
        del args[-2:]
    if len(args) != 2 or not args[1].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    try:
        _, config = recorded_run(args[0])
        confirm_recorded_specs({"--denoiser": config.denoiser, "--classifier": config.classifier}, given,
                               f"{args[0]}/run.json")
        print(CertifyShardJob(config, int(args[1]))())
    except InputError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    except ShardTerminated as e:
        print(f"Stopped: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    return 0


if __name__ == "__main__":
    sys.exit(main())
