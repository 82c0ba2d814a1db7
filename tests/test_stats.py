"""aggregate.stats against independent references (statsmodels, scipy) and by simulation of the guarantees."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from cpcluster.aggregate import stats

ALPHAS = st.floats(min_value=1e-6, max_value=0.49, allow_nan=False)


@st.composite
def k_n(draw):
    n = draw(st.integers(min_value=1, max_value=2_000_000))
    k = draw(st.one_of(st.just(0), st.just(n), st.integers(min_value=0, max_value=n)))
    return k, n


@settings(max_examples=400, deadline=None)
@given(k_n(), ALPHAS)
def test_bound_equals_statsmodels_beta_interval(kn, alpha):
    k, n = kn
    ref = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
    got = stats.clopper_pearson_lower(k, n, alpha)
    assert abs(float(got) - ref) <= 1e-12
    if k == 0:
        assert got == 0.0


def test_bound_vectorized_equals_scalar_and_edges():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 100_000, size=500)
    k = (rng.uniform(size=500) * (n + 1)).astype(np.int64)
    k[:50], k[50:100] = 0, n[50:100]
    k[100:200], n[100:200] = k[100], n[100]  # repeated (k, n) pairs are inverted once and shared
    got = stats.clopper_pearson_lower(k, n, 0.001)
    ref = np.array([proportion_confint(a, b, alpha=0.002, method="beta")[0] for a, b in zip(k, n)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    # k = n: the bound is alpha ** (1 / n) (Beta(n, 1) quantile), strictly below 1.
    np.testing.assert_allclose(got[50:100], 0.001 ** (1.0 / n[50:100]), rtol=1e-12)
    assert stats.clopper_pearson_lower(0, 0, 0.01) == 0.0  # no draws: nothing is bounded
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            stats.clopper_pearson_lower(1, 2, bad)
    with pytest.raises(ValueError):
        stats.clopper_pearson_lower(3, 2, 0.01)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.0, max_value=1.0 - 1e-12), st.floats(min_value=0.01, max_value=2.0))
def test_radius_is_sigma_times_probit(p, sigma):
    r = float(stats.certified_radius(np.array([p]), sigma)[0])
    if p > 0.5:
        assert r == pytest.approx(sigma * sps.norm.ppf(p), rel=1e-12, abs=1e-15)
        assert r > 0
    else:
        assert r == 0.0


@st.composite
def nab(draw):
    n_a = draw(st.integers(min_value=0, max_value=50_000))
    n_b = draw(st.one_of(st.just(n_a), st.integers(min_value=0, max_value=n_a)))
    return n_a, n_b


@settings(max_examples=300, deadline=None)
@given(nab())
def test_predict_pvalue_equals_scipy_binomtest(ab):
    n_a, n_b = ab
    got = float(stats.binom_two_sided_half(n_a, n_b))
    ref = sps.binomtest(n_a, n_a + n_b, 0.5).pvalue if n_a + n_b else 1.0
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_predict_decision_matches_scipy_loop_and_ties_go_low():
    rng = np.random.default_rng(1)
    counts = rng.multinomial(200, [0.4, 0.35, 0.25], size=400)
    counts[0] = [80, 80, 40]  # tie between 0 and 1: abstain (p-value 1)
    counts[1] = [10, 150, 40]
    pred, pv = stats.predict_decision(counts, 0.01)
    for row, p_got, v_got in zip(counts, pred, pv):
        top = sorted(row)[::-1]
        ref = sps.binomtest(int(top[0]), int(top[0] + top[1]), 0.5).pvalue
        assert v_got == pytest.approx(ref, rel=1e-9)
        assert p_got == (int(np.argmax(row)) if ref <= 0.01 else -1)
    assert pred[0] == -1 and pred[1] == 1
    c_a, n_a, n_b = stats.top_two(np.array([[5, 7, 7, 1]]))
    assert (c_a[0], n_a[0], n_b[0]) == (1, 7, 7)  # lowest index wins a tie


def test_certify_uses_selection_class_and_estimation_count():
    counts0 = np.array([[1, 2, 9], [5, 5, 0], [0, 0, 0], [3, 0, 0]])
    counts = np.array([[90, 0, 10], [0, 100, 0], [100, 0, 0], [1000, 0, 0]])
    pred, radius, p_low = stats.certify_decision(counts0, counts, 0.001, 0.5)
    # image 0: c_A = 2 from selection, k = 10 of 100 -> abstain although class 0 dominates the estimation
    assert pred[0] == -1 and radius[0] == 0.0
    assert p_low[0] == pytest.approx(proportion_confint(10, 100, alpha=0.002, method="beta")[0], abs=1e-12)
    # image 1: tie in selection -> class 0 (lowest index); k = 0 -> bound 0 -> abstain
    assert pred[1] == -1 and p_low[1] == 0.0
    assert pred[2] == -1  # no selection draws: nothing to certify
    ref = proportion_confint(1000, 1000, alpha=0.002, method="beta")[0]
    assert pred[3] == 0 and radius[3] == pytest.approx(0.5 * sps.norm.ppf(ref), rel=1e-12)


def test_certified_accuracy_and_acr_against_loops():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 300)
    pred = np.where(rng.uniform(size=300) < 0.3, -1, np.where(rng.uniform(size=300) < 0.8, labels, 4 - labels))
    radius = np.where(pred >= 0, rng.exponential(0.5, 300).round(2), 0.0)  # rounding makes radius == r ties
    at = np.array([0.0, 0.1, 0.25, 0.5, 1.0, 3.0])
    ref = [np.mean([(p == y and p >= 0 and r >= a) for p, y, r in zip(pred, labels, radius)]) for a in at]
    np.testing.assert_allclose(stats.certified_accuracy(pred, labels, radius, at), ref, rtol=0, atol=1e-15)
    acr = np.mean([r if (p == y and p >= 0) else 0.0 for p, y, r in zip(pred, labels, radius)])
    assert stats.average_certified_radius(pred, labels, radius) == pytest.approx(acr, rel=1e-12)
    # a wrong prediction never counts, whatever its radius; abstention never counts
    assert stats.certified_accuracy([3, -1], [2, -1], [5.0, 0.0], [0.0])[0] == 0.0
    assert np.isnan(stats.certified_accuracy([], [], [], [0.0])).all()


# ------------------------------------------------------------------------------------- coverage by simulation
def _binom_quantile(n, p, q):
    return sps.binom.ppf(q, n, p) / n


def test_certify_coverage_by_simulation():
    """Rate of certifying a radius above the true sigma * Phi^-1(p) stays within alpha (tolerance: the 99.9%
    quantile of Binomial(N, alpha) / N), and matches the exact rate computed independently from statsmodels."""
    alpha, sigma, n0, n, num_classes = 0.05, 0.5, 20, 400, 10
    p_grid = np.linspace(0.45, 0.995, 45)
    p_a = np.repeat(p_grid, 500)  # N = 22,500 images
    N = len(p_a)
    probs = np.empty((N, num_classes))
    probs[:] = ((1 - p_a) / (num_classes - 1))[:, None]
    probs[:, 0] = p_a
    rng = np.random.default_rng(12345)
    counts0 = rng.multinomial(n0, probs)
    counts = rng.multinomial(n, probs)  # fresh, independent draws
    pred, radius, _ = stats.certify_decision(counts0, counts, alpha, sigma)
    p_true = probs[np.arange(N), counts0.argmax(axis=1)]  # true probability of the selected class
    true_radius = sigma * sps.norm.ppf(p_true)  # <= 0 when p_true <= 0.5: any certificate is then wrong
    violation = (pred >= 0) & (radius > true_radius)
    rate = violation.mean()
    assert rate <= _binom_quantile(N, alpha, 0.999), rate
    assert rate >= alpha / 4, f"rate {rate} far below alpha: the bound is not tight (always abstaining?)"

    # Independent exact expectation given the selected class: P(CP_lower(K) > max(p, 1/2)), K ~ Bin(n, p), with
    # the bound for every k taken from statsmodels.
    lower = proportion_confint(np.arange(n + 1), n, alpha=2 * alpha, method="beta")[0]
    lower[0] = 0.0
    expect = np.empty(N)
    for p in np.unique(p_true):
        kmin = np.searchsorted(lower, max(p, 0.5), side="right")  # first k whose bound exceeds the threshold
        expect[p_true == p] = sps.binom.sf(kmin - 1, n, p)
    mean, sd = expect.sum(), np.sqrt((expect * (1 - expect)).sum())
    assert abs(violation.sum() - mean) <= 4 * sd, (violation.sum(), mean, sd)
    assert expect.max() <= alpha


def test_predict_error_rate_by_simulation():
    """PREDICT returns a class other than g(x) with probability <= alpha (near-ties: the hardest case), and
    under an exact tie of the top two it answers at all with probability <= alpha."""
    alpha, n, rng = 0.05, 1000, np.random.default_rng(777)
    eps = np.repeat([0.002, 0.005, 0.01, 0.2], 5000)  # N = 20,000 images, g(x) = class 0
    probs = np.stack([0.45 + eps / 2, 0.45 - eps / 2, 0.1 + 0 * eps], axis=1)
    pred, _ = stats.predict_decision(rng.multinomial(n, probs), alpha)
    wrong = ((pred != 0) & (pred != -1)).mean()
    assert wrong <= _binom_quantile(len(eps), alpha, 0.999), wrong
    assert wrong >= alpha / 8, f"wrong-class rate {wrong}: test too conservative to have power"
    assert (pred[eps == 0.2] == 0).mean() > 0.95  # and it does answer when the gap is clear

    tie = np.tile([0.45, 0.45, 0.1], (20_000, 1))
    pred, _ = stats.predict_decision(rng.multinomial(n, tie), alpha)
    answered = (pred != -1).mean()
    assert answered <= _binom_quantile(20_000, alpha, 0.999)
    assert answered >= alpha / 4
