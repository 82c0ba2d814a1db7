"""Randomized-smoothing statistics (Cohen et al. 2019) as pure, vectorized numpy/scipy functions.

Every function takes numpy arrays of per-image counts and returns per-image arrays; nothing here knows about
files. Conventions shared by all functions:

* ``counts0`` and ``counts`` are ``(N, C)`` integer class counts of N images (selection and estimation draws).
* A prediction is a class index in ``[0, C)`` or :data:`ABSTAIN` (``-1``).
* Ties in an argmax are broken towards the **lowest class index** (numpy's ``argmax`` rule). The choice does not
  affect the guarantees: any fixed rule that depends only on the selection counts keeps them.
* Radii are in pixel space ``[0,1]^d``, the space the smoothing noise ``sigma`` is added in; an abstention has
  radius ``0.0``.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

ABSTAIN = -1


def clopper_pearson_lower(k, n, alpha: float) -> np.ndarray:
    """One-sided ``(1 - alpha)`` Clopper–Pearson lower confidence bound on a binomial proportion.

    Parameters
    ----------
    k, n : int arrays (broadcastable)
        Successes and trials, ``0 <= k <= n``.
    alpha : float in (0, 1)
        Error probability of the one-sided bound.

    Returns
    -------
    float64 array of the broadcast shape: ``Beta.ppf(alpha, k, n - k + 1)``, and ``0`` where ``k == 0`` (including
    ``n == 0``).

    Guarantee: for ``K ~ Binomial(n, p)``, ``P(clopper_pearson_lower(K, n, alpha) > p) <= alpha`` for every ``p``.
    Equal to statsmodels' ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]`` (the two-sided interval
    at level ``2 * alpha`` has this one-sided lower end), which is how locuslab/smoothing computes it.
    """
    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if ((k < 0) | (k > n)).any():
        raise ValueError("need 0 <= k <= n")
    out = np.zeros(k.shape, dtype=np.float64)
    pos = k > 0
    if pos.any():
        kp, np_ = k[pos], n[pos]
        inverse = None
        if int(np_.max()) < 2**31:  # images share (k, n) pairs (k == n is common): invert each pair once
            pair, inverse = np.unique(kp * 2**31 + np_, return_inverse=True)
            kp, np_ = pair >> 31, pair & (2**31 - 1)
        kf = kp.astype(np.float64)
        bound = stats.beta.ppf(alpha, kf, np_.astype(np.float64) - kf + 1.0)
        out[pos] = bound if inverse is None else bound[inverse.reshape(-1)]
    return out


def certified_radius(p_lower, sigma: float) -> np.ndarray:
    """Certified L2 radius ``sigma * Phi^-1(p_lower)`` where ``p_lower > 0.5``, else ``0.0`` (abstain).

    Parameters
    ----------
    p_lower : float array, lower bounds on the top-class probability.
    sigma : float > 0, the smoothing noise standard deviation in pixel space.

    Returns
    -------
    float64 array of the same shape; strictly positive exactly where ``p_lower > 0.5``.

    Guarantee (Cohen et al. 2019, Theorem 1): if ``p_A >= p_lower > 0.5`` then the smoothed classifier's
    prediction is constant on the L2 ball of this radius around the input.
    """
    p = np.asarray(p_lower, dtype=np.float64)
    out = np.zeros(p.shape, dtype=np.float64)
    ok = p > 0.5
    out[ok] = float(sigma) * stats.norm.ppf(p[ok])
    return out


def certify_decision(counts0, counts, alpha: float, sigma: float, n=None):
    """Cohen's CERTIFY from selection and estimation counts, for N images at once.

    Parameters
    ----------
    counts0 : (N, C) int, selection counts (``n0`` draws each); ``c_A = argmax`` (lowest index on ties).
    counts : (N, C) int, estimation counts from *fresh, independent* draws; ``k = counts[c_A]``, ``n = row sum``.
    alpha : float in (0, 1); sigma : float > 0 (pixel space).
    n : optional (N,) int, the row sums of ``counts`` when the caller already has them.

    Returns
    -------
    predict : (N,) int64, ``c_A`` or :data:`ABSTAIN` (when ``p_lower <= 0.5``, or when an image has no selection
        draws at all).
    radius : (N,) float64, ``sigma * Phi^-1(p_lower)`` or ``0.0`` on abstain.
    p_lower : (N,) float64, the Clopper–Pearson lower bound on ``P(f(x + delta) = c_A)``.

    Guarantee: for each image, with probability at least ``1 - alpha`` over the estimation draws, either the
    result abstains or the returned class has true probability ``p >= p_lower`` and hence the smoothed
    classifier returns it everywhere within the returned radius.
    """
    counts0 = np.asarray(counts0, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if counts0.ndim != 2 or counts0.shape != counts.shape:
        raise ValueError(f"counts0 and counts must both be (N, C), got {counts0.shape} and {counts.shape}")
    rows = np.arange(counts.shape[0])
    c_a = counts0.argmax(axis=1)
    k = counts[rows, c_a]
    p_lower = clopper_pearson_lower(k, counts.sum(axis=1) if n is None else n, alpha)
    p_lower[counts0[rows, c_a] == 0] = 0.0  # no selection draws (counts >= 0): no candidate class to certify
    radius = certified_radius(p_lower, sigma)
    predict = np.where(p_lower > 0.5, c_a, ABSTAIN).astype(np.int64)
    return predict, radius, p_lower


def top_two(counts):
    """Top class and the two largest counts per row: ``(c_A, n_A, n_B)``; ties go to the lowest class index."""
    counts = np.asarray(counts, dtype=np.int64)
    rows = np.arange(counts.shape[0])
    c_a = counts.argmax(axis=1)
    n_a = counts[rows, c_a]
    rest = counts.copy()
    rest[rows, c_a] = -1
    n_b = rest.max(axis=1) if counts.shape[1] > 1 else np.zeros_like(n_a)
    return c_a, n_a, np.maximum(n_b, 0)


def binom_two_sided_half(n_a, n_b) -> np.ndarray:
    """Two-sided binomial test p-value of ``n_a`` successes in ``n_a + n_b`` trials against ``p = 0.5``.

    Vectorized form of ``scipy.stats.binomtest(n_a, n_a + n_b, 0.5).pvalue`` for ``n_a >= n_b``: by symmetry of
    Binomial(m, 1/2) the outcomes at least as unlikely as ``n_a`` are ``<= n_b`` and ``>= n_a``, so the p-value is
    ``min(1, cdf(n_b) + sf(n_a - 1))``; it is 1 when ``n_a == n_b`` (including ``m == 0``).
    """
    n_a = np.asarray(n_a, dtype=np.int64)
    n_b = np.asarray(n_b, dtype=np.int64)
    if (n_a < n_b).any() or (n_b < 0).any():
        raise ValueError("need n_a >= n_b >= 0")
    m = n_a + n_b
    p = np.minimum(1.0, stats.binom.cdf(n_b, m, 0.5) + stats.binom.sf(n_a - 1, m, 0.5))
    return np.where(n_a == n_b, 1.0, p)


def predict_decision(counts, alpha: float):
    """Cohen's PREDICT from ``n`` draws per image, for N images at once.

    Parameters
    ----------
    counts : (N, C) int, class counts of the draws; ``n_A, n_B`` are the two largest (ties: lowest index first).
    alpha : float in (0, 1).

    Returns
    -------
    predict : (N,) int64, the top class if ``binomtest(n_A, n_A + n_B, 0.5).pvalue <= alpha``, else ABSTAIN.
    pvalue : (N,) float64.

    Guarantee (Cohen et al. 2019, Proposition 1): the probability of returning a class other than the smoothed
    classifier's prediction ``g(x)`` is at most ``alpha``. PREDICT certifies no radius.
    """
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    c_a, n_a, n_b = top_two(counts)
    pvalue = binom_two_sided_half(n_a, n_b)
    return np.where(pvalue <= alpha, c_a, ABSTAIN).astype(np.int64), pvalue


def certified_accuracy(predict, labels, radius, at) -> np.ndarray:
    """Fraction of images with ``predict == label`` and ``radius >= r``, for each ``r`` in ``at``.

    Parameters
    ----------
    predict, labels : (N,) int; radius : (N,) float (pixel space); at : (R,) float radii.

    Returns
    -------
    (R,) float64; abstentions count as wrong. NaN for every ``r`` when ``N == 0``. Costs O((N + R) log N).
    """
    predict, labels = np.asarray(predict), np.asarray(labels)
    radius = np.asarray(radius, dtype=np.float64)
    at = np.asarray(at, dtype=np.float64)
    if predict.shape[0] == 0:
        return np.full(at.shape, np.nan)
    good = np.sort(radius[(predict == labels) & (predict != ABSTAIN)])
    return (len(good) - np.searchsorted(good, at, side="left")) / predict.shape[0]


def average_certified_radius(predict, labels, radius) -> float:
    """ACR: ``mean(radius * correct)`` over N images (abstain and wrong count as 0); NaN when ``N == 0``."""
    predict, labels = np.asarray(predict), np.asarray(labels)
    if predict.shape[0] == 0:
        return float("nan")
    correct = (predict == labels) & (predict != ABSTAIN)
    return float(np.mean(np.where(correct, np.asarray(radius, dtype=np.float64), 0.0)))
