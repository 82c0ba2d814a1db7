"""From merged counts to per-image decisions, certified accuracy, ACR and the best-over-sigma envelope.

Which images are evaluated: by default only the complete ones (every planned unit present); the others are
reported as missing. With ``allow_partial`` every image the group lists is evaluated with the draws present, and
the ones with fewer draws than planned are reported as partial. An image with no selection draws abstains (there
is no candidate class), one with no estimation draws has ``p_lower = 0`` and abstains too: the guarantee of
:func:`aggregate.stats.certify_decision` holds for any fixed number of draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cpcluster.aggregate import stats
from cpcluster.aggregate.merge import GroupCounts
from cpcluster.util.errors import InputError


@dataclass(frozen=True)
class GroupResult:
    """Decisions of one ``(method, sigma)`` group; per-image arrays are aligned with ``idx`` (sorted)."""

    group: GroupCounts
    idx: np.ndarray  # (E,) evaluated image indices
    label: np.ndarray  # (E,)
    predict: np.ndarray  # (E,) class or stats.ABSTAIN
    radius: np.ndarray  # (E,) pixel-space L2 radius, 0.0 on abstain and always in predict mode
    n0: np.ndarray  # (E,) selection draws used
    n: np.ndarray  # (E,) estimation draws used
    missing: np.ndarray  # image indices not evaluated: incomplete (default mode) or held only by absent shard files
    partial: np.ndarray  # image indices evaluated with fewer draws than planned (allow_partial)
    skip: np.ndarray  # (E,) early stopping: 0, or why the image's estimation stopped (aggregate.skipping.REASONS)
    certified_accuracy: np.ndarray  # (R,) at the requested radii; NaN at r > 0 in predict mode
    acr: float  # NaN in predict mode or with no image

    @property
    def correct(self) -> np.ndarray:
        return ((self.predict == self.label) & (self.predict != stats.ABSTAIN)).astype(np.int64)

    @property
    def abstain_rate(self) -> float:
        return float(np.mean(self.predict == stats.ABSTAIN)) if len(self.predict) else float("nan")


def evaluate_group(group: GroupCounts, alpha: float, radii: Sequence[float], allow_partial: bool) -> GroupResult:
    """CERTIFY (or PREDICT, by the run's mode) every evaluated image of ``group`` at level ``alpha``.

    Images that early stopping skipped abstain with radius 0 (exact at every ``alpha`` up to the run's
    ``max_alpha``: see :mod:`cpcluster.aggregate.skipping`); a larger ``alpha`` is an InputError."""
    plan = group.plan
    if plan.max_alpha is not None and alpha > plan.max_alpha:
        raise InputError(f"--alpha {alpha:g}: {plan.method} sigma {plan.sigma:g} was certified with --early-stop "
                         f"{plan.max_alpha:g}, whose skipped draws are exact only for alpha <= {plan.max_alpha:g}; "
                         f"aggregate it at --alpha {plan.max_alpha:g} or less")
    use = np.ones(len(group.image_index), dtype=bool) if allow_partial else group.complete
    pick = (lambda a: a) if use.all() else (lambda a: a[use])  # no copy of the (M, C) counts when all are used
    counts0, counts, n = pick(group.counts0), pick(group.counts), pick(group.n_present)
    radii = np.asarray(radii, dtype=np.float64)
    if plan.mode == "certify":
        predict, radius, _ = stats.certify_decision(counts0, counts, alpha, plan.sigma, n=n)
        skipped = pick(group.skips.reason) != 0
        predict[skipped], radius[skipped] = stats.ABSTAIN, 0.0
        cert = stats.certified_accuracy(predict, group.labels[use], radius, radii)
        acr = stats.average_certified_radius(predict, group.labels[use], radius)
    else:
        predict, _ = stats.predict_decision(counts, alpha)
        radius = np.zeros(len(predict))
        cert = stats.certified_accuracy(predict, group.labels[use], radius, radii)
        cert = np.where(radii > 0, np.nan, cert)
        acr = float("nan")
    return GroupResult(group=group, idx=group.image_index[use], label=group.labels[use], predict=predict,
                       radius=radius, n0=pick(group.n0_present), n=n,
                       missing=np.union1d(group.image_index[~use], group.absent),
                       partial=group.image_index[use & ~group.complete], skip=pick(group.skips.reason),
                       certified_accuracy=cert, acr=acr)


@dataclass(frozen=True)
class Envelope:
    """Best certified accuracy over sigma, per radius, for one method (certify-mode groups only)."""

    method: str
    sigmas: tuple  # sigmas it ranges over
    certified_accuracy: np.ndarray  # (R,)
    best_sigma: tuple  # (R,) the sigma achieving it (smallest sigma on ties), None where no group has a value


def envelopes(results: Sequence[GroupResult]) -> list:
    """One :class:`Envelope` per method that has certify-mode groups, in method order."""
    by_method: dict = {}
    for r in results:
        if r.group.plan.mode == "certify":
            by_method.setdefault(r.group.plan.method, []).append(r)
    out = []
    for method in sorted(by_method):
        rs = sorted(by_method[method], key=lambda r: r.group.plan.sigma)
        table = np.stack([r.certified_accuracy for r in rs])  # (S, R), NaN for groups with no image
        filled = np.where(np.isnan(table), -np.inf, table)
        best = filled.argmax(axis=0)  # first (smallest sigma) on ties
        values = filled[best, np.arange(table.shape[1])]
        out.append(Envelope(method=method, sigmas=tuple(r.group.plan.sigma for r in rs),
                            certified_accuracy=np.where(np.isinf(values), np.nan, values),
                            best_sigma=tuple(None if np.isinf(v) else rs[b].group.plan.sigma
                                             for b, v in zip(best, values))))
    return out
