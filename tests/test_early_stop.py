"""Early stopping (certify --early-stop): the rules, the plan, exactness against a full run on demo models,
sharding invariance, resume after a crash, and what aggregate accepts and refuses."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from cpcluster.core import runs
from cpcluster.orchestrate import rundir
from cpcluster.aggregate.pipeline import run_aggregate
from cpcluster.aggregate.skipping import ABSTAIN_CERTAIN, WRONG_CLASS, abstain_certain, image_step
from cpcluster.core.config import AggregateOptions, CertifyConfig
from cpcluster.core.shard_writer import ShardWriter
from cpcluster.core.shards import encode_shard, read_shard
from cpcluster.jobs.certify import CertifyShardJob
from cpcluster.sharding.plan import make_plan
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import write_bytes_atomic

MAX_ALPHA = 0.01
N, BLOCK = 600, 100


def _futile(k, m, n, alpha):
    """Independent form of the rule: the Clopper-Pearson lower bound with every remaining draw a hit."""
    hits = k + n - m
    return hits == 0 or sps.beta.ppf(alpha, hits, n - hits + 1) <= 0.5


def _sequential(c_a, label, blocks, n, alpha):
    """The block-by-block rule on an image's full counts: (blocks counted, blocks skipped with their reason)."""
    if c_a != label:
        return [], [(b, WRONG_CLASS) for b in range(len(blocks))]
    k = m = 0
    for b, row in enumerate(blocks):
        if _futile(k, m, n, alpha):
            return list(range(b)), [(c, ABSTAIN_CERTAIN) for c in range(b, len(blocks))]
        k, m = k + int(row[c_a]), m + int(row.sum())
    return list(range(len(blocks))), []


def _by_steps(selection, label, blocks, n, alpha):
    """Drive image_step as the job does, feeding the full counts of the blocks it asks for."""
    recorded, rounds = {}, 0
    while True:
        step = image_step(selection, label, [int(r.sum()) for r in blocks], recorded, n, alpha)
        if step.done:
            return sorted(recorded), list(step.skipped), rounds
        assert step.run and not step.skipped
        recorded.update({b: blocks[b] for b in step.run})
        rounds += 1


@settings(max_examples=60, deadline=None)
@given(p=st.floats(0.2, 0.9), label=st.integers(0, 2), seed=st.integers(0, 10**6), nb=st.integers(1, 12),
       alpha=st.sampled_from([0.001, 0.01, 0.05]))
def test_scheduling_ahead_counts_exactly_the_blocks_of_the_block_by_block_rule(p, label, seed, nb, alpha):
    rng = np.random.default_rng(seed)
    probs = np.array([p, (1 - p) * 0.7, (1 - p) * 0.3])
    selection = rng.multinomial(20, probs)
    blocks = [rng.multinomial(50, probs) for _ in range(nb)]
    n = 50 * nb
    counted, skipped, rounds = _by_steps(selection, label, blocks, n, alpha)
    assert (counted, skipped) == tuple(_sequential(int(np.argmax(selection)), label, blocks, n, alpha))
    assert rounds <= nb


def test_abstention_rule_is_monotone_and_matches_the_bound():
    k, m = np.meshgrid(np.arange(0, 301, 7), np.arange(0, 301, 10))
    k = np.minimum(k, m)
    got = abstain_certain(k, m, 300, 0.01)
    want = np.vectorize(lambda a, b: _futile(a, b, 300, 0.01))(k, m)
    np.testing.assert_array_equal(got, want)
    assert not abstain_certain(0, 0, 300, 0.01)  # nothing known: never certain
    assert abstain_certain(0, 300, 300, 0.01) and abstain_certain(0, 160, 300, 0.01)
    assert abstain_certain(10, 200, 300, 0.001) <= abstain_certain(10, 200, 300, 0.05)  # larger alpha: stops later


def test_a_round_counts_the_units_that_fill_whole_forwards():
    from cpcluster.jobs.early_stop import full_forwards_prefix

    units = np.array([[0, 0, 0, 100]] + [[0, 1, b, 100] for b in range(5)], dtype=np.int64)
    assert full_forwards_prefix(units, 100, 100, 400) == 4
    assert full_forwards_prefix(units[:3], 100, 100, 400) == 0
    assert full_forwards_prefix(units, 100, 100, 200) == 6
    # noise batches of 300 leave 100 rows of every forward of 400 empty: no prefix ends on a full forward
    odd = np.array([[0, 1, b, 300] for b in range(4)], dtype=np.int64)
    assert full_forwards_prefix(odd, 300, 300, 400) == 0


def test_interleaved_plan_gives_every_shard_whole_images_in_a_stride():
    images = np.arange(0, 110, 10)
    plan = make_plan(images, 100, 1000, 100, 4, "certify", "interleaved")
    for k in range(4):
        assert plan.shard_images(k).tolist() == images[k::4].tolist()
        units = plan.shard_units(k)
        assert len(units) == 11 * len(images[k::4])  # selection + 10 blocks of each of its images
    assert np.ptp(plan.shard_draws()) <= 1100  # at most one image apart
    with pytest.raises(InputError, match="every shard holds whole images; use 1 to 11 shards"):
        make_plan(images, 100, 1000, 100, 12, "certify", "interleaved")


# --------------------------------------------------------------------------------------------- on demo models
def _config(run_dir, early_stop=None, shards=1, **kw):
    base = dict(sigma=0.5, run_dir=str(run_dir), num_shards=shards, n0=100, n=N, block_size=BLOCK, draw_batch=100,
                batch=400, skip=16, purifier="none", classifier="demo", dataset="demo", threads=1,
                early_stop=early_stop, device="cpu")
    return CertifyConfig(**{**base, **kw})


def _certify(cfg):
    run = runs.resolve(cfg, runs.load_models(cfg))
    rundir.prepare_run_dir(run)
    return [read_shard(CertifyShardJob(cfg, k)()) for k in range(run.plan.num_shards)], run


def _table(shards):
    units = np.concatenate([s.units for s in shards])
    counts = np.concatenate([s.counts for s in shards])
    skipped = np.concatenate([s.skipped for s in shards])
    order = np.lexsort(units[:, ::-1].T)
    return units[order], counts[order], skipped[np.lexsort(skipped[:, ::-1].T)]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    full, run = _certify(_config(root / "full", shards=2))
    early, _ = _certify(_config(root / "early", MAX_ALPHA, shards=3))
    return root, full, early, run


def test_early_stop_gives_the_full_runs_table_and_reports_the_draws_it_saved(demo_runs):
    root, full, early, run = demo_runs
    labels = dict(zip(run.image_ids.tolist(), run.labels.tolist()))
    # the draws saved, counted from the full run's files with the block-by-block rule
    units, counts, _ = _table(full)
    saved, wrong, cut = 0, 0, 0
    for image in run.image_ids.tolist():
        mine = units[:, 0] == image
        selection = counts[mine & (units[:, 1] == 0)][0]
        blocks = counts[mine & (units[:, 1] == 1)]
        counted, skipped = _sequential(int(np.argmax(selection)), labels[image], blocks, N, MAX_ALPHA)
        saved += BLOCK * len(skipped)
        wrong += bool(skipped) and skipped[0][1] == WRONG_CLASS
        cut += bool(skipped) and skipped[0][1] == ABSTAIN_CERTAIN
    assert wrong >= 3 and cut >= 1, "the demo setting exercises both rules"
    # the early run counted exactly the full run's counts for every unit it counted
    e_units, e_counts, e_skipped = _table(early)
    full_rows = {tuple(u): c.tolist() for u, c in zip(units.tolist(), counts)}
    assert all(full_rows[tuple(u)] == c.tolist() for u, c in zip(e_units.tolist(), e_counts))
    assert int(e_skipped[:, 3].sum()) == saved and len(e_units) + len(e_skipped) == len(units)
    radii = tuple(np.round(np.linspace(0, 1.5, 31), 3))
    for alpha in (MAX_ALPHA, 0.001):
        res_f = run_aggregate(AggregateOptions(paths=(str(root / "full"),), alpha=alpha, radii=radii,
                                               out=str(root / f"af{alpha}"), plot=False))
        res_e = run_aggregate(AggregateOptions(paths=(str(root / "early"),), alpha=alpha, radii=radii,
                                               out=str(root / f"ae{alpha}"), plot=False))
        (f,), (e,) = res_f.results, res_e.results
        np.testing.assert_array_equal(e.certified_accuracy, f.certified_accuracy)
        assert e.acr == f.acr
        np.testing.assert_array_equal(e.idx, f.idx)
        certified = (f.predict == f.label)
        np.testing.assert_array_equal(e.predict[certified], f.predict[certified])
        np.testing.assert_array_equal(e.radius[certified], f.radius[certified])
        assert (f.predict[e.skip != 0] != f.label[e.skip != 0]).all()
        summary = json.load(open(root / f"ae{alpha}" / "summary.json"))["groups"][0]["early_stop"]
        assert summary == {"max_alpha": MAX_ALPHA, "images_wrong_class": wrong, "images_cut_short": cut,
                           "draws_counted": len(run.image_ids) * (100 + N) - saved, "draws_saved": saved,
                           "draws_planned": len(run.image_ids) * (100 + N)}
        assert f"{saved:,} of {len(run.image_ids) * (100 + N):,} planned draws" in res_e.table
        tsv = (root / f"ae{alpha}" / "none-sigma0.5.tsv").read_text().splitlines()
        assert tsv[0].endswith("\tn\tskip") and sum(line.endswith("\twrong-class") for line in tsv) == wrong
    with pytest.raises(InputError, match="--early-stop 0.01, whose skipped draws are exact only for alpha <= 0.01"):
        run_aggregate(AggregateOptions(paths=(str(root / "early"),), alpha=0.02, out=str(root / "no")))


def test_early_stop_is_shard_invariant_and_resumes_after_a_crash(demo_runs, tmp_path, monkeypatch):
    from cpcluster.jobs import certify

    _, _, early, _ = demo_runs
    rounds, count = [], certify._Counter.count
    monkeypatch.setattr(certify._Counter, "count", lambda self, units: (rounds.append(int(units[:, 3].sum())),
                                                                         count(self, units)))
    one, _ = _certify(_config(tmp_path / "one", MAX_ALPHA, shards=1))
    monkeypatch.setattr(certify._Counter, "count", count)
    for a, b in zip(_table(one), _table(early)):
        np.testing.assert_array_equal(a, b)
    # a round counts whole forwards of 400 draws; only rounds with less work than one forward are padded
    assert all(r % 400 == 0 for r in rounds if r >= 400) and len(rounds) >= 3
    assert one[0].shard["padded_draws"] == sum(-r % 400 for r in rounds)
    # killed after 7 and after 45 recorded units (inside the selection round of 32 images, inside an estimation round)
    append = ShardWriter.append
    for kill_at in (7, 45):
        calls = [0]

        def dying(self, unit, counts, seconds=float("nan")):
            if calls[0] == kill_at:
                raise KeyboardInterrupt("killed")
            calls[0] += 1
            append(self, unit, counts, seconds)

        cfg = _config(tmp_path / f"k{kill_at}", MAX_ALPHA, shards=1)
        monkeypatch.setattr(ShardWriter, "append", dying)
        with pytest.raises(KeyboardInterrupt):
            _certify(cfg)
        monkeypatch.setattr(ShardWriter, "append", append)
        resumed = [read_shard(CertifyShardJob(cfg, 0)())]
        assert resumed[0].shard["resumed_units"] == kill_at
        for a, b in zip(_table(resumed), _table(one)):
            np.testing.assert_array_equal(a, b)


def test_aggregate_refuses_skips_the_counts_do_not_justify(demo_runs, tmp_path):
    root, full, early, _ = demo_runs
    s = early[0]
    kept = s.skipped[s.skipped[:, 4] == ABSTAIN_CERTAIN]
    wrong = s.skipped[s.skipped[:, 4] == WRONG_CLASS]
    image = int(wrong[0, 0])
    # claim that a wrong-class image was cut short instead
    forged = np.concatenate([kept, np.c_[wrong[:, :4], np.full(len(wrong), ABSTAIN_CERTAIN)]])
    bad = str(tmp_path / "forged" / "shard-00000-of-00003.h5")
    write_bytes_atomic(bad, encode_shard(s.config, s.shard, s.units, s.counts, s.image_index, s.labels,
                                         complete=True, skipped=forged))
    with pytest.raises(InputError, match=f"image {image} skipped units as 'abstain-certain', which its counts"):
        run_aggregate(AggregateOptions(paths=(bad, early[1].path, early[2].path), alpha=0.01,
                                       out=str(tmp_path / "o")))
    # skips in a run without early stopping
    f = full[0]
    last = len(f.units) - 1  # an estimation block
    sneaky = str(tmp_path / "sneaky" / "shard-00000-of-00002.h5")
    write_bytes_atomic(sneaky, encode_shard(f.config, f.shard, f.units[:last], f.counts[:last], f.image_index,
                                            f.labels, complete=True, skipped=np.r_[f.units[last], 2][None]))
    with pytest.raises(InputError, match="skips units, but its run config has no early_stop"):
        run_aggregate(AggregateOptions(paths=(sneaky, full[1].path), out=str(tmp_path / "o2")))


def test_dry_run_estimates_the_saving_from_recorded_selection_counts_or_says_it_cannot(demo_runs):
    from click.testing import CliRunner

    from cpcluster.cli import main

    root, _, early, _ = demo_runs
    wrong = sum(int((s.skipped[:, 4] == WRONG_CLASS).sum()) for s in early) // (N // BLOCK)
    args = ["certify", "--purifier", "none", "--classifier", "demo", "--dataset", "demo", "--skip", "16", "--sigma",
            "0.5", "--n0", "100", "--n", str(N), "--block-size", str(BLOCK), "--draw-batch", "100", "--batch", "400",
            "--shards", "3", "--device", "cpu", "--early-stop", str(MAX_ALPHA), "--executor", "local", "--out",
            str(root), "--dry-run"]
    res = CliRunner().invoke(main, args + ["--name", "early"])
    assert res.exit_code == 0, res.output
    line = next(line for line in res.output.splitlines() if "early stopping:" in line)
    assert f"{wrong} of the 32 images with selection counts pick a wrong class" in line
    saved = sum(int(s.skipped[:, 3].sum()) for s in early) / (32 * (100 + N))
    estimate = float(line.split("estimated saving ")[1].split("%")[0]) / 100
    assert wrong * N / (32 * (100 + N)) <= estimate + 0.005 and abs(estimate - saved) < 0.1
    res = CliRunner().invoke(main, args + ["--name", "fresh"])
    assert res.exit_code == 0 and "the saving cannot be estimated yet" in res.output
    assert not (root / "fresh").exists()


def test_status_counts_skipped_units_as_done(demo_runs):
    from click.testing import CliRunner

    from cpcluster.cli import main

    root, _, early, _ = demo_runs
    res = CliRunner().invoke(main, ["status", str(root / "early"), "--no-slurm"])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3 and all(r[1] == "complete" and r[2].split("/")[0] == r[2].split("/")[1] for r in rows)
    for row, s in zip(rows, early):
        assert f"{int(s.skipped[:, 3].sum()):,} draws skipped by early stopping" in " ".join(row)
