"""Shard files: the contract between ``certify`` (writer) and ``aggregate`` (reader); DESIGN.md section 4.

A finished shard is one HDF5 file ``<run>/shard-{index:05d}-of-{total:05d}.h5`` holding

* ``units``       (U, 4) int64 rows ``[image_index, stream, block, n_draws]`` (stream 0 = selection, 1 = estimation)
* ``counts``      (U, C) int64 class counts of each unit; every row sums to its ``n_draws``
* ``image_index`` (M,) int64 and ``labels`` (M,) int64: the images the shard touches and their true labels
* attrs ``config`` (canonical JSON), ``config_hash`` (sha256 hex of it), ``shard`` (JSON), ``complete`` (bool).

Crash safety. HDF5 metadata is not written atomically: a process killed inside an HDF5 write can leave a file
that no longer opens, losing every unit in it. So progress is not kept in the HDF5 file while a shard runs. It is
appended to a *journal* beside it (``<final>.journal``): a header, then one fixed-size record per unit with a
CRC32, flushed and fsynced before ``append`` returns. On restart the journal is read up to the last intact record
(a torn tail is cut off), so a unit is either fully recorded or not at all and is never counted twice. ``finish``
writes the HDF5 file to a temporary name and renames it into place, then removes the journal: a reader sees either
no shard file or a complete one.

Any fsspec URL works. For local paths the journal lives beside the final file; for other filesystems (object
stores, ``memory://``) it lives in a local scratch folder (``CPCLUSTER_SCRATCH`` or the system temp folder) and
the finished file is uploaded to ``<final>.tmp`` and moved into place.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import h5py
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from cpcluster.journal import (JOURNAL_VERSION, MAX_CLASSES, check_units, encode_header, encode_record,
                               journal_path as _journal_path)
from cpcluster.shard_extras import EXTRAS, check_seconds, check_skipped, empty_skipped, write_extras
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import (canonical_json, check_regular, config_hash, filesystem, parse_json, read_regular,
                                   write_bytes_atomic)
# The journal lived in this module; its readers import these from here.
from cpcluster.journal import JOURNAL_SUFFIX, JournalState, read_journal  # noqa: F401

SHARD_TEMPLATE = "shard-{index:05d}-of-{total:05d}.h5"
SHARD_GLOB = "shard-*-of-*.h5"
_GLOB_CHARS = set("*?[")


def shard_name(index: int, total: int) -> str:
    return SHARD_TEMPLATE.format(index=index, total=total)


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
        self.journal_path = _journal_path(url, scratch_dir)
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
        units not counted and why (:mod:`cpcluster.shard_extras`), or None.

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


def encode_shard(config: dict, shard_info: dict, units: np.ndarray, counts: np.ndarray,
                 image_index: np.ndarray, labels: np.ndarray, *, complete: bool, skipped=None,
                 seconds=None) -> bytes:
    """The bytes of an HDF5 shard file in the format of the module docstring (``skipped``, ``seconds``: see
    :mod:`cpcluster.shard_extras`)."""
    units = np.asarray(units, dtype=np.int64).reshape(-1, 4)
    arrays = {"units": units, "counts": np.asarray(counts, dtype=np.int64).reshape(len(units), -1),
              "image_index": np.asarray(image_index, dtype=np.int64).reshape(-1),
              "labels": np.asarray(labels, dtype=np.int64).reshape(-1)}
    bio = io.BytesIO()
    with h5py.File(bio, "w") as f:
        for name in _DATASETS:
            f.create_dataset(name, data=arrays[name])
        f.attrs["config"] = canonical_json(config)
        f.attrs["config_hash"] = config_hash(config)
        f.attrs["shard"] = json.dumps(shard_info, sort_keys=True)
        f.attrs["complete"] = bool(complete)
        f.attrs[CHECKSUM_ATTR] = data_checksum(*(arrays[name] for name in _DATASETS))
        write_extras(f, skipped, seconds)
    return bio.getvalue()


# ---------------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class ShardData:
    """One shard file as read and checked by :func:`read_shard`."""

    path: str
    config: dict
    config_hash: str
    shard: dict
    complete: bool
    units: np.ndarray  # (U, 4) int64
    counts: np.ndarray  # (U, C) int64
    image_index: np.ndarray  # (M,) int64
    labels: np.ndarray  # (M,) int64
    skipped: np.ndarray = field(default_factory=empty_skipped)  # (S, 5) int64, see cpcluster.shard_extras
    seconds: np.ndarray | None = None  # (U,) float64 device-seconds per unit (NaN unknown); None: not recorded


_DATASETS = ("units", "counts", "image_index", "labels")
_ATTRS = ("config", "config_hash", "shard", "complete")
CHECKSUM_ATTR = "data_sha256"


def data_checksum(units, counts, image_index, labels) -> str:
    """Hex sha256 over the four datasets (shape, then little-endian int64 bytes of each, in that order).

    Written as attribute ``data_sha256`` by :func:`encode_shard`; :func:`read_shard` checks it when present, so a
    file damaged in place (not only a truncated one) is refused.
    """
    h = hashlib.sha256()
    for array in (units, counts, image_index, labels):
        array = np.ascontiguousarray(array, dtype="<i8")
        h.update(repr(array.shape).encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _read_datasets(url: str, f, file_size: int) -> dict:
    """The four datasets and the optional ones (``skipped``, ``unit_seconds``), each checked for type and plausible
    size *before* it is read (no huge allocation)."""
    arrays = {}
    for k in (*_DATASETS, *(name for name in EXTRAS if name in f)):
        d = f[k]
        kinds = "f" if k == "unit_seconds" else "iu"
        if not isinstance(d, h5py.Dataset) or d.dtype.kind not in kinds or d.ndim not in (1, 2):
            raise InputError(f"{url}: '{k}' must be a 1-D or 2-D {'float' if kinds == 'f' else 'integer'} dataset")
        stored = d.id.get_storage_size()
        if d.size * d.dtype.itemsize > max(file_size, stored) + 2**16:
            raise InputError(f"{url}: dataset '{k}' claims shape {d.shape}, more than the file holds; the file is "
                             "damaged, re-run that shard")
        arrays[k] = np.asarray(d[()])
    return arrays


def read_shard(url: str) -> ShardData:
    """Read one shard file and check it on its own (cross-file checks are the aggregator's).

    Raises :class:`InputError` naming ``url`` for: something other than a regular file, a file that is not HDF5
    or is truncated, a missing dataset or attribute, wrong shapes or dataset sizes the file cannot hold, a config
    that does not match its hash, datasets that do not match their checksum (attribute ``data_sha256``, when
    present), invalid units (:func:`cpcluster.journal.check_units`), labels outside ``[0, num_classes)``, or
    images that the run's plan does not select (when the config records the dataset size and subset).
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        size = check_regular(url)  # no FIFO (would hang), device or folder; same errors as for remote files
        # h5py reads a local file itself, 4-6x faster than through a Python file object; no HDF5 file
        # locking (read-only, and flock fails on some cluster filesystems).
        source, options = path, {"locking": False}
    else:
        raw = read_regular(url)
        size, source, options = len(raw), io.BytesIO(raw), {}
    try:
        with h5py.File(source, "r", **options) as f:
            missing = [f"dataset '{k}'" for k in _DATASETS if k not in f] + \
                      [f"attribute '{k}'" for k in _ATTRS if k not in f.attrs]
            if missing:
                raise InputError(f"{url}: not a cpcluster shard, missing {', '.join(missing)}")
            arrays = _read_datasets(url, f, size)
            attrs = {k: f.attrs[k] for k in (*_ATTRS, CHECKSUM_ATTR) if k in f.attrs}
    except InputError:
        raise
    except Exception as e:  # h5py raises OSError / KeyError / ValueError on damaged files
        raise InputError(f"{url}: not a readable HDF5 file, truncated or corrupt ({type(e).__name__}); "
                         "re-run that shard") from None
    return _check(url, arrays, attrs)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def planned_images(config: dict) -> np.ndarray | None:
    """Dataset indices a run's config selects (from ``dataset.size`` and ``subset``), or None if it does not say.

    Raises :class:`InputError` (unnamed; callers add the file) when the subset does not fit the dataset size.
    """
    from cpcluster.sharding.plan import select_images

    dataset, subset = config.get("dataset"), config.get("subset")
    if not isinstance(dataset, dict) or not isinstance(subset, dict):
        return None
    size, skip, max_images, indices = (dataset.get("size"), subset.get("skip", 1), subset.get("max_images"),
                                       subset.get("indices"))
    ints = [size, skip] + ([max_images] if max_images is not None else [])
    if any(isinstance(v, bool) or not isinstance(v, int) for v in ints) or size < 1 or skip < 1 or (
            indices is not None and not (isinstance(indices, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in indices))):
        raise InputError("config keys 'dataset.size' and 'subset' do not describe an image selection")
    return select_images(size, skip, max_images, indices)


def _check(url: str, a: dict, attrs: dict) -> ShardData:
    def bad(msg: str):
        raise InputError(f"{url}: {msg}")

    try:
        config = parse_json(_text(attrs["config"]), "attribute 'config'", dict)
        shard = parse_json(_text(attrs["shard"]), "attribute 'shard'", dict)
    except (InputError, UnicodeDecodeError) as e:
        bad(f"{e}" if isinstance(e, InputError) else "attribute 'config' or 'shard' is not valid UTF-8")
    if config_hash(config) != _text(attrs["config_hash"]):
        bad("attribute 'config_hash' does not match its config (file edited or damaged)")
    units, counts = a["units"].astype(np.int64), a["counts"].astype(np.int64)
    if units.ndim != 2 or units.shape[1] != 4:
        bad(f"dataset 'units' must have shape (U, 4), found {units.shape}")
    num_classes = config.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES:
        bad(f"config key 'num_classes' missing or outside [2, {MAX_CLASSES}]")
    if counts.shape != (units.shape[0], num_classes):
        bad(f"dataset 'counts' must have shape ({units.shape[0]}, {num_classes}), found {counts.shape}")
    image_index, labels = a["image_index"].astype(np.int64), a["labels"].astype(np.int64)
    if image_index.ndim != 1 or labels.shape != image_index.shape:
        bad("datasets 'image_index' and 'labels' must be 1-D of equal length")
    if len(np.unique(image_index)) != len(image_index):
        bad("dataset 'image_index' lists an image twice")
    problem = check_units(units, counts, image_index)
    if problem:
        bad(problem)
    if ((labels < 0) | (labels >= num_classes)).any():
        bad(f"labels outside [0, {num_classes}) (num_classes in config)")
    if CHECKSUM_ATTR in attrs and _text(attrs[CHECKSUM_ATTR]) != data_checksum(units, counts, image_index, labels):
        bad(f"its datasets do not match attribute '{CHECKSUM_ATTR}' (file damaged or edited); re-run that shard")
    try:
        planned = planned_images(config)
    except InputError as e:
        bad(str(e))
    if planned is not None and not np.isin(image_index, planned).all():
        outside = int(image_index[~np.isin(image_index, planned)][0])
        bad(f"lists image {outside}, which its run does not evaluate (dataset size, skip, max_images and indices "
            "in its config); the file does not belong to that run")
    skipped = check_skipped(url, a.get("skipped"), units, image_index)
    return ShardData(path=url, config=config, config_hash=_text(attrs["config_hash"]), shard=shard,
                     complete=bool(attrs["complete"]), units=units, counts=counts, image_index=image_index,
                     labels=labels, skipped=skipped, seconds=check_seconds(url, a.get("unit_seconds"), len(units)))


def unplanned_units(units: np.ndarray, planned: np.ndarray) -> np.ndarray:
    """Row indices of ``units`` (U, 4) that are not rows of ``planned`` (P, 4): same image, stream, block and draws."""
    got = np.ascontiguousarray(units, dtype=np.int64).reshape(-1, 4).view("V32").ravel()
    want = np.ascontiguousarray(planned, dtype=np.int64).reshape(-1, 4).view("V32").ravel()
    return np.flatnonzero(~np.isin(got, want))


def expand_paths(patterns: Iterable[str], shard_glob: str = SHARD_GLOB) -> list[str]:
    """Expand local paths, globs and fsspec URLs into a sorted list of shard file URLs.

    A directory stands for the shard files in it (``shard_glob``: certify's by default). Raises
    :class:`InputError` for a glob that matches nothing or a path that does not exist.
    """
    out: list[str] = []
    for pattern in patterns:
        fs, path = filesystem(pattern)
        if _GLOB_CHARS & set(path):
            found = sorted(fs.glob(path))
            if not found:
                raise InputError(f"{pattern}: the pattern matches no file; check the path")
        elif not fs.exists(path):
            raise InputError(f"{pattern}: no such file or directory")
        elif fs.isdir(path):
            found = sorted(fs.glob(path.rstrip("/") + "/" + shard_glob))
            if not found:
                raise InputError(f"{pattern}: the directory holds no {shard_glob} files")
        else:
            found = [path]
        for p in found:
            out.append(p if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(p))
    return sorted(dict.fromkeys(out))
