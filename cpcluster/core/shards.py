"""Shard files: the contract between ``certify`` (writer) and ``aggregate`` (reader); DESIGN.md section 4.

A finished shard is one HDF5 file ``<run>/shard-{index:05d}-of-{total:05d}.h5`` holding

* ``units``       (U, 4) int64 rows ``[image_index, stream, block, n_draws]`` (stream 0 = selection, 1 = estimation)
* ``counts``      (U, C) int64 class counts of each unit; every row sums to its ``n_draws``
* ``image_index`` (M,) int64 and ``labels`` (M,) int64: the images the shard touches and their true labels
* attrs ``config`` (canonical JSON), ``config_hash`` (sha256 hex of it), ``shard`` (JSON), ``complete`` (bool),
  ``data_sha256`` (:func:`data_checksum`), and the optional datasets of :mod:`cpcluster.core.shard_extras`.

This module encodes (:func:`encode_shard`) and reads and checks (:func:`read_shard`) that file; a running shard
writes it through :class:`cpcluster.core.shard_writer.ShardWriter`, which keeps progress in a journal until then.
Any fsspec URL works.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Iterable

import h5py
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from cpcluster.core.journal import MAX_CLASSES, check_units
from cpcluster.core.shard_extras import EXTRAS, check_seconds, check_skipped, empty_skipped, write_extras
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import canonical_json, check_regular, config_hash, filesystem, parse_json, read_regular

SHARD_TEMPLATE = "shard-{index:05d}-of-{total:05d}.h5"
SHARD_GLOB = "shard-*-of-*.h5"
_GLOB_CHARS = set("*?[")


def shard_name(index: int, total: int) -> str:
    return SHARD_TEMPLATE.format(index=index, total=total)


def encode_shard(config: dict, shard_info: dict, units: np.ndarray, counts: np.ndarray,
                 image_index: np.ndarray, labels: np.ndarray, *, complete: bool, skipped=None,
                 seconds=None) -> bytes:
    """The bytes of an HDF5 shard file in the format of the module docstring (``skipped``, ``seconds``: see
    :mod:`cpcluster.core.shard_extras`)."""
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
    skipped: np.ndarray = field(default_factory=empty_skipped)  # (S, 5) int64, see cpcluster.core.shard_extras
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
    present), invalid units (:func:`cpcluster.core.journal.check_units`), labels outside ``[0, num_classes)``, or
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
