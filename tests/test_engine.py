"""The counting engine: seeded noise per (image, stream, batch), packing, on-device counting, sampling correctness."""
import numpy as np
import pytest
import torch
from scipy import stats

from cpcluster.core.engine import CountingEngine, draw_noise, needs_generator
from cpcluster.sharding import balanced_ranges, build_units
from cpcluster.util.errors import InputError

torch.set_num_threads(1)
SHAPE = (1, 4, 4)


class Threshold(torch.nn.Module):
    """A base classifier whose label is a known function of the noise at pixel (0, 0, 0).

    With images equal to ``level`` there, ``z = (x_noisy[0,0,0] - level) / sigma`` is the standard normal noise
    coordinate; the label is the number of cut points below z, so P(label = c) = Phi(q_c) - Phi(q_{c-1}).
    Elementwise, hence exact whatever the batch composition.
    """

    def __init__(self, level, sigma, cuts, num_classes):
        super().__init__()
        self.level, self.sigma, self.num_classes = level, sigma, num_classes
        self.cuts = torch.tensor(cuts, dtype=torch.float32)

    def forward(self, x, generator=None):
        z = (x[:, 0, 0, 0] - self.level) / self.sigma
        label = (z[:, None] >= self.cuts[None, :]).sum(1)
        return torch.nn.functional.one_hot(label, self.num_classes).float()


class Recorder(torch.nn.Module):
    """Records every input row it sees (padding rows are exact zeros and are dropped)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.rows, self.num_classes = [], num_classes

    def forward(self, x, generator=None):
        keep = x.flatten(1).abs().sum(1) > 0
        self.rows.append(x[keep].clone())
        return torch.zeros(x.shape[0], self.num_classes)


def _images(ids, level=0.5):
    return torch.full((len(ids), *SHAPE), level)


def _run(model, ids, units, *, sigma=0.5, seed=3, block_size=40, draw_batch=20, batch=60, num_classes=3, **kw):
    eng = CountingEngine(model, _images(ids), ids, sigma=sigma, seed=seed, block_size=block_size,
                         draw_batch=draw_batch, batch=batch, num_classes=num_classes, **kw)
    out = []
    eng.run(units, lambda u, c: out.append((tuple(int(v) for v in u), c)))
    return out, eng


def test_noise_is_the_seeded_noise_of_each_batch_and_streams_never_share_a_draw():
    ids = [5, 9]
    units = build_units(ids, 30, 100, 40, "certify")  # n0 = 30: batches of 20 + 10; estimation 40 + 40 + 20
    rec = Recorder()
    out, _ = _run(rec, ids, units, sigma=0.5, seed=11, per_batch_generator=False)
    seen = torch.cat(rec.rows)
    expected, per_stream = [], {}
    for i, s, b, n_draws in units:
        start = b * 40 if s else 0
        for j in range(start // 20, (start + n_draws + 19) // 20):
            size = min(20, (start + n_draws) - j * 20)
            noise = draw_noise(11, i, s, j, size, SHAPE)
            expected.append(0.5 + 0.5 * noise)
            per_stream.setdefault((int(i), int(s)), []).append(noise)
    torch.testing.assert_close(seen, torch.cat(expected), rtol=0, atol=1e-6)
    assert [u for u, _ in out] == [tuple(u) for u in units.tolist()], "every unit once, in plan order"
    for i in ids:
        sel = {r.numpy().tobytes() for r in torch.cat(per_stream[(i, 0)])}
        est = {r.numpy().tobytes() for r in torch.cat(per_stream[(i, 1)])}
        assert len(sel) == 30 and len(est) == 100, "no repeated draw inside a stream"
        assert not sel & est, "selection and estimation share no noise draw"
    assert not {r.numpy().tobytes() for r in torch.cat(per_stream[(5, 1)])} & \
        {r.numpy().tobytes() for r in torch.cat(per_stream[(9, 1)])}, "images get different noise"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_counts_pass_a_binomial_test(p):
    """Class 0 with probability p: the estimation count of every image passes a binomial test (fixed seed)."""
    ids = list(range(4))
    units = build_units(ids, 100, 4000, 200, "certify")
    model = Threshold(0.5, 0.5, [stats.norm.ppf(p)], 2)
    out, _ = _run(model, ids, units, block_size=200, draw_batch=100, batch=400, num_classes=2, seed=2024)
    blocks = np.asarray([c[0] for u, c in out if u[1] == 1])  # class-0 counts of the 4 x 20 blocks of 200
    for i in ids:
        k = sum(c[0] for u, c in out if u[0] == i and u[1] == 1)
        assert stats.binomtest(k, 4000, p).pvalue > 1e-3
    # blocks are independent Binomial(200, p): their dispersion is chi-square with 80 degrees of freedom
    dispersion = ((blocks - 200 * p) ** 2).sum() / (200 * p * (1 - p))
    assert 1e-3 < stats.chi2.sf(dispersion, len(blocks)) < 1 - 1e-3


def test_three_classes_follow_their_multinomial():
    cuts = [stats.norm.ppf(0.2), stats.norm.ppf(0.7)]  # P = 0.2, 0.5, 0.3
    units = build_units([0], 0, 20000, 5000, "predict")
    out, _ = _run(Threshold(0.5, 0.25, cuts, 3), [0], units, sigma=0.25, block_size=5000, draw_batch=500,
                  batch=1000)
    counts = sum(c for _, c in out)
    assert counts.sum() == 20000
    assert stats.chisquare(counts, 20000 * np.array([0.2, 0.5, 0.3])).pvalue > 1e-3


def test_counts_do_not_depend_on_packing_or_shard_cuts():
    ids = [0, 1, 2]
    units = build_units(ids, 30, 160, 40, "certify")
    model = Threshold(0.5, 0.5, [-0.3, 0.4], 3)
    ref, _ = _run(model, ids, units, batch=20)  # one noise batch per forward
    for batch in (40, 60, 500):
        assert _pairs(_run(model, ids, units, batch=batch)[0]) == _pairs(ref)
    for shards in (2, 5, len(units)):
        merged = []
        for a, b in balanced_ranges(units[:, 3], shards):
            merged += _run(model, ids, units[a:b], batch=60)[0]
        assert _pairs(merged) == _pairs(ref)


def _pairs(out):
    return [(u, c.tolist()) for u, c in out]


# Two noise batches of one run (seed 0) whose 63-bit SeedSequence seeds of the old scheme agree in their low 32 bits
# (found by a birthday search over images 0..99, both streams, batches 0..399).
COLLIDING = ((32, 1, 181), (99, 1, 310))


def _old_batch_seed(seed, image, stream, batch):
    """The noise seed before noise scheme counter-v2 (kept here to reproduce its collision)."""
    state = np.random.SeedSequence(seed, spawn_key=(image, stream, batch)).generate_state(2, np.uint32)
    return ((int(state[1]) << 32) | int(state[0])) & ((1 << 63) - 1)


def test_old_seeds_collided_on_the_cpu_and_the_new_states_do_not():
    a, b = (_old_batch_seed(0, *c) for c in COLLIDING)
    assert a != b and a & 0xFFFFFFFF == b & 0xFFFFFFFF
    old = [torch.empty(100, *SHAPE).normal_(generator=torch.Generator().manual_seed(s)) for s in (a, b)]
    assert torch.equal(*old), "torch's CPU generator kept 32 bits: two batches drew the same noise"
    new = [draw_noise(0, *c, 100, SHAPE) for c in COLLIDING]
    assert not torch.equal(*new) and not (new[0] == new[1]).any()
    # and the engine draws the new noise: a second run of one batch reproduces it exactly
    torch.testing.assert_close(new[0], draw_noise(0, *COLLIDING[0], 100, SHAPE), rtol=0, atol=0)


def test_cpu_generator_state_layout_is_checked(monkeypatch):
    from cpcluster.core import noise

    noise.check_cpu_layout()
    mine = torch.Generator()
    mine.set_state(noise.cpu_state(noise.mt19937_init_words(77)))
    assert torch.equal(torch.rand(50, generator=mine), torch.rand(50, generator=torch.Generator().manual_seed(77)))
    monkeypatch.setattr(noise, "_WORDS_AT", 32)  # a torch that moved the words: refused, not silently other noise
    monkeypatch.setattr(noise, "_layout_ok", False)
    with pytest.raises(RuntimeError, match="lays out its CPU generator state differently"):
        noise.BatchGenerator(0, "cpu")


class RandomLabels(torch.nn.Module):
    """A stochastic 'purifier + classifier': the label is drawn from the generator it is given."""

    def forward(self, x, generator=None):
        label = torch.randint(3, (x.shape[0],), generator=generator)
        return torch.nn.functional.one_hot(label, 3).float()


def test_a_purifier_that_uses_the_generator_is_detected_and_stays_shard_invariant():
    ids = [0, 1]
    assert needs_generator(RandomLabels(), torch.zeros(1, *SHAPE))
    assert not needs_generator(Threshold(0.5, 0.5, [0.0], 2), torch.zeros(1, *SHAPE))
    declared = Threshold(0.5, 0.5, [0.0], 2)
    declared.uses_generator = True
    assert needs_generator(declared, torch.zeros(1, *SHAPE))
    units = build_units(ids, 20, 100, 40, "certify")
    ref, eng = _run(RandomLabels(), ids, units, batch=20)
    assert eng.per_batch_generator
    merged = []
    for a, b in balanced_ranges(units[:, 3], 4):
        merged += _run(RandomLabels(), ids, units[a:b], batch=100)[0]
    assert _pairs(merged) == _pairs(ref)


def test_real_models_are_shard_invariant_and_bf16_runs():
    from cpcluster.models.purifier_base import SmoothedBase
    from cpcluster.models.purifiers import build_purifier
    from cpcluster.models.specs import load_classifier, load_dataset, load_denoiser

    ds = load_dataset("demo")
    ids = [3, 17]
    x = torch.from_numpy(ds.get(ids)[0])
    model = SmoothedBase(build_purifier("consistency", load_denoiser("demo-random"), 0.5),
                         load_classifier("demo-random")).eval()
    units = build_units(ids, 20, 80, 40, "certify")

    def run(units, **kw):
        eng = CountingEngine(model, x, ids, sigma=0.5, seed=0, block_size=40, draw_batch=20, batch=60,
                             num_classes=10, **kw)
        out = []
        eng.run(units, lambda u, c: out.append((tuple(u.tolist()), c.tolist())))
        return out

    ref = run(units)
    merged = [p for a, b in balanced_ranges(units[:, 3], 3) for p in run(units[a:b])]
    assert merged == ref
    low = run(units, dtype="bfloat16")
    assert [u for u, _ in low] == [u for u, _ in ref] and all(sum(c) == u[3] for u, c in low)


def test_bad_engine_settings():
    with pytest.raises(InputError, match="smaller than --draw-batch"):
        CountingEngine(Recorder(), _images([0]), [0], sigma=1, seed=0, block_size=40, draw_batch=20, batch=10,
                       num_classes=3)
    with pytest.raises(InputError, match="--dtype"):
        CountingEngine(Recorder(), _images([0]), [0], sigma=1, seed=0, block_size=40, draw_batch=20, batch=20,
                       num_classes=3, dtype="int8")


def test_logits_of_the_wrong_width_are_refused():
    """A class index >= C would spill into the next unit's counts in the shared bincount: refuse it."""
    with pytest.raises(ValueError, match="expected \\(B, 2\\)"):
        _run(Threshold(0.5, 0.5, [0.0, 1.0], 3), [0], build_units([0], 0, 20, 20, "predict"), num_classes=2)
