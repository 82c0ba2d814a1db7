"""Validate shard files against each other and merge their unit counts into per-image counts (DESIGN.md §5).

Files are grouped by ``(method, sigma, mode)``, where the method is the identity of
:mod:`cpcluster.aggregate.identity` (everything that defines the smoothed classifier and its certification) under a
readable label. Inside a group every file must carry the same ``config_hash``, every image the same label, and no unit
``(image, stream, block)`` may appear twice with different counts (an identical duplicate row is dropped with a
warning). Every unit must be one the config plans: the selection unit ``(i, 0, 0)`` with ``n0`` draws (certify
mode only) and estimation blocks ``(i, 1, b)``, ``b < ceil(n / block_size)``, with ``block_size`` draws (the last
block the remainder). An image is *complete* when all of its planned units are present.

The merge is order-independent: units are keyed and sorted, counts are summed exactly in int64, and files are
visited in sorted path order, so the same units split over any number of files, listed in any order, give the
same :class:`GroupCounts`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from cpcluster.aggregate.absent import absent_images
from cpcluster.aggregate.cost import Cost, group_cost
from cpcluster.aggregate.identity import identity, identity_hash, method_labels, method_name, predict_partners
from cpcluster.aggregate.skipping import REASONS, Skips, merge_skipped, verify
from cpcluster.core.choices import MODES
from cpcluster.core.shards import ShardData
from cpcluster.sharding.seeds import NOISE_SCHEME
from cpcluster.util.errors import InputError



@dataclass(frozen=True)
class RunPlan:
    """What one file's config says about the units of every image."""

    method: str  # the table label (readable name, plus a suffix where two methods would share it)
    method_id: str  # identity hash: equal exactly for runs of one method
    sigma: float
    mode: str
    n0: int  # 0 in predict mode
    n: int
    block_size: int
    num_classes: int
    max_alpha: float | None = None  # early stopping: skips hold for every alpha up to this; None without it

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block_size)

    @property
    def units_per_image(self) -> int:
        return self.num_blocks + (self.mode == "certify")

    def expected_draws(self, stream: np.ndarray, block: np.ndarray) -> np.ndarray:
        """Planned ``n_draws`` of units ``(stream, block)``; ``-1`` where the plan has no such unit."""
        last = self.n - (self.num_blocks - 1) * self.block_size
        est = np.where(block == self.num_blocks - 1, last, self.block_size)
        est = np.where((block >= 0) & (block < self.num_blocks), est, -1)
        sel = np.where(block == 0, self.n0, -1) if self.mode == "certify" else np.full(block.shape, -1)
        return np.where(stream == 0, sel, est)


def _positive_int(config: dict, key: str, path: str) -> int:
    v = config.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{path}: config key '{key}' missing or not a positive integer; is this a certify shard?")
    return v


def run_plan(shard: ShardData) -> RunPlan:
    """Read and check the config keys aggregation relies on (``mode`` defaults to ``certify``)."""
    c, path = shard.config, shard.path
    sigma = c.get("sigma")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise InputError(f"{path}: config key 'sigma' missing or not a positive number")
    mode = c.get("mode", "certify")
    if mode not in MODES:
        raise InputError(f"{path}: config key 'mode' is {mode!r}; expected one of {', '.join(MODES)}")
    try:
        method = method_name(c)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    n0 = _positive_int(c, "n0", path) if mode == "certify" else 0
    return RunPlan(method=method, method_id=identity_hash(c), sigma=float(sigma), mode=mode, n0=n0,
                   n=_positive_int(c, "n", path), block_size=_positive_int(c, "block_size", path),
                   num_classes=c["num_classes"], max_alpha=_max_alpha(c, path))


def _max_alpha(config: dict, path: str) -> float | None:
    """``early_stop.max_alpha`` of a config (None without early stopping), checked."""
    early = config.get("early_stop")
    if early is None:
        return None
    value = early.get("max_alpha") if isinstance(early, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
        raise InputError(f"{path}: config key 'early_stop' must hold 'max_alpha' in (0, 0.5)")
    return float(value)


@dataclass(frozen=True)
class GroupCounts:
    """Merged counts of one ``(method, sigma)`` group; arrays are aligned with ``image_index`` (sorted)."""

    plan: RunPlan
    config: dict
    config_hash: str
    files: tuple  # sorted paths
    image_index: np.ndarray  # (M,) int64, every image any file of the group lists
    labels: np.ndarray  # (M,) int64
    counts0: np.ndarray  # (M, C) int64 selection counts (zeros in predict mode)
    counts: np.ndarray  # (M, C) int64 estimation counts
    n0_present: np.ndarray  # (M,) int64 selection draws present (row sums of counts0)
    n_present: np.ndarray  # (M,) int64 estimation draws present (row sums of counts)
    complete: np.ndarray  # (M,) bool, every planned unit present or skipped
    skips: Skips  # early stopping: what each image skipped and why (all zeros without it)
    cost: Cost  # device time and draws of the units used (aggregate/cost.py)
    missing_shards: tuple  # shard indices absent from index/total in the shard attrs, when those are known
    absent: np.ndarray  # (A,) int64 images the plan gives to absent shards and no file lists
    warnings: tuple


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_difference(a, b, prefix: str = "") -> str:
    """``'key.path' (value in a vs value in b)`` for the first differing key in sorted order."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"'{prefix}{key}' ({'absent' if key not in a else 'present'} vs " \
                       f"{'absent' if key not in b else 'present'})"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{prefix}{key}.")
    return f"'{prefix.rstrip('.')}' ({_short(a)} vs {_short(b)})"


def _merge_labels(shards: Sequence[ShardData]):
    image = np.concatenate([s.image_index for s in shards])
    label = np.concatenate([s.labels for s in shards])
    owner = np.concatenate([np.full(len(s.image_index), i) for i, s in enumerate(shards)])
    uniq, first, inverse = np.unique(image, return_index=True, return_inverse=True)
    bad = np.flatnonzero(label != label[first][inverse])
    if len(bad):
        j = bad[0]
        i0 = first[inverse[j]]
        raise InputError(f"{shards[owner[i0]].path} and {shards[owner[j]].path}: image {image[j]} has label "
                         f"{label[i0]} in one and {label[j]} in the other; the files come from different datasets")
    return uniq, label[first]


def _missing_shards(shards: Sequence[ShardData]) -> tuple:
    info = [s.shard for s in shards]
    if not all(isinstance(d.get("index"), int) and isinstance(d.get("total"), int) for d in info):
        return ()
    totals = {d["total"] for d in info}
    if len(totals) != 1:
        return ()
    return tuple(sorted(set(range(totals.pop())) - {d["index"] for d in info}))


def _head(values, k: int = 10) -> str:
    """The first ``k`` values, comma-separated, with `` ...`` when there are more."""
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:k])) + (" ..." if len(values) > k else "")


def _as_slice(idx: np.ndarray):
    """``idx`` as a slice when it is an increasing arithmetic progression (views, no copies), else unchanged."""
    if len(idx) == 1:
        return slice(int(idx[0]), int(idx[0]) + 1)
    step = int(idx[1] - idx[0])
    if step > 0 and (np.diff(idx) == step).all():
        return slice(int(idx[0]), int(idx[-1]) + 1, step)
    return idx


def _add_rows(acc: np.ndarray, pos: np.ndarray, counts: np.ndarray, rows: np.ndarray) -> None:
    """``acc[pos[j]] += counts[rows[j]]`` for all j, exactly, also when ``pos`` repeats."""
    if len(np.unique(pos)) == len(pos):  # the usual case (one unit per image and stream in this file): one pass
        p, r = _as_slice(pos), _as_slice(rows)
        if isinstance(p, slice):  # images in order: add in place into a view (no gather/scatter copies)
            acc[p] += counts[r]
        else:
            acc[pos] += counts[r]
        return
    order = np.argsort(pos, kind="stable")
    pos, rows = pos[order], rows[order]
    start = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    acc[pos[start]] += np.add.reduceat(counts[rows], start, axis=0)


def merge_group(shards: Sequence[ShardData], plan: RunPlan) -> GroupCounts:
    """Merge the shards of one group (all with ``plan``'s method and sigma); see the module docstring."""
    shards = sorted(shards, key=lambda s: s.path)
    ref = shards[0]
    for s in shards[1:]:
        if s.config_hash != ref.config_hash:
            raise InputError(f"{ref.path} and {s.path}: same method {plan.method}, sigma {plan.sigma:g} and "
                             f"mode {plan.mode} but "
                             f"different run configurations, first difference in key "
                             f"{_first_difference(ref.config, s.config)}; aggregate them separately")
    warnings = [f"{s.path}: marked incomplete; its unfinished units count as missing"
                for s in shards if not s.complete]
    if "noise" not in ref.config:
        warnings.append(f"{plan.method} sigma {plan.sigma:g}: made before noise scheme {NOISE_SCHEME}; on a CPU two "
                        "of its noise batches could draw the same noise (torch kept 32 bits of a seed); rerun it")
    image_index, labels = _merge_labels(shards)
    m, c = len(image_index), plan.num_classes

    units = np.concatenate([s.units for s in shards])
    owner = np.concatenate([np.full(len(s.units), i, dtype=np.int64) for i, s in enumerate(shards)])
    row = np.concatenate([np.arange(len(s.units), dtype=np.int64) for s in shards])
    expected = plan.expected_draws(units[:, 1], units[:, 2])
    bad = np.flatnonzero(expected != units[:, 3])
    if len(bad):
        j = bad[0]
        unit = tuple(int(v) for v in units[j, :3])
        want = "no such unit" if expected[j] < 0 else f"{expected[j]} draws"
        raise InputError(f"{shards[owner[j]].path}: unit (image, stream, block) = {unit} has {units[j, 3]} draws "
                         f"but the config (mode {plan.mode}, n0 {plan.n0}, n {plan.n}, block_size "
                         f"{plan.block_size}) plans {want}; the file does not match its config")

    # Duplicates: sort by (image, stream, block, file, row) so the first copy is from the first file in path order.
    order = np.lexsort((row, owner, units[:, 2], units[:, 1], units[:, 0]))
    key = units[order, :3]
    dup = np.flatnonzero((key[1:] == key[:-1]).all(axis=1)) + 1
    keep = np.ones(len(units), dtype=bool)
    if len(dup):
        first = dup.copy()
        while True:  # walk back to the first copy of runs of 3+ copies
            back = (first > 0) & np.isin(first, dup)
            if not back.any():
                break
            first[back] -= 1
        a, b = order[first], order[dup]
        rows_a = np.stack([shards[owner[i]].counts[row[i]] for i in a])
        rows_b = np.stack([shards[owner[i]].counts[row[i]] for i in b])
        differ = np.flatnonzero((rows_a != rows_b).any(axis=1))
        if len(differ):
            i, j = a[differ[0]], b[differ[0]]
            unit = tuple(int(v) for v in units[i, :3])
            raise InputError(f"{shards[owner[i]].path} and {shards[owner[j]].path}: unit (image, stream, block) = "
                             f"{unit} is in both with different counts; one of them is from another run, remove it")
        keep[b] = False
        pairs = {}
        for i, j in zip(a, b):
            pairs[(owner[i], owner[j])] = pairs.get((owner[i], owner[j]), 0) + 1
        warnings += [f"{shards[i].path} and {shards[j].path}: {k} identical duplicate unit(s) dropped"
                     for (i, j), k in sorted(pairs.items())]

    # Sum counts per (image, stream), one file at a time, so memory stays near the inputs plus the result.
    acc = (np.zeros((m, c), dtype=np.int64), np.zeros((m, c), dtype=np.int64))  # selection, estimation
    draws = np.zeros((2, m), dtype=np.int64)
    per_image_units = np.zeros(m, dtype=np.int64)
    for i, s in enumerate(shards):
        kept = keep[owner == i]
        for stream in (0, 1):
            rows = np.flatnonzero(kept & (s.units[:, 1] == stream))
            if len(rows):
                pos = np.searchsorted(image_index, s.units[rows, 0])
                _add_rows(acc[stream], pos, s.counts, rows)
                np.add.at(draws[stream], pos, s.units[rows, 3])
        per_image_units += np.bincount(np.searchsorted(image_index, s.units[kept, 0]), minlength=m)
    skips = merge_skipped(shards, image_index, units[keep, :3], plan)
    complete = per_image_units + skips.units == plan.units_per_image
    _verify_skips(shards, plan, image_index, labels, acc, draws[1], skips, complete)
    missing_shards = _missing_shards(shards)
    absent, problem = absent_images(shards, missing_shards)
    if missing_shards:
        held = f"{problem}" if problem else f"they alone held {len(absent)} image(s) (index {_head(absent)})"
        warnings.append(f"{plan.method} sigma {plan.sigma:g}: {len(missing_shards)} shard file(s) absent "
                        f"(index {_head(missing_shards)}); {held}")
    return GroupCounts(plan=plan, config=ref.config, config_hash=ref.config_hash,
                       files=tuple(s.path for s in shards), image_index=image_index, labels=labels,
                       counts0=acc[0], counts=acc[1], n0_present=draws[0], n_present=draws[1],
                       complete=complete, skips=skips,
                       cost=group_cost(shards, [keep[owner == i] for i in range(len(shards))], m),
                       missing_shards=missing_shards, absent=absent, warnings=tuple(warnings))


def _verify_skips(shards, plan: RunPlan, image_index, labels, acc, n_present, skips: Skips, complete) -> None:
    """InputError unless the counts of every complete image justify what it skipped (:func:`skipping.verify`)."""
    check = complete & (skips.reason != 0)
    if not check.any():
        return
    bad = verify(acc[0][check], acc[1][check], labels[check], n_present[check], plan.n, skips.reason[check],
                 plan.max_alpha)
    if len(bad):
        j = int(np.flatnonzero(check)[bad[0]])
        raise InputError(f"{shards[0].path} (and the rest of its run): image {int(image_index[j])} skipped units as "
                         f"'{REASONS.get(int(skips.reason[j]), skips.reason[j])}', which its counts do not justify; "
                         "the files were edited or made by another program")


def merge_shards(shards: Sequence[ShardData]) -> list:
    """Group shards by ``(method, sigma, mode)`` and merge each group; returns them sorted by (label, sigma, mode).

    The method is the identity hash; every group's plan carries its label from
    :func:`cpcluster.aggregate.identity.method_labels`. ``mode`` is part of the key so a CERTIFY and a PREDICT run
    at the same sigma are two rows, not a conflict."""
    if not shards:
        raise InputError("no shard files given")
    groups: dict = {}
    methods: dict = {}
    for s in shards:
        plan = run_plan(s)
        groups.setdefault((plan.method_id, plan.sigma, plan.mode), (plan, []))[1].append(s)
        methods.setdefault(plan.method_id, (plan.method, identity(s.config), plan.mode))
    partner = predict_partners(methods)
    labels = method_labels({mid: m[:2] for mid, m in methods.items() if mid not in partner})
    labels.update({mid: labels[other] for mid, other in partner.items()})
    plans = [(replace(plan, method=labels[plan.method_id], method_id=partner.get(plan.method_id, plan.method_id)),
              files) for plan, files in groups.values()]
    plans.sort(key=lambda pf: (pf[0].method, pf[0].sigma, pf[0].mode))
    return [merge_group(files, plan) for plan, files in plans]
