"""The journal of a running shard: its progress, one durable record per unit (see :mod:`cpcluster.core.shards`).

Layout: ``MAGIC``, the header length (``<Q``), the header (UTF-8 JSON: ``config_hash``, ``num_classes``,
``config``, ``shard``, ``image_index``, ``labels``) and its CRC32 (``<I``); then one record per unit:
``4 + C`` little-endian int64 (``image, stream, block, n_draws, counts...``), the device-seconds spent on the unit
(float64, NaN when unknown) and the CRC32 of those bytes. Version 1 journals (``MAGIC_V1``, records without
seconds, before cost accounting) are read, never appended to.

A journal is created whole (temporary name + rename), so its header is intact or absent. Records are appended and
fsynced one at a time, so only the last record can be torn by a crash: :func:`read_journal` stops at the first
record whose CRC does not match and reports where the intact part ends. A record whose CRC matches but whose content
is not a valid unit (counts that are negative, larger than or not summing to its draws, a stream other than 0/1,
an image the header does not list, a unit recorded twice), or a header that is not the expected JSON object, was
not written by a crash: the journal is refused with an :class:`InputError` naming it, by the shard job and by
``cpcluster status`` alike.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from cpcluster.util.errors import InputError
from cpcluster.util.fileio import filesystem, is_local_fs, parse_json, read_regular

JOURNAL_SUFFIX = ".journal"
MAGIC = b"CPCJOURNAL2\n"
MAGIC_V1 = b"CPCJOURNAL1\n"
JOURNAL_VERSION = 2
MAX_CLASSES = 1_000_000  # widest counts row a journal or shard may have
MAX_DRAWS = 10**12  # most draws one unit may hold (keeps every sum of counts far inside int64)


def journal_path(url: str, scratch_dir: str | None) -> str:
    """Where the journal of the shard file ``url`` lives: beside it (local), else in a local scratch folder."""
    fs, path = filesystem(url)
    if is_local_fs(fs):
        return path + JOURNAL_SUFFIX
    scratch = scratch_dir or os.environ.get("CPCLUSTER_SCRATCH") or tempfile.gettempdir()
    os.makedirs(scratch, exist_ok=True)
    return os.path.join(scratch, hashlib.sha1(url.encode()).hexdigest()[:20] + JOURNAL_SUFFIX)


def record_struct(num_classes: int, version: int = JOURNAL_VERSION) -> struct.Struct:
    return struct.Struct(f"<{4 + num_classes}q{'d' if version >= 2 else ''}I")


def encode_header(header: dict) -> bytes:
    """The bytes a new journal starts with."""
    import json

    raw = json.dumps(header).encode("utf-8")
    return MAGIC + struct.pack("<Q", len(raw)) + raw + struct.pack("<I", zlib.crc32(raw))


def encode_record(unit, counts, seconds: float = float("nan")) -> bytes:
    body = struct.pack(f"<{4 + len(counts)}qd", *(int(v) for v in unit), *(int(c) for c in counts), float(seconds))
    return body + struct.pack("<I", zlib.crc32(body))


@dataclass(frozen=True)
class JournalState:
    """What a journal holds: its header and the intact unit records, in the order they were written."""

    header: dict
    units: np.ndarray  # (U, 4) int64
    counts: np.ndarray  # (U, C) int64
    valid_bytes: int  # file offset just after the last intact record
    seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (U,) device-seconds, NaN where unknown
    version: int = JOURNAL_VERSION


def _int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _check_header(path: str, header) -> dict:
    def bad(msg: str):
        raise InputError(f"{path}: damaged shard journal ({msg}); delete it to restart that shard from scratch")

    if not isinstance(header, dict):
        bad("its header is not a JSON object")
    num_classes = header.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES:
        bad(f"header num_classes={num_classes!r}, expected an integer in [2, {MAX_CLASSES}]")
    if not isinstance(header.get("config_hash"), str):
        bad("its header has no config_hash")
    images, labels = header.get("image_index"), header.get("labels")
    if not _int_list(images) or not _int_list(labels) or len(images) != len(labels):
        bad("header image_index and labels must be integer lists of equal length")
    return header


def check_units(units: np.ndarray, counts: np.ndarray, images) -> str | None:
    """What is wrong with unit rows ``units`` (U, 4) and their ``counts`` (U, C), or None when every row is valid.

    Valid: stream 0 or 1, block >= 0, 1 <= n_draws <= :data:`MAX_DRAWS`, counts in [0, n_draws] summing to n_draws,
    image in ``images``, no (image, stream, block) twice. Shared by the journal and the shard file readers.
    """
    if not len(units):
        return None
    draws, sums = units[:, 3], counts.sum(axis=1)
    tests = (((units[:, 1] < 0) | (units[:, 1] > 1), lambda r: "a stream other than 0 (selection) or 1 (estimation)"),
             (units[:, 2] < 0, lambda r: "a negative block"),
             ((draws < 1) | (draws > MAX_DRAWS), lambda r: f"n_draws outside [1, {MAX_DRAWS}]"),
             ((counts < 0).any(axis=1), lambda r: "negative counts"),
             ((counts > draws[:, None]).any(axis=1), lambda r: "a count larger than its n_draws"),
             (sums != draws, lambda r: f"counts that sum to {int(sums[r])}, but n_draws is {int(draws[r])}"),
             (~np.isin(units[:, 0], np.asarray(images, dtype=np.int64)), lambda r: "an image the file does not list"))
    for test, message in tests:
        rows = np.flatnonzero(test)
        if len(rows):
            r = int(rows[0])
            return f"unit row {r} {tuple(int(v) for v in units[r])} has {message(r)}"
    keys = np.ascontiguousarray(units[:, :3]).view("V24").ravel()
    if len(np.unique(keys)) != len(keys):
        return "a unit (image, stream, block) is recorded twice"
    return None


def read_journal(path: str) -> JournalState | None:
    """Read a journal up to its last intact record; ``None`` if it does not exist or its header is torn.

    Raises :class:`InputError` naming ``path`` for a journal damaged otherwise (see the module docstring) and for a
    path that is not a regular file.
    """
    try:
        data = read_regular(path, "shard journal")
    except InputError:
        if not os.path.lexists(path):
            return None
        raise
    version = 2 if data.startswith(MAGIC) else 1 if data.startswith(MAGIC_V1) else 0
    if not version or len(data) < len(MAGIC) + 12:
        return None
    off = len(MAGIC)
    (hlen,) = struct.unpack_from("<Q", data, off)
    off += 8
    raw = data[off: off + hlen]
    if len(raw) != hlen or len(data) < off + hlen + 4:
        return None
    (crc,) = struct.unpack_from("<I", data, off + hlen)
    if zlib.crc32(raw) != crc:
        return None
    header = _check_header(path, parse_json(raw, f"{path}: shard journal header", kind=None))
    off += hlen + 4
    width = 4 + header["num_classes"]
    rec = record_struct(header["num_classes"], version)
    rows, seconds = [], []
    while off + rec.size <= len(data):
        if zlib.crc32(data[off: off + rec.size - 4]) != struct.unpack_from("<I", data, off + rec.size - 4)[0]:
            break
        rows.append(np.frombuffer(data, dtype="<i8", count=width, offset=off))
        seconds.append(struct.unpack_from("<d", data, off + 8 * width)[0] if version >= 2 else float("nan"))
        off += rec.size
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, width)
    units, counts = arr[:, :4].copy(), arr[:, 4:].copy()
    problem = check_units(units, counts, header["image_index"])
    if problem:
        raise InputError(f"{path}: damaged shard journal ({problem}); delete it to restart that shard from scratch")
    return JournalState(header=header, units=units, counts=counts, valid_bytes=off,
                        seconds=np.asarray(seconds, dtype=np.float64), version=version)
