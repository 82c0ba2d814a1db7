"""The work plan of DESIGN.md section 3: (image, stream, block) units cut into contiguous, draw-balanced shards.

A *unit* is one row ``[image_index, stream, block, n_draws]`` (int64), the same layout as the shard file's
``units`` dataset:

* stream 0 (:data:`SELECTION`): the ``n0`` draws that pick the top class ``c_A``, always one block (block 0);
* stream 1 (:data:`ESTIMATION`): the ``n`` draws that estimate ``P(f = c_A)``, in blocks of ``block_size``
  draws (the last block may be shorter).

``mode="predict"`` (Cohen's PREDICT) has no selection stream: only the ``n`` estimation draws.

The plan lists units in (image, stream, block) order and cuts that list into ``num_shards`` contiguous, non-empty
ranges whose draw counts are as equal as whole units allow (layout ``"contiguous"``). The plan is a pure function of
its arguments, so every shard of an array recomputes the same plan on its own.

Layout ``"interleaved"`` (runs with early stopping, ``certify --early-stop``): every shard holds whole images, so
an image's selection counts are at hand when its estimation units are decided, and shard ``k`` holds images
``k, k + S, k + 2S, ...`` of the evaluation order (``S`` shards). Planned draws differ by at most one image between
shards; the draws early stopping saves are spread evenly in expectation, because every shard is a systematic
sample of the whole evaluation order rather than one stretch of it (where, say, hard images might cluster).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cpcluster.core.choices import MODES
from cpcluster.util.errors import InputError

SELECTION = 0
ESTIMATION = 1
LAYOUTS = ("contiguous", "interleaved")


def select_images(size: int, skip: int = 1, max_images: int | None = None, indices=None) -> np.ndarray:
    """Dataset indices to evaluate: ``indices`` (default ``0..size-1``), every ``skip``-th, the first ``max_images``.

    ``skip`` has Cohen's meaning (images 0, K, 2K, ...). Raises :class:`InputError` for an index outside the data.
    """
    base = np.arange(size, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(base) and (base.min() < 0 or base.max() >= size):
        bad = int(base[(base < 0) | (base >= size)][0])
        raise InputError(f"--indices: image {bad} is outside the dataset's 0..{size - 1}")
    chosen = base[::skip]
    if max_images is not None:
        chosen = chosen[:max_images]
    if not len(chosen):
        raise InputError("no images selected: check --indices, --skip and --max-images")
    return chosen


def build_units(images: Sequence[int], n0: int, n: int, block_size: int, mode: str = "certify") -> np.ndarray:
    """All units of a run, shape (U, 4) int64, rows ``[image, stream, block, n_draws]`` in plan order.

    Parameters
    ----------
    images : dataset indices of the evaluated images, in evaluation order (distinct).
    n0 : selection draws per image (ignored in ``"predict"`` mode).
    n : estimation draws per image.
    block_size : estimation draws per unit; the last block of an image holds ``n - (nb - 1) * block_size``.
    mode : ``"certify"`` (selection + estimation) or ``"predict"`` (estimation only).
    """
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    images = np.asarray(images, dtype=np.int64).reshape(-1)
    num_blocks = -(-int(n) // int(block_size))
    est = np.zeros((num_blocks, 3), dtype=np.int64)
    est[:, 0] = ESTIMATION
    est[:, 1] = np.arange(num_blocks)
    est[:, 2] = block_size
    est[-1, 2] = n - (num_blocks - 1) * block_size
    per_image = est if mode == "predict" else np.vstack([[SELECTION, 0, n0], est])
    k = len(per_image)
    units = np.empty((len(images) * k, 4), dtype=np.int64)
    units[:, 0] = np.repeat(images, k)
    units[:, 1:] = np.tile(per_image, (len(images), 1))
    return units


def balanced_ranges(draws: Sequence[int], num_shards: int) -> list[tuple[int, int]]:
    """Cut units with the given draw counts into ``num_shards`` contiguous, non-empty ranges ``[start, stop)``.

    Boundary ``k`` is put where the cumulative draw count is nearest ``k * total / num_shards`` (and moved, if
    needed, so that every shard keeps at least one unit). Without such moves every shard's draw count is within
    one unit's draws of ``total / num_shards``.
    """
    draws = np.asarray(draws, dtype=np.int64)
    num_units = len(draws)
    if num_shards < 1:
        raise InputError(f"--shards {num_shards}: use at least 1 shard")
    if num_shards > num_units:
        raise InputError(f"--shards {num_shards} is more than the {num_units} work units of this run; use at most "
                         f"{num_units} shards, a smaller --block-size or more images")
    cum = np.concatenate([[0], np.cumsum(draws)])  # cum[b] = draws of units [0, b)
    total = cum[-1]
    bounds = [0]
    for k in range(1, num_shards):
        target = k * total / num_shards
        b = int(np.searchsorted(cum, target))  # cum[b-1] < target <= cum[b]
        if b > 0 and target - cum[b - 1] < cum[min(b, num_units)] - target:
            b -= 1
        b = min(max(b, bounds[-1] + 1), num_units - (num_shards - k))
        bounds.append(b)
    bounds.append(num_units)
    return [(bounds[k], bounds[k + 1]) for k in range(num_shards)]


@dataclass(frozen=True)
class Plan:
    """Units of a run and their cut into shards. ``units`` (U, 4) int64; ``ranges[k] = (start, stop)``."""

    units: np.ndarray
    ranges: tuple[tuple[int, int], ...]

    @property
    def num_shards(self) -> int:
        return len(self.ranges)

    @property
    def images(self) -> np.ndarray:
        """(N,) int64 distinct image indices of the run, in plan order."""
        ids = self.units[:, 0]
        _, first = np.unique(ids, return_index=True)
        return ids[np.sort(first)]

    @property
    def total_draws(self) -> int:
        return int(self.units[:, 3].sum())

    def shard_units(self, index: int) -> np.ndarray:
        """The (u, 4) units of shard ``index``, in plan order."""
        if not 0 <= index < self.num_shards:
            raise InputError(f"shard index {index} is outside 0..{self.num_shards - 1}")
        start, stop = self.ranges[index]
        return self.units[start:stop]

    def shard_images(self, index: int) -> np.ndarray:
        """Distinct image indices touched by shard ``index``, in plan order."""
        ids = self.shard_units(index)[:, 0]
        _, first = np.unique(ids, return_index=True)
        return ids[np.sort(first)]

    def shard_draws(self) -> np.ndarray:
        """(num_shards,) int64 draw count of every shard."""
        cum = np.concatenate([[0], np.cumsum(self.units[:, 3])])
        return np.asarray([cum[b] - cum[a] for a, b in self.ranges], dtype=np.int64)


def make_plan(images: Sequence[int], n0: int, n: int, block_size: int, num_shards: int,
              mode: str = "certify", layout: str = "contiguous") -> Plan:
    """The plan of a run: :func:`build_units` cut by :func:`balanced_ranges`, or the interleaved layout of whole
    images (module docstring)."""
    if layout == "contiguous":
        units = build_units(images, n0, n, block_size, mode)
        return Plan(units=units, ranges=tuple(balanced_ranges(units[:, 3], num_shards)))
    if layout != "interleaved":
        raise InputError(f"plan layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    images = np.asarray(images, dtype=np.int64).reshape(-1)
    if not 1 <= num_shards <= len(images):
        raise InputError(f"--shards {num_shards}: with --early-stop every shard holds whole images; use 1 to "
                         f"{len(images)} shards")
    per_shard = [images[k::num_shards] for k in range(num_shards)]
    units = build_units(np.concatenate(per_shard), n0, n, block_size, mode)
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in per_shard])]) * (len(units) // len(images))
    return Plan(units=units, ranges=tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])))


MAX_UNITS = 2**26  # work units of one run (its plan holds 32 bytes per unit)


def check_plan_size(num_images: int, n: int, block_size: int, mode: str = "certify") -> None:
    """InputError when a run would have more than :data:`MAX_UNITS` work units (checked before planning)."""
    per_image = -(-n // block_size) + (mode == "certify")
    if num_images * per_image > MAX_UNITS:
        raise InputError(f"--n {n} in blocks of --block-size {block_size} over {num_images} images is "
                         f"{num_images * per_image:,} work units, more than {MAX_UNITS:,}; use a larger --block-size")


def plan_from_config(config: dict, num_shards: int) -> Plan:
    """The plan of a run from its shard config (DESIGN.md section 4): ``dataset.size``, ``subset``, ``n0``, ``n``,
    ``block_size``, ``mode``; the interleaved layout when it has ``early_stop``. What ``certify`` runs and what
    ``status`` and ``aggregate`` check against.

    Raises KeyError / TypeError / ValueError for a config without these keys, :class:`InputError` for bad values.
    """
    subset = config["subset"]
    ids = select_images(int(config["dataset"]["size"]), int(subset.get("skip") or 1), subset.get("max_images"),
                        subset.get("indices"))
    mode = config.get("mode", "certify")
    check_plan_size(len(ids), int(config["n"]), int(config["block_size"]), mode)
    layout = "interleaved" if config.get("early_stop") else "contiguous"
    return make_plan(ids, int(config["n0"]), int(config["n"]), int(config["block_size"]), int(num_shards), mode,
                     layout)
