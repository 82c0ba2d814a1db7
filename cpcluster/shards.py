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

import hashlib
import io
import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import fsspec
import h5py
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from cpcluster.errors import InputError

SHARD_TEMPLATE = "shard-{index:05d}-of-{total:05d}.h5"
SHARD_GLOB = "shard-*-of-*.h5"
JOURNAL_SUFFIX = ".journal"
_MAGIC = b"CPCJOURNAL1\n"
_GLOB_CHARS = set("*?[")


def canonical_json(config: dict) -> str:
    """The one serialization that ``config_hash`` is taken over (sorted keys, no spaces)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def config_hash(config: dict) -> str:
    """Hex sha256 of ``canonical_json(config)`` in UTF-8: equal hashes mean the same run configuration."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def shard_name(index: int, total: int) -> str:
    return SHARD_TEMPLATE.format(index=index, total=total)


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an fsspec URL."""
    return "/".join([base.rstrip("/"), *parts])


def _fs(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(_fs(url)[0], LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


# --------------------------------------------------------------------------------------------------- journal
def _journal_path(url: str, scratch_dir: str | None) -> str:
    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        return path + JOURNAL_SUFFIX
    scratch = scratch_dir or os.environ.get("CPCLUSTER_SCRATCH") or tempfile.gettempdir()
    os.makedirs(scratch, exist_ok=True)
    return os.path.join(scratch, hashlib.sha1(url.encode()).hexdigest()[:20] + JOURNAL_SUFFIX)


def _record_struct(num_classes: int) -> struct.Struct:
    return struct.Struct(f"<{4 + num_classes}qI")


@dataclass(frozen=True)
class JournalState:
    """What a journal holds: its header and the intact unit records, in the order they were written."""

    header: dict
    units: np.ndarray  # (U, 4) int64
    counts: np.ndarray  # (U, C) int64
    valid_bytes: int  # file offset just after the last intact record


def read_journal(path: str) -> JournalState | None:
    """Read a journal up to its last intact record; ``None`` if it does not exist or its header is torn."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 12:
        return None
    off = len(_MAGIC)
    (hlen,) = struct.unpack_from("<Q", data, off)
    off += 8
    raw = data[off : off + hlen]
    if len(raw) != hlen or len(data) < off + hlen + 4:
        return None
    (crc,) = struct.unpack_from("<I", data, off + hlen)
    if zlib.crc32(raw) != crc:
        return None
    header = json.loads(raw.decode("utf-8"))
    off += hlen + 4
    rec = _record_struct(header["num_classes"])
    rows = []
    while off + rec.size <= len(data):
        values = rec.unpack_from(data, off)
        if zlib.crc32(data[off : off + rec.size - 4]) != values[-1]:
            break
        rows.append(values[:-1])
        off += rec.size
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 4 + header["num_classes"])
    return JournalState(header=header, units=arr[:, :4].copy(), counts=arr[:, 4:].copy(), valid_bytes=off)


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
        self._rec = _record_struct(self.num_classes)
        self.journal_path = _journal_path(url, scratch_dir)
        os.makedirs(os.path.dirname(os.path.abspath(self.journal_path)), exist_ok=True)
        state = read_journal(self.journal_path)
        if state is not None and state.header.get("config_hash") != self.config_hash:
            raise InputError(f"{self.journal_path}: unfinished shard of a different run configuration; "
                             "delete it or use another output directory")
        if state is None:
            self._create()
            self._units, self._counts = [], []
        else:
            with open(self.journal_path, "r+b") as fh:  # cut a torn tail record
                fh.truncate(state.valid_bytes)
            self._units = [tuple(int(v) for v in row) for row in state.units]
            self._counts = [row.copy() for row in state.counts]
        self._done = {u[:3]: u[3] for u in self._units}
        self._fh = open(self.journal_path, "ab")

    def _create(self) -> None:
        header = {"config_hash": self.config_hash, "num_classes": self.num_classes, "config": self.config,
                  "shard": self.shard_info, "image_index": self.image_index.tolist(),
                  "labels": self.labels.tolist()}
        raw = json.dumps(header).encode("utf-8")
        tmp = self.journal_path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(_MAGIC + struct.pack("<Q", len(raw)) + raw + struct.pack("<I", zlib.crc32(raw)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.journal_path)

    @property
    def done(self) -> dict:
        """``{(image, stream, block): n_draws}`` of every unit already recorded."""
        return dict(self._done)

    def append(self, unit: Sequence[int], counts: np.ndarray) -> None:
        """Record one unit ``(image, stream, block, n_draws)`` with its (C,) class counts; durable on return."""
        image, stream, block, n_draws = (int(v) for v in unit)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if counts.shape != (self.num_classes,):
            raise ValueError(f"counts must have shape ({self.num_classes},), got {counts.shape}")
        if (image, stream, block) in self._done:
            raise ValueError(f"unit {(image, stream, block)} is already recorded in {self.url}")
        if int(counts.sum()) != n_draws or (counts < 0).any():
            raise ValueError(f"counts of unit {(image, stream, block)} do not sum to n_draws={n_draws}")
        body = struct.pack(f"<{4 + self.num_classes}q", image, stream, block, n_draws, *counts.tolist())
        self._fh.write(body + struct.pack("<I", zlib.crc32(body)))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._units.append((image, stream, block, n_draws))
        self._counts.append(counts)
        self._done[(image, stream, block)] = n_draws

    def finish(self, shard_info_update: dict | None = None) -> str:
        """Write the complete HDF5 shard atomically (temp name + rename), remove the journal; return its URL."""
        info = {**self.shard_info, **(shard_info_update or {})}
        units = np.asarray(self._units, dtype=np.int64).reshape(-1, 4)
        counts = np.asarray(self._counts, dtype=np.int64).reshape(-1, self.num_classes)
        payload = encode_shard(self.config, info, units, counts, self.image_index, self.labels, complete=True)
        write_bytes_atomic(self.url, payload)
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


def encode_shard(config: dict, shard_info: dict, units: np.ndarray, counts: np.ndarray,
                 image_index: np.ndarray, labels: np.ndarray, *, complete: bool) -> bytes:
    """The bytes of an HDF5 shard file in the format of the module docstring."""
    bio = io.BytesIO()
    with h5py.File(bio, "w") as f:
        f.create_dataset("units", data=np.asarray(units, dtype=np.int64).reshape(-1, 4))
        f.create_dataset("counts", data=np.asarray(counts, dtype=np.int64).reshape(len(units), -1))
        f.create_dataset("image_index", data=np.asarray(image_index, dtype=np.int64))
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.attrs["config"] = canonical_json(config)
        f.attrs["config_hash"] = config_hash(config)
        f.attrs["shard"] = json.dumps(shard_info, sort_keys=True)
        f.attrs["complete"] = bool(complete)
    return bio.getvalue()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(url: str, payload: bytes) -> None:
    """Write ``payload`` to ``url`` so that readers see the old state or the whole new file, never a part."""
    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any written file
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as fh:
        fh.write(payload)
    fs.mv(tmp, path)


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


_DATASETS = ("units", "counts", "image_index", "labels")
_ATTRS = ("config", "config_hash", "shard", "complete")


def read_shard(url: str) -> ShardData:
    """Read one shard file and check it on its own (cross-file checks are the aggregator's).

    Raises :class:`InputError` naming ``url`` for: a file that is not HDF5 or is truncated, a missing dataset or
    attribute, wrong shapes, a config that does not match its hash, negative counts, rows whose counts do not sum
    to ``n_draws``, a stream other than 0/1, labels outside ``[0, num_classes)``, or units of images the shard
    does not list.
    """
    fs, path = _fs(url)
    try:
        if isinstance(fs, LocalFileSystem):
            with open(path, "rb"):  # same "no such file" / "cannot read" errors as for remote files
                pass
            # h5py reads a local file itself, 4-6x faster than through a Python file object; no HDF5 file
            # locking (read-only, and flock fails on some cluster filesystems).
            source, options = path, {"locking": False}
        else:
            with fs.open(path, "rb") as fh:
                source, options = io.BytesIO(fh.read()), {}
    except FileNotFoundError:
        raise InputError(f"{url}: no such file") from None
    except OSError as e:
        raise InputError(f"{url}: cannot read ({e})") from None
    try:
        with h5py.File(source, "r", **options) as f:
            missing = [f"dataset '{k}'" for k in _DATASETS if k not in f] + \
                      [f"attribute '{k}'" for k in _ATTRS if k not in f.attrs]
            if missing:
                raise InputError(f"{url}: not a cpcluster shard, missing {', '.join(missing)}")
            arrays = {k: np.asarray(f[k][()]) for k in _DATASETS}
            attrs = {k: f.attrs[k] for k in _ATTRS}
    except InputError:
        raise
    except Exception as e:  # h5py raises OSError / KeyError / ValueError on damaged files
        raise InputError(f"{url}: not a readable HDF5 file, truncated or corrupt ({type(e).__name__}); "
                         "re-run that shard") from None
    return _check(url, arrays, attrs)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check(url: str, a: dict, attrs: dict) -> ShardData:
    def bad(msg: str):
        raise InputError(f"{url}: {msg}")

    try:
        config = json.loads(_text(attrs["config"]))
        shard = json.loads(_text(attrs["shard"]))
    except (ValueError, TypeError):
        bad("attribute 'config' or 'shard' is not valid JSON")
    if not isinstance(config, dict):
        bad("attribute 'config' is not a JSON object")
    if config_hash(config) != _text(attrs["config_hash"]):
        bad("attribute 'config_hash' does not match its config (file edited or damaged)")
    units, counts = a["units"], a["counts"]
    for name in _DATASETS:
        if not np.issubdtype(a[name].dtype, np.integer):
            bad(f"dataset '{name}' must hold integers, found {a[name].dtype}")
    if units.ndim != 2 or units.shape[1] != 4:
        bad(f"dataset 'units' must have shape (U, 4), found {units.shape}")
    num_classes = config.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 2:
        bad("config key 'num_classes' missing or < 2")
    if counts.shape != (units.shape[0], num_classes):
        bad(f"dataset 'counts' must have shape ({units.shape[0]}, {num_classes}), found {counts.shape}")
    image_index, labels = a["image_index"].astype(np.int64), a["labels"].astype(np.int64)
    if image_index.ndim != 1 or labels.shape != image_index.shape:
        bad("datasets 'image_index' and 'labels' must be 1-D of equal length")
    if len(np.unique(image_index)) != len(image_index):
        bad("dataset 'image_index' lists an image twice")
    if (counts < 0).any():
        bad(f"negative counts in unit row {int(np.argwhere(counts < 0)[0, 0])}")
    sums = counts.sum(axis=1)
    wrong = np.flatnonzero(sums != units[:, 3])
    if len(wrong):
        r = int(wrong[0])
        bad(f"counts of unit row {r} sum to {int(sums[r])}, but n_draws is {int(units[r, 3])}")
    if len(units) and ((units[:, 1] < 0) | (units[:, 1] > 1)).any():
        bad("unit stream must be 0 (selection) or 1 (estimation)")
    if len(units) and ((units[:, 3] < 1) | (units[:, 2] < 0)).any():
        bad("units must have block >= 0 and n_draws >= 1")
    if ((labels < 0) | (labels >= num_classes)).any():
        bad(f"labels outside [0, {num_classes}) (num_classes in config)")
    if len(units) and not np.isin(units[:, 0], image_index).all():
        bad("units name images that 'image_index' does not list")
    return ShardData(path=url, config=config, config_hash=_text(attrs["config_hash"]), shard=shard,
                     complete=bool(attrs["complete"]), units=units.astype(np.int64, copy=False),
                     counts=counts.astype(np.int64, copy=False), image_index=image_index, labels=labels)


def expand_paths(patterns: Iterable[str], shard_glob: str = SHARD_GLOB) -> list[str]:
    """Expand local paths, globs and fsspec URLs into a sorted list of shard file URLs.

    A directory stands for the shard files in it (``shard_glob``: certify's by default). Raises
    :class:`InputError` for a glob that matches nothing or a path that does not exist.
    """
    out: list[str] = []
    for pattern in patterns:
        fs, path = _fs(pattern)
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
