"""Optional datasets of a shard file (DESIGN.md section 4), beside ``units`` and ``counts``:

* ``skipped`` (S, 5) int64 rows ``[image_index, stream, block, n_draws, reason]``: planned units that were not
  counted because they cannot change the certified table (``certify --early-stop``; reasons in
  :data:`cpcluster.aggregate.skipping.REASONS`: 1 = the selection picked a wrong class, 2 = abstention certain).
  ``n_draws`` is what the plan gave the unit. A file without it skipped nothing.
* ``unit_seconds`` (U,) float64: device-seconds spent on each row of ``units`` (wall time of the device between
  the completion of the previous unit of the same session and this one), NaN where unknown. Sums to the
  shard's counting time; with the shard attribute's device type and network evaluations per draw it is the cost
  ``aggregate`` reports. A file without it has no cost figures.

Written by :func:`cpcluster.core.shards.encode_shard`; read (size-checked before allocating) by
:func:`cpcluster.core.shards.read_shard`, which checks them with :func:`check_skipped` and :func:`check_seconds`; whether a
skip is justified by the counts is the aggregator's check (:func:`cpcluster.aggregate.skipping.verify`).
"""
from __future__ import annotations

import numpy as np

from cpcluster.util.errors import InputError

SKIP_REASONS = (1, 2)
EXTRAS = ("skipped", "unit_seconds")


def empty_skipped() -> np.ndarray:
    return np.zeros((0, 5), dtype=np.int64)


def write_extras(f, skipped: np.ndarray | None, seconds: np.ndarray | None = None) -> None:
    """Add the optional datasets to an open, writable ``h5py.File`` (nothing for None; no seconds when all NaN)."""
    if skipped is not None:
        f.create_dataset("skipped", data=np.asarray(skipped, dtype=np.int64).reshape(-1, 5))
    if seconds is not None and not np.isnan(np.asarray(seconds, dtype=np.float64)).all():
        f.create_dataset("unit_seconds", data=np.asarray(seconds, dtype=np.float64).reshape(-1))


def check_skipped(url: str, skipped: np.ndarray | None, units: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    """The (S, 5) int64 ``skipped`` rows, checked against the file's own units and images; InputError naming ``url``."""
    if skipped is None:
        return empty_skipped()
    if not np.issubdtype(skipped.dtype, np.integer) or skipped.ndim != 2 or skipped.shape[1] != 5:
        raise InputError(f"{url}: dataset 'skipped' must be (S, 5) integers, found {skipped.dtype} {skipped.shape}")
    skipped = skipped.astype(np.int64, copy=False)
    if len(skipped) == 0:
        return skipped
    if (skipped[:, 1] != 1).any() or (skipped[:, 2] < 0).any() or (skipped[:, 3] < 1).any() or \
            not np.isin(skipped[:, 4], SKIP_REASONS).all():
        raise InputError(f"{url}: dataset 'skipped' holds rows that are not estimation units with draws >= 1 and a "
                         f"reason in {SKIP_REASONS}")
    if not np.isin(skipped[:, 0], image_index).all():
        raise InputError(f"{url}: dataset 'skipped' names images that 'image_index' does not list")
    keys = [tuple(r) for r in skipped[:, :3].tolist()]
    if len(set(keys)) != len(keys) or set(keys) & {tuple(r) for r in units[:, :3].tolist()}:
        raise InputError(f"{url}: a unit is skipped twice, or both skipped and counted")
    return skipped


def check_seconds(url: str, seconds: np.ndarray | None, num_units: int) -> np.ndarray | None:
    """The (U,) float64 ``unit_seconds``, checked (finite and >= 0, or NaN); None when the file has none."""
    if seconds is None:
        return None
    if not np.issubdtype(seconds.dtype, np.floating) or seconds.shape != (num_units,):
        raise InputError(f"{url}: dataset 'unit_seconds' must be ({num_units},) floats, found {seconds.dtype} "
                         f"{seconds.shape}")
    seconds = seconds.astype(np.float64, copy=False)
    if (np.isinf(seconds) | (seconds < 0)).any():
        raise InputError(f"{url}: dataset 'unit_seconds' holds negative or infinite seconds")
    return seconds
