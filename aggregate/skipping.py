"""Early stopping (``certify --early-stop MAX_ALPHA``): which estimation units cannot change the certified table.

Two rules, both exact for certified accuracy and ACR at every radius and every ``alpha <= max_alpha``:

* **wrong class** (:data:`WRONG_CLASS`): the selection draws pick ``c_A`` (argmax, lowest index on ties, as
  :func:`cpcluster.aggregate.stats.certify_decision`) other than the true label. CERTIFY then returns ``c_A`` or
  abstains; either is wrong at every radius, so no estimation draw is needed.
* **abstention certain** (:data:`ABSTAIN_CERTAIN`): before an estimation block, with ``k`` hits on ``c_A`` in the
  ``m`` estimation draws so far, even ``n - m`` further hits give ``clopper_pearson_lower(k + n - m, n,
  max_alpha) <= 1/2``. The bound grows with ``k`` and with ``alpha``, so CERTIFY abstains for every outcome of the
  remaining draws and every ``alpha <= max_alpha``; the remaining blocks are skipped.

An image's decisions depend only on its own counts, taken block by block in plan order, so they do not depend on
how the work is sharded, packed or resumed. :func:`image_step` is that rule for one image (what the certify job
runs next); :func:`verify` checks, for many images at once, that the skipped units of a shard file are justified
by its counts (what ``aggregate`` accepts). Pure numpy/scipy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from cpcluster.aggregate.stats import clopper_pearson_lower

WRONG_CLASS = 1
ABSTAIN_CERTAIN = 2
REASONS = {WRONG_CLASS: "wrong-class", ABSTAIN_CERTAIN: "abstain-certain"}


def abstain_certain(k, m, n, max_alpha: float) -> np.ndarray:
    """Whether CERTIFY must abstain at every ``alpha <= max_alpha`` whatever the remaining ``n - m`` draws give.

    ``k`` hits on ``c_A`` among the first ``m`` of ``n`` estimation draws (int arrays, broadcastable).
    """
    k, m, n = np.broadcast_arrays(np.asarray(k, np.int64), np.asarray(m, np.int64), np.asarray(n, np.int64))
    return clopper_pearson_lower(k + (n - m), n, max_alpha) <= 0.5


@dataclass(frozen=True)
class Step:
    """What one image needs next: ``run`` blocks to count now, or (``run`` empty) its ``skipped`` blocks."""

    selection: bool  # the selection unit is to be counted first
    run: tuple  # estimation blocks to count now (all safe to count before the next decision)
    skipped: tuple  # (block, reason) of the blocks skipped for good; only when nothing is left to run
    done: bool  # nothing left to count for this image


def image_step(selection: np.ndarray | None, label: int, block_draws: Sequence[int], recorded: Mapping[int, np.ndarray],
               n: int, max_alpha: float) -> Step:
    """The next step of one image under the two rules (module docstring).

    ``selection``: (C,) selection counts, None when not counted yet. ``block_draws[b]``: planned draws of
    estimation block ``b``. ``recorded``: ``{block: (C,) counts}`` of the blocks counted so far.

    Blocks are scheduled ahead while a stop is impossible even if they all miss ``c_A`` (the rule is monotone in
    the hits), so the units counted are exactly those of the block-by-block rule, in fewer rounds.
    """
    if selection is None:
        return Step(True, (), (), False)
    c_a = int(np.argmax(selection))
    todo = [b for b in range(len(block_draws)) if b not in recorded]
    if c_a != int(label):
        return Step(False, (), tuple((b, WRONG_CLASS) for b in todo), True)
    k = m = 0
    run = []
    for b, size in enumerate(block_draws):
        if abstain_certain(k, m, n, max_alpha):  # k: the hits known so far, as if every pending block missed
            if run:
                break
            rest = (c for c in range(b, len(block_draws)) if c not in recorded)
            return Step(False, (), tuple((c, ABSTAIN_CERTAIN) for c in rest), True)
        if b in recorded:
            k += int(recorded[b][c_a])
        else:
            run.append(b)
        m += int(size)
    return Step(False, tuple(run), (), not run)


def verify(counts0: np.ndarray, counts: np.ndarray, labels: np.ndarray, n_present: np.ndarray, n: int,
           reason: np.ndarray, max_alpha: float) -> np.ndarray:
    """Indices (into the M images) whose skip reason the counts do not justify; empty when all are justified.

    ``counts0``, ``counts``: (M, C) selection and estimation counts present; ``n_present``: (M,) estimation draws
    present; ``reason``: (M,) 0 (nothing skipped), :data:`WRONG_CLASS` or :data:`ABSTAIN_CERTAIN`. Checked: a
    wrong-class image has selection draws whose ``c_A`` is not its label and no estimation draw; an abstain-certain
    image has ``c_A`` equal to its label and :func:`abstain_certain` true for its present draws.
    """
    rows = np.arange(len(reason))
    c_a = counts0.argmax(axis=1)
    has_selection = counts0[rows, c_a] > 0
    wrong = (reason == WRONG_CLASS) & ~(has_selection & (c_a != labels) & (n_present == 0))
    cut = reason == ABSTAIN_CERTAIN
    ok_cut = has_selection & (c_a == labels) & abstain_certain(counts[rows, c_a], n_present, n, max_alpha)
    return np.flatnonzero(wrong | (cut & ~ok_cut) | ((reason != 0) & ~np.isin(reason, list(REASONS))))


@dataclass(frozen=True)
class Skips:
    """The skipped units of one group, per image (aligned with the group's ``image_index``)."""

    reason: np.ndarray  # (M,) int64: 0, WRONG_CLASS or ABSTAIN_CERTAIN
    units: np.ndarray  # (M,) int64 units skipped
    draws: np.ndarray  # (M,) int64 planned draws not counted


def merge_skipped(shards: Sequence, image_index: np.ndarray, counted: np.ndarray, plan) -> Skips:
    """Merge the ``skipped`` rows of a group's ``shards`` (see :mod:`cpcluster.core.shard_extras`).

    ``counted``: (K, 3) ``(image, stream, block)`` of the units counted in the group; ``plan``: its
    :class:`~cpcluster.aggregate.merge.RunPlan`. Raises InputError naming a file for: skips in a run without early
    stopping, a skipped unit the plan does not have (or with other draws), one skipped with two reasons, one both
    skipped and counted, an image skipped for two reasons. Identical rows in two files count once.
    """
    from cpcluster.util.errors import InputError

    m = len(image_index)
    zeros = np.zeros(m, dtype=np.int64)
    rows = np.concatenate([s.skipped for s in shards]) if shards else np.zeros((0, 5), np.int64)
    if not len(rows):
        return Skips(zeros, zeros.copy(), zeros.copy())
    owner = np.concatenate([np.full(len(s.skipped), i) for i, s in enumerate(shards)])
    first = shards[int(owner[0])].path
    if plan.max_alpha is None:
        raise InputError(f"{first}: skips units, but its run config has no early_stop")
    bad = np.flatnonzero(plan.expected_draws(rows[:, 1], rows[:, 2]) != rows[:, 3])
    if len(bad):
        raise InputError(f"{shards[int(owner[bad[0]])].path}: skipped unit {tuple(rows[bad[0], :3].tolist())} is "
                         "not a unit of its run's plan (or has other draws)")
    rows, keep = np.unique(rows, axis=0, return_index=True)
    owner = owner[keep]
    keys = rows[:, :3]
    same = np.flatnonzero((keys[1:] == keys[:-1]).all(axis=1))
    if len(same):
        raise InputError(f"{shards[int(owner[same[0]])].path} and {shards[int(owner[same[0] + 1])].path}: unit "
                         f"{tuple(keys[same[0]].tolist())} is skipped for two different reasons")
    both = np.flatnonzero(np.isin(_key(keys), _key(counted)))
    if len(both):
        raise InputError(f"{shards[int(owner[both[0]])].path}: unit {tuple(keys[both[0]].tolist())} is skipped "
                         "there but counted in another file")
    pos = np.searchsorted(image_index, rows[:, 0])
    reason = zeros.copy()
    reason[pos] = rows[:, 4]
    if (reason[pos] != rows[:, 4]).any():
        j = int(np.flatnonzero(reason[pos] != rows[:, 4])[0])
        raise InputError(f"{shards[int(owner[j])].path}: image {int(rows[j, 0])} is skipped for two reasons")
    return Skips(reason=reason, units=np.bincount(pos, minlength=m).astype(np.int64),
                 draws=np.bincount(pos, weights=rows[:, 3], minlength=m).astype(np.int64))


def _key(units: np.ndarray) -> np.ndarray:
    """One int64 per ``(image, stream, block)`` row (images < 2**38, blocks < 2**24), for set operations."""
    units = np.asarray(units, dtype=np.int64).reshape(-1, 3)
    return (units[:, 0] << 25) | (units[:, 1] << 24) | units[:, 2]
