"""Merging shards: order/split invariance, duplicates, missing units, grouping, envelope, predict mode."""
import json
import os
import shutil

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from cpcluster.aggregate.pipeline import build_outputs, run_aggregate
from cpcluster.core.config import AggregateOptions
from synth import class_probs, make_config, plan_units, simulate_counts, write_shard, write_split

M, C = 24, 4


def _run_data(sigma, seed, mode="certify", images=M, **cfg):
    cfg = make_config(sigma=sigma, n0=12, n=90, block_size=32, num_classes=C, mode=mode, **cfg)  # 3 blocks
    units = plan_units(cfg, range(images))
    probs = class_probs(images, C, seed=seed, top=(0.4, 0.999))
    labels = np.where(np.arange(images) % 5 == 0, (probs.argmax(1) + 1) % C, probs.argmax(1))  # some wrong
    return cfg, units, simulate_counts(units, probs, seed=seed + 100), labels


def _outputs(paths, **kw):
    _, _, outputs, table, warnings, _ = build_outputs(AggregateOptions(paths=tuple(paths), **kw))
    return outputs, table, warnings


def test_same_units_in_1_4_64_files_any_order_give_identical_bytes(tmp_path):
    runs = [_run_data(0.25, 1), _run_data(0.5, 2), _run_data(0.5, 3, mode="predict", purifier="none")]
    reference = None
    for label, num_files, contiguous, seed in [("one", 1, True, None), ("four", 4, True, 5),
                                              ("sixtyfour", 64, True, 6), ("random64", 64, False, 7)]:
        paths = []
        for k, (cfg, units, counts, labels) in enumerate(runs):
            # 64-file splits skip the journal (one fsync per unit); the HDF5 bytes are what ShardWriter writes
            paths += write_split(tmp_path / label / f"run{k}", cfg, units, counts, labels, num_files,
                                 seed=seed, contiguous=contiguous, fast=num_files > 4)
        if seed is not None:
            paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
        outputs, _, warnings = _outputs(paths, radii=(0.0, 0.1, 0.3))
        assert not warnings
        outputs = {k: v for k, v in outputs.items() if k != "inputs.json"}  # lists the input files by design
        if reference is None:
            reference = outputs
            assert sorted(outputs) == ["certified_accuracy.png", "consistency-demo-random-sigma0.25.tsv",
                                       "consistency-demo-random-sigma0.5.tsv", "none-sigma0.5-predict.tsv",
                                       "summary.json", "table.md"]
        else:
            assert outputs.keys() == reference.keys()
            for name in outputs:
                assert outputs[name] == reference[name], f"{name} differs for the {label} split"


def _independent_certify(cfg, units, counts, labels, alpha):
    """Per image, in plain Python: c_A from the selection unit, k from the summed estimation blocks, statsmodels."""
    out = {}
    for i in np.unique(units[:, 0]):
        sel = counts[(units[:, 0] == i) & (units[:, 1] == 0)].sum(axis=0)
        est = counts[(units[:, 0] == i) & (units[:, 1] == 1)].sum(axis=0)
        c_a = int(np.argmax(sel))
        n = int(est.sum())
        low = proportion_confint(int(est[c_a]), n, alpha=2 * alpha, method="beta")[0] if est[c_a] else 0.0
        pred = c_a if low > 0.5 and sel.sum() else -1
        radius = cfg["sigma"] * sps.norm.ppf(low) if pred >= 0 else 0.0
        out[int(i)] = (int(labels[i]), pred, radius, int(sel.sum()), n)
    return out


def _read_tsv(data: bytes):
    lines = data.decode().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "n0", "n"]
    return {int(r[0]): (int(r[1]), int(r[2]), float(r[3]), int(r[4]), int(r[5]), int(r[6]))
            for r in (line.split("\t") for line in lines[1:])}


def test_missing_units_excluded_by_default_and_certified_with_allow_partial(tmp_path):
    cfg, units, counts, labels = _run_data(0.5, 11)
    drop = ((units[:, 0] == 3) & (units[:, 1] == 1) & (units[:, 2] == 1)) | \
           ((units[:, 0] == 5) & (units[:, 1] == 0)) | ((units[:, 0] == 8) & (units[:, 1] == 1))
    keep_u, keep_c = units[~drop], counts[~drop]
    paths = write_split(tmp_path / "run", cfg, keep_u, keep_c, labels, 3, seed=1)
    outputs, _, warnings = _outputs(paths)
    summary = json.loads(outputs["summary.json"])
    g = summary["groups"][0]
    assert g["images_missing"] == [3, 5, 8] and g["images_evaluated"] == M - 3 and g["images_partial"] == []
    assert any("3 image(s) with missing units excluded (index 3, 5, 8)" in w for w in warnings)
    rows = _read_tsv(outputs["consistency-demo-random-sigma0.5.tsv"])
    assert sorted(rows) == sorted(set(range(M)) - {3, 5, 8})

    outputs, _, warnings = _outputs(paths, allow_partial=True)
    g = json.loads(outputs["summary.json"])["groups"][0]
    assert g["images_missing"] == [] and g["images_partial"] == [3, 5, 8] and g["images_evaluated"] == M
    rows = _read_tsv(outputs["consistency-demo-random-sigma0.5.tsv"])
    ref = _independent_certify(cfg, keep_u, keep_c, labels, 0.001)
    assert (rows[3][4], rows[3][5]) == (12, 90 - 32)  # n per image reported: one block of 32 missing
    assert (rows[5][4], rows[5][5]) == (0, 90) and rows[5][1] == -1  # no selection draws: abstain
    assert (rows[8][4], rows[8][5]) == (12, 0) and rows[8][1] == -1  # no estimation draws: abstain
    for i, (label, pred, radius, n0, n) in ref.items():
        got = rows[i]
        assert (got[0], got[1], got[4], got[5]) == (label, pred, n0, n)
        assert got[2] == pytest.approx(radius, abs=5e-7)
        assert got[3] == int(pred == label and pred >= 0)


def test_identical_duplicates_dropped_with_warning_same_result(tmp_path):
    cfg, units, counts, labels = _run_data(0.25, 21)
    paths = write_split(tmp_path / "run", cfg, units, counts, labels, 4)
    copy = str(tmp_path / "copy-of-shard-1.h5")
    shutil.copy(paths[1], copy)
    base, _, _ = _outputs(paths)
    dup, _, warnings = _outputs(paths + [copy])
    assert dup["summary.json"] == base["summary.json"]
    assert dup["consistency-demo-random-sigma0.25.tsv"] == base["consistency-demo-random-sigma0.25.tsv"]
    (w,) = warnings
    assert "copy-of-shard-1.h5" in w and os.path.basename(paths[1]) in w and "identical duplicate" in w


def test_groups_envelope_and_method_names(tmp_path):
    paths = []
    for k, (sigma, pur) in enumerate([(0.25, "consistency"), (0.5, "consistency"), (1.0, "consistency"),
                                      (0.5, "none")]):
        cfg, units, counts, labels = _run_data(sigma, 30 + k, purifier=pur)
        paths += write_split(tmp_path / f"r{k}", cfg, units, counts, labels, 2)
    radii = (0.0, 0.2, 0.4, 0.8)
    res = run_aggregate(AggregateOptions(paths=(str(tmp_path / "r*"),), radii=radii))
    assert res.out == str(tmp_path / "aggregate")
    methods = [(r.group.plan.method, r.group.plan.sigma) for r in res.results]
    assert methods == [("consistency(demo-random)", 0.25), ("consistency(demo-random)", 0.5),
                       ("consistency(demo-random)", 1.0), ("none", 0.5)]
    (env_c, env_n) = res.envelopes
    table = np.stack([r.certified_accuracy for r in res.results[:3]])
    np.testing.assert_array_equal(env_c.certified_accuracy, table.max(axis=0))
    assert list(env_c.best_sigma) == [(0.25, 0.5, 1.0)[j] for j in table.argmax(axis=0)]
    assert env_n.sigmas == (0.5,)
    lines = [line for line in res.table.splitlines() if line.startswith("|")]
    assert sum("best over sigma" in line for line in lines) == 1  # only methods with 2+ sigmas get the row
    best = next(line for line in lines if "best over sigma" in line).split("|")[4:8]
    assert [float(c) for c in best] == [round(100 * v, 1) for v in env_c.certified_accuracy]
    summary = json.load(open(tmp_path / "aggregate" / "summary.json"))
    assert [b["method"] for b in summary["best_over_sigma"]] == ["consistency(demo-random)", "none"]
    assert os.path.getsize(tmp_path / "aggregate" / "certified_accuracy.png") > 1000
    _best_row_says_what_it_is(res, tmp_path, radii)


def _best_row_says_what_it_is(res, tmp_path, radii):
    """The best-over-sigma row is a per-radius maximum over different classifiers: said wherever it is shown."""
    from cpcluster.aggregate.plot import figure
    from cpcluster.aggregate.report import table_text

    said = "per-radius maximum over different smoothed classifiers"
    assert res.table.splitlines()[-1].startswith("Note: best over sigma:") and said in res.table
    assert said in table_text(res.results, res.envelopes, radii, "latex").splitlines()[-1]
    csv = table_text(res.results, res.envelopes, radii, "csv").splitlines()
    assert csv[0].endswith(",acr,note")
    assert [line.split(",")[1] for line in csv if said in line] == ["best over sigma"]
    summary = json.load(open(tmp_path / "aggregate" / "summary.json"))
    assert all(said in b["note"] for b in summary["best_over_sigma"])
    legends = [t.get_text() for ax in figure(res.results, res.envelopes, radii).axes for t in ax.get_legend().texts]
    assert sum("per-radius max" in t and "different smoothed classifiers" in t for t in legends) == 1


def test_one_method_across_sigmas_although_sigma_dependent_parameters_differ(tmp_path):
    """t_sigma (and the other purifier values derived from sigma) differ per sigma: still one method, one envelope."""
    paths = []
    for k, (sigma, t) in enumerate([(0.25, 0.5853), (0.5, 1.0882), (1.0, 1.9233)]):
        cfg, units, counts, labels = _run_data(sigma, 80 + k)
        cfg["purifier"]["t_sigma"] = t
        paths += write_split(tmp_path / f"s{k}", cfg, units, counts, labels, 2)
    res = run_aggregate(AggregateOptions(paths=(str(tmp_path / "s*"),), radii=(0.0, 0.5)))
    assert {r.group.plan.method for r in res.results} == {"consistency(demo-random)"}
    assert len({r.group.plan.method_id for r in res.results}) == 1
    (env,) = res.envelopes
    assert env.sigmas == (0.25, 0.5, 1.0)


def test_runs_that_differ_in_what_defines_the_smoothed_classifier_are_separate_methods(tmp_path):
    """Other classifier, seed or n: separate rows and envelopes, labels told apart only where they would clash."""
    other = {"classifier": {"spec": "resnet-b", "sha256": "2" * 64}}
    runs = [("a", 0.25, {}), ("b", 0.5, {}), ("c", 0.25, other), ("d", 0.5, other), ("e", 0.5, {"seed": 7}),
            ("f", 0.5, {"purifier": "none"})]
    for k, (name, sigma, extra) in enumerate(runs):
        cfg, units, counts, labels = _run_data(sigma, 90 + k, **{k: v for k, v in extra.items() if k != "seed"})
        cfg["seed"] = extra.get("seed", 0)
        write_split(tmp_path / name, cfg, units, counts, labels, 1)
    res = run_aggregate(AggregateOptions(paths=(str(tmp_path / "?"),), radii=(0.0, 0.5)))
    rows = [(r.group.plan.method, r.group.plan.sigma) for r in res.results]
    base = "consistency(demo-random)"
    a, b, c = (f"{base} [classifier={clf}, seed={seed}]" for clf, seed in
               (("demo-random", 0), ("demo-random", 7), ("resnet-b", 0)))
    assert rows == [(a, 0.25), (a, 0.5), (b, 0.5), (c, 0.25), (c, 0.5), ("none", 0.5)]
    by = {(r.group.plan.method, r.group.plan.sigma): r.certified_accuracy for r in res.results}
    envs = {e.method: e for e in res.envelopes}
    for label in (f"{base} [classifier=demo-random, seed=0]", f"{base} [classifier=resnet-b, seed=0]"):
        np.testing.assert_array_equal(envs[label].certified_accuracy,
                                      np.maximum(by[(label, 0.25)], by[(label, 0.5)]))  # its own sigmas only
    assert envs[f"{base} [classifier=demo-random, seed=7]"].sigmas == (0.5,)
    assert len({r.group.plan.method_id for r in res.results}) == 4


def test_shards_of_the_old_noise_scheme_never_mix_with_new_ones(tmp_path):
    old, units, counts, labels = _run_data(0.5, 95)
    del old["noise"]
    write_split(tmp_path / "old", old, units, counts, labels, 1)
    new, units, counts, labels = _run_data(0.5, 96)
    write_split(tmp_path / "new", new, units, counts, labels, 1)
    res = run_aggregate(AggregateOptions(paths=(str(tmp_path / "old"), str(tmp_path / "new"))))
    assert [r.group.plan.method for r in res.results] == ["consistency(demo-random) [noise=(absent)]",
                                                          "consistency(demo-random) [noise=counter-v2]"]
    (w,) = res.warnings
    assert "[noise=(absent)] sigma 0.5: made before noise scheme counter-v2" in w


def test_method_labels_stay_distinct_and_short():
    from cpcluster.aggregate.identity import identity, identity_hash, method_labels

    long_a = make_config(0.5, dataset={"spec": "folder:/data/" + "x" * 60 + "/a"})
    long_b = make_config(0.5, dataset={"spec": "folder:/data/" + "x" * 60 + "/b"})
    other = make_config(0.5, n=128)
    methods = {identity_hash(c): ("consistency(demo-random)", identity(c)) for c in (long_a, long_b, other)}
    labels = method_labels(methods)
    assert len(set(labels.values())) == 3
    assert labels[identity_hash(other)] == "consistency(demo-random) [dataset=(absent), n=128]"
    for cfg in (long_a, long_b):  # the truncated specs coincide: the identity hash tells them apart
        assert f"#{identity_hash(cfg)[:8]}]" in labels[identity_hash(cfg)]
        assert len(labels[identity_hash(cfg)]) < 90
    assert method_labels({identity_hash(other): ("none", identity(other))}) == {identity_hash(other): "none"}
    # sigma, block size and early stopping are no part of the identity; n, seed, dtype and noise are
    assert identity_hash(make_config(0.25, block_size=64)) == identity_hash(make_config(1.0, early_stop={"a": 1}))
    for change in ({"n": 65}, {"seed": 1}, {"dtype": "bfloat16"}, {"noise": "v2"}, {"draw_batch": 8}):
        assert identity_hash(make_config(0.5, **change)) != identity_hash(make_config(0.5))


def test_predict_mode_group_matches_binomtest(tmp_path):
    cfg, units, counts, labels = _run_data(0.5, 41, mode="predict")
    assert (units[:, 1] == 1).all()
    paths = write_split(tmp_path / "p", cfg, units, counts, labels, 2)
    cfg_c, units_c, counts_c, labels_c = _run_data(0.5, 42)  # a CERTIFY run of the same method and sigma
    paths += write_split(tmp_path / "c", cfg_c, units_c, counts_c, labels_c, 1)
    outputs, table, _ = _outputs(paths, alpha=0.01, radii=(0.0, 0.5))
    assert "consistency-demo-random-sigma0.5.tsv" in outputs  # two rows, not a configuration conflict
    rows = _read_tsv(outputs["consistency-demo-random-sigma0.5-predict.tsv"])
    correct = 0
    for i in range(M):
        est = counts[units[:, 0] == i].sum(axis=0)
        top = np.sort(est)[::-1]
        pred = int(np.argmax(est)) if sps.binomtest(int(top[0]), int(top[:2].sum()), 0.5).pvalue <= 0.01 else -1
        assert rows[i][1] == pred and rows[i][2] == 0.0 and rows[i][5] == 90
        correct += pred == labels[i]
    g = json.loads(outputs["summary.json"])["groups"][1]
    assert g["mode"] == "predict" and g["certified_accuracy"] == [correct / M, None] and g["acr"] is None
    best = json.loads(outputs["summary.json"])["best_over_sigma"]
    assert len(best) == 1 and best[0]["sigmas"] == [0.5]  # PREDICT rows certify nothing: not in the envelope
    assert "0.5 (predict)" in table and "| -" in table.replace("  ", "")


def test_incomplete_file_units_count_as_missing(tmp_path):
    cfg, units, counts, labels = _run_data(0.5, 51)
    first = units[:, 0] < 12
    a = write_shard(str(tmp_path / "shard-00000-of-00002.h5"), cfg, units[first], counts[first], labels,
                    index=0, total=2)
    rest = ~first & ~((units[:, 0] == 20) & (units[:, 2] == 2))  # the unfinished file lacks one block
    b = write_shard(str(tmp_path / "shard-00001-of-00002.h5"), cfg, units[rest], counts[rest], labels,
                    index=1, total=2, complete=False)
    outputs, _, warnings = _outputs([a, b])
    assert json.loads(outputs["summary.json"])["groups"][0]["images_missing"] == [20]
    assert any("marked incomplete" in w and b in w for w in warnings)
    # and a shard file that never arrived is reported by index
    outputs, _, warnings = _outputs([a])
    assert json.loads(outputs["summary.json"])["groups"][0]["missing_shards"] == [1]
    assert any("1 shard file(s) absent (index 1)" in w for w in warnings)


def test_images_held_only_by_an_absent_shard_file_are_named_from_the_plan(tmp_path):
    """Shard 1 of 3 never arrived: the images it alone held come from the plan the shards' config describes."""
    from cpcluster.sharding.plan import plan_from_config

    cfg = make_config(0.5, n0=12, n=90, block_size=32, num_classes=C, dataset={"spec": "demo", "size": 50},
                      subset={"skip": 3, "max_images": 11, "indices": None})
    plan = plan_from_config(cfg, 3)
    assert plan.images.tolist() == list(range(0, 33, 3))
    probs = class_probs(50, C, seed=3)
    counts = simulate_counts(plan.units, probs, seed=4)
    labels = probs.argmax(1)
    paths = [write_shard(str(tmp_path / f"shard-{k:05d}-of-00003.h5"), cfg, plan.shard_units(k),
                         counts[slice(*plan.ranges[k])], labels, index=k, total=3) for k in (0, 2)]
    outputs, _, warnings = _outputs(paths)
    group = json.loads(outputs["summary.json"])["groups"][0]
    alone = sorted(set(plan.shard_images(1).tolist()) - set(plan.shard_images(0).tolist())
                   - set(plan.shard_images(2).tolist()))
    shared = sorted(set(plan.shard_images(1).tolist()) - set(alone))  # split with a present shard: incomplete
    assert alone and shared and group["missing_shards"] == [1]
    assert group["images_missing"] == sorted(alone + shared)
    assert group["images_evaluated"] == 11 - len(alone) - len(shared)
    (w,) = [w for w in warnings if "absent" in w]
    assert f"they alone held {len(alone)} image(s) (index {', '.join(map(str, alone))})" in w
    # a config without the plan's keys: said so, nothing named
    bare = make_config(0.5, n0=12, n=90, block_size=32, num_classes=C)
    lone = write_shard(str(tmp_path / "b" / "shard-00000-of-00002.h5"), bare, plan.shard_units(0),
                       counts[slice(*plan.ranges[0])], labels, index=0, total=2)
    _, _, warnings = _outputs([lone])
    assert any("cannot be named: the run config lacks the plan" in w for w in warnings)


def test_memory_filesystem_inputs_and_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("CPCLUSTER_SCRATCH", str(tmp_path))
    cfg, units, counts, labels = _run_data(0.5, 61)
    write_shard("memory://agg-test/run/shard-00000-of-00001.h5", cfg, units, counts, labels)
    res = run_aggregate(AggregateOptions(paths=("memory://agg-test/run/*.h5",)))
    assert res.out == "memory:///agg-test/run/aggregate"
    import fsspec
    fs = fsspec.filesystem("memory")
    assert json.loads(fs.cat("/agg-test/run/aggregate/summary.json"))["groups"][0]["images_evaluated"] == M


def test_group_with_no_complete_image_and_unlike_image_sets(tmp_path):
    cfg_a, units_a, counts_a, labels = _run_data(0.25, 71)
    cfg_b, units_b, counts_b, _ = _run_data(0.5, 72)
    sel = units_a[:, 1] == 0  # sigma 0.25 lost every selection unit
    paths = write_split(tmp_path / "a", cfg_a, units_a[~sel], counts_a[~sel], labels, 2)
    keep = units_b[:, 0] != 0
    paths += write_split(tmp_path / "b", cfg_b, units_b[keep], counts_b[keep], labels, 2)
    outputs, table, warnings = _outputs(paths, radii=(0.0, 0.25))
    s = json.loads(outputs["summary.json"])
    g = s["groups"][0]
    assert g["images_evaluated"] == 0 and g["certified_accuracy"] == [None, None] and g["acr"] is None
    assert g["images_missing"] == list(range(M))
    assert s["best_over_sigma"][0]["certified_accuracy"] == s["groups"][1]["certified_accuracy"]
    assert s["best_over_sigma"][0]["best_sigma"] == [0.5, 0.5]
    assert any("different image sets" in w for w in warnings)
    assert outputs["consistency-demo-random-sigma0.25.tsv"].decode().count("\n") == 1  # header only
