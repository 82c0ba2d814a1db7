"""The crash-safe writer of one shard file (the format is :mod:`cpcluster.core.shards`; DESIGN.md section 4).

HDF5 metadata is not written atomically: a process killed inside an HDF5 write can leave a file that no longer
opens, losing every unit in it. So progress is not kept in the HDF5 file while a shard runs. It is appended to a
*journal* beside it (``<final>.journal``, :mod:`cpcluster.core.journal`): a header, then one fixed-size record per
unit with a CRC32, flushed and fsynced before ``append`` returns. On restart the journal is read up to the last
intact record (a torn tail is cut off), so a unit is either fully recorded or not at all and is never counted
twice. ``finish`` writes the HDF5 file to a temporary name and renames it into place, reads it back and checks it,
then removes the journal: a reader sees either no shard file or a complete one.

For local paths the journal lives beside the final file; for other filesystems (object stores, ``memory://``) it
lives in a local scratch folder (``CPCLUSTER_SCRATCH`` or the system temp folder) and the finished file is uploaded
to ``<final>.tmp`` and moved into place.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Sequence

import numpy as np

from cpcluster.core.journal import (JOURNAL_VERSION, encode_header, encode_record, journal_path,
                                    read_journal)
from cpcluster.core.shards import data_checksum, encode_shard, read_shard
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import config_hash, write_bytes_atomic


class ShardWriter:
    """Append-only, crash-safe writer of one shard (see the module docstring for the guarantees).

    Parameters
    ----------
    url : final shard location (local path or fsspec URL), normally ``<run>/shard-XXXXX-of-YYYYY.h5``.
    config : the run config (JSON-serializable); its ``config_hash`` must match an existing journal's.
    shard_info : JSON-serializable facts about this shard (index, total, planned unit range, host, device, ...).
    image_index, labels : (M,) int arrays, the images this shard touches and their true labels.
    num_classes : C, the width of each counts row.

    Reopening a shard whose journal exists continues it: ``done`` lists the units already recorded.
    """

    def __init__(self, url: str, *, config: dict, shard_info: dict, image_index: Sequence[int],
                 labels: Sequence[int], num_classes: int, scratch_dir: str | None = None):
        self.url = url
        self.config = config
        self.config_hash = config_hash(config)
        self.num_classes = int(num_classes)
        self.shard_info = dict(shard_info)
        self.image_index = np.asarray(image_index, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.journal_path = journal_path(url, scratch_dir)
        os.makedirs(os.path.dirname(os.path.abspath(self.journal_path)), exist_ok=True)
        state = read_journal(self.journal_path)
        if state is not None and (state.header.get("config_hash") != self.config_hash
                                  or state.version != JOURNAL_VERSION):
            raise InputError(f"{self.journal_path}: unfinished shard of a different run configuration (or of an "
                             "older cpcluster); delete it or use another output directory")
        if state is None:
            self._create()
            self._units, self._counts, self._seconds = [], [], []
        else:
            with open(self.journal_path, "r+b") as fh:  # cut a torn tail record
                fh.truncate(state.valid_bytes)
            self._units = [tuple(int(v) for v in row) for row in state.units]
            self._counts = [row.copy() for row in state.counts]
            self._seconds = state.seconds.tolist()
        self._done = {u[:3]: u[3] for u in self._units}
        self._images = set(self.image_index.tolist())
        self._fh = open(self.journal_path, "ab")

    def _create(self) -> None:
        header = {"config_hash": self.config_hash, "num_classes": self.num_classes, "config": self.config,
                  "shard": self.shard_info, "image_index": self.image_index.tolist(),
                  "labels": self.labels.tolist()}
        tmp = self.journal_path + ".tmp"
        with _write_errors(self.journal_path):
            with open(tmp, "wb") as fh:
                fh.write(encode_header(header))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.journal_path)

    @property
    def done(self) -> dict:
        """``{(image, stream, block): n_draws}`` of every unit already recorded."""
        return dict(self._done)

    def append(self, unit: Sequence[int], counts: np.ndarray, seconds: float = float("nan")) -> None:
        """Record one unit ``(image, stream, block, n_draws)`` with its (C,) class counts and the device-seconds
        spent on it (NaN: unknown); durable on return."""
        image, stream, block, n_draws = (int(v) for v in unit)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if counts.shape != (self.num_classes,):
            raise ValueError(f"counts must have shape ({self.num_classes},), got {counts.shape}")
        if (image, stream, block) in self._done:
            raise ValueError(f"unit {(image, stream, block)} is already recorded in {self.url}")
        if int(counts.sum()) != n_draws or (counts < 0).any():
            raise ValueError(f"counts of unit {(image, stream, block)} do not sum to n_draws={n_draws}")
        if image not in self._images:
            raise ValueError(f"unit {(image, stream, block)}: image {image} is not one of this shard's images")
        with _write_errors(self.journal_path):
            self._fh.write(encode_record((image, stream, block, n_draws), counts.tolist(), seconds))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        self._units.append((image, stream, block, n_draws))
        self._counts.append(counts)
        self._seconds.append(float(seconds))
        self._done[(image, stream, block)] = n_draws

    @property
    def recorded(self) -> tuple:
        """``(units (U, 4), counts (U, C))`` int64 of every unit recorded so far, in the order recorded."""
        return (np.asarray(self._units, dtype=np.int64).reshape(-1, 4),
                np.asarray(self._counts, dtype=np.int64).reshape(-1, self.num_classes))

    def finish(self, shard_info_update: dict | None = None, skipped=None) -> str:
        """Write the complete HDF5 shard atomically (temp name + rename), read it back and check it against what
        was written (its ``data_sha256``), then remove the journal; return its URL. ``skipped``: (S, 5) planned
        units not counted and why (:mod:`cpcluster.core.shard_extras`), or None.

        A write that fails (a full disk) is an :class:`InputError` naming the file and the cause; the journal is
        kept, so rerunning the shard finishes it without recounting.
        """
        info = {**self.shard_info, **(shard_info_update or {})}
        units, counts = self.recorded
        seconds = np.asarray(self._seconds, dtype=np.float64)
        if not np.isnan(seconds).all():
            info["device_seconds"] = float(np.nansum(seconds))
        payload = encode_shard(self.config, info, units, counts, self.image_index, self.labels, complete=True,
                               skipped=skipped, seconds=seconds)
        with _write_errors(self.url):
            write_bytes_atomic(self.url, payload)
        written = read_shard(self.url)
        if data_checksum(written.units, written.counts, written.image_index, written.labels) != data_checksum(
                units, counts, self.image_index, self.labels):
            raise InputError(f"{self.url}: the shard file read back differs from what was written; the journal "
                             "is kept, rerun the shard")
        self.close()
        os.remove(self.journal_path)
        return self.url

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def _write_errors(url: str):
    """An ``OSError`` while writing shard state (ENOSPC, EDQUOT, EROFS...) as one :class:`InputError` naming the
    file and the cause; what was recorded before stays on disk."""
    try:
        yield
    except OSError as e:
        cause = e.strerror or str(e)
        code = errno.errorcode.get(e.errno, "")
        raise InputError(f"{url}: cannot write ({cause}{', ' + code if code else ''}); free space or fix the "
                         "folder, then rerun: the units recorded so far are kept") from None
