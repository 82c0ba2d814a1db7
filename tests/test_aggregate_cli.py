"""`cpcluster aggregate` through Click: end to end against an independent computation, and every refusal."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from cpcluster.cli import main
from cpcluster.core.shards import encode_shard
from synth import class_probs, make_config, plan_units, simulate_counts, write_shard, write_split

C = 5


def _run(tmp_path, name="run", sigma=0.5, images=20, seed=0, num_files=2, **cfg_extra):
    cfg = make_config(sigma=sigma, n0=10, n=120, block_size=50, num_classes=C, **cfg_extra)
    units = plan_units(cfg, range(images))
    probs = class_probs(images, C, seed=seed, top=(0.45, 0.999))
    labels = np.where(np.arange(images) % 4 == 0, (probs.argmax(1) + 2) % C, probs.argmax(1))
    counts = simulate_counts(units, probs, seed=seed + 1)
    paths = write_split(tmp_path / name, cfg, units, counts, labels, num_files)
    return cfg, units, counts, labels, paths


def _invoke(args):
    return CliRunner().invoke(main, ["aggregate", *map(str, args)])


def test_end_to_end_table_and_summary_match_independent_computation(tmp_path):
    alpha, radii = 0.01, [0.0, 0.25, 0.5, 1.0]
    expected = {}
    for k, sigma in enumerate((0.25, 0.5)):
        cfg, units, counts, labels, _ = _run(tmp_path, f"run-{sigma}", sigma=sigma, seed=10 * k)
        correct, radius = [], []
        for i in range(20):  # Cohen's CERTIFY, one image at a time, statsmodels bound (locuslab/smoothing style)
            sel = counts[(units[:, 0] == i) & (units[:, 1] == 0)].sum(0)
            est = counts[(units[:, 0] == i) & (units[:, 1] == 1)].sum(0)
            c_a = int(np.argmax(sel))
            p = proportion_confint(int(est[c_a]), int(est.sum()), alpha=2 * alpha, method="beta")[0]
            ok = est[c_a] > 0 and p > 0.5
            correct.append(ok and c_a == labels[i])
            radius.append(sigma * sps.norm.ppf(p) if ok else 0.0)
        correct, radius = np.array(correct), np.array(radius)
        expected[sigma] = ([np.mean(correct & (radius >= r)) for r in radii], np.mean(radius * correct))
    out = tmp_path / "agg"
    res = _invoke([str(tmp_path / "run-*" / "*.h5"), "--alpha", alpha, "--radii", "0,0.25,0.5,1", "--out", out])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alpha"] == alpha and summary["radii"] == radii
    for g in summary["groups"]:
        accs, acr = expected[g["sigma"]]
        np.testing.assert_allclose(g["certified_accuracy"], accs, rtol=0, atol=1e-12)
        assert g["acr"] == pytest.approx(acr, rel=1e-9)
        assert g["n"] == 120 and g["n0"] == 10 and g["images_evaluated"] == 20
    best = np.maximum(expected[0.25][0], expected[0.5][0])
    np.testing.assert_allclose(summary["best_over_sigma"][0]["certified_accuracy"], best, atol=1e-12)
    # the printed Markdown table carries the same numbers, in percent with one decimal
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines()[2:]]
    for cells, ref in zip(rows, [expected[0.25][0], expected[0.5][0], best]):
        assert [float(c) for c in cells[3:3 + len(radii)]] == [round(100 * v, 1) for v in ref]
    assert rows[2][1].strip() == "best over sigma"
    assert (out / "table.md").read_text() == res.stdout
    assert sorted(os.listdir(out)) == ["certified_accuracy.png", "consistency-demo-random-sigma0.25.tsv",
                                       "consistency-demo-random-sigma0.5.tsv", "inputs.json", "summary.json",
                                       "table.md"]


def test_formats_directory_input_and_help(tmp_path):
    _run(tmp_path)
    res = _invoke([tmp_path / "run", "--format", "latex", "--no-plot"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("\\begin{tabular}") and "\\toprule" in res.stdout
    files = sorted(os.listdir(tmp_path / "run" / "aggregate"))
    assert "table.tex" in files and "table.md" in files and "certified_accuracy.png" not in files
    res = _invoke([tmp_path / "run", "--format", "csv", "--out", tmp_path / "c"])
    assert res.stdout.splitlines()[0] == "method,sigma,images,r=0,r=0.25,r=0.5,r=0.75,r=1,acr,note"
    help_text = _invoke(["--help"]).stdout
    assert "cpcluster aggregate results/*.h5" in help_text


def test_shell_expanded_glob_in_a_subprocess_imports_no_torch(tmp_path):
    _, _, _, _, paths = _run(tmp_path, num_files=3)
    code = ("import sys; from cpcluster.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'aggregate imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code, "aggregate", *paths], capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    assert "| consistency(demo-random) | 0.5" in proc.stdout


# ------------------------------------------------------------------------------------------------- refusals
def _refused(args, *needles, out=None):
    res = _invoke(list(args) + (["--out", out] if out else []))
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.output and res.exc_info[0] is SystemExit
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    if out is not None:
        assert not os.path.exists(out), "nothing may be written on a refusal"
    return lines[0]


def test_refuses_configs_that_differ_inside_a_group(tmp_path):
    """Same method, sigma and mode but another unit layout: the same draws counted twice, refused."""
    _, _, _, _, a = _run(tmp_path, "a", seed=1)
    cfg = make_config(sigma=0.5, n0=10, n=120, block_size=40, num_classes=C)
    units = plan_units(cfg, range(20))
    probs = class_probs(20, C, seed=2, top=(0.45, 0.999))
    b = write_split(tmp_path / "b", cfg, units, simulate_counts(units, probs, seed=3), probs.argmax(1), 1)
    msg = _refused([*a, *b], a[0], b[0], "'block_size' (50 vs 40)", out=tmp_path / "o")
    assert "different run configurations" in msg


def test_refuses_conflicting_duplicates_and_drops_identical_ones(tmp_path):
    cfg, units, counts, labels, paths = _run(tmp_path)
    twin = str(tmp_path / "twin.h5")
    shutil.copy(paths[0], twin)
    res = _invoke([*paths, twin, "--out", tmp_path / "ok"])
    assert res.exit_code == 0 and "identical duplicate unit(s) dropped" in res.stderr
    first = units[:, 0] < 3
    bad = counts[first].copy()
    bad[0, :2] = bad[0, :2][::-1] if bad[0, 0] != bad[0, 1] else (bad[0, 0] + 1, bad[0, 1] - 1)
    clash = write_shard(str(tmp_path / "clash.h5"), cfg, units[first], bad, labels)
    _refused([*paths, clash], paths[0], clash, "different counts", out=tmp_path / "o")


def _raw(tmp_path, name, cfg, units, counts, image_index, labels):
    url = str(tmp_path / name)
    with open(url, "wb") as fh:
        fh.write(encode_shard(cfg, {"index": 0, "total": 1}, units, counts, image_index, labels, complete=True))
    return url


def test_refuses_damaged_or_invalid_files(tmp_path):
    cfg, units, counts, labels, paths = _run(tmp_path)
    u, c = units[:3], counts[:3].copy()
    images, lab = np.array([0]), labels[:1]
    out = tmp_path / "o"

    truncated = str(tmp_path / "truncated.h5")
    data = open(paths[0], "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    _refused([truncated], truncated, "truncated or corrupt", out=out)
    garbage = str(tmp_path / "garbage.h5")
    open(garbage, "wb").write(b"\x89HDF\r\n\x1a\n" + os.urandom(4000))
    _refused([paths[1], garbage], garbage, "truncated or corrupt", out=out)

    no_counts = str(tmp_path / "no_counts.h5")
    shutil.copy(paths[0], no_counts)
    with h5py.File(no_counts, "a") as f:
        del f["counts"]
    _refused([no_counts], no_counts, "missing dataset 'counts'", out=out)
    no_hash = str(tmp_path / "no_hash.h5")
    shutil.copy(paths[0], no_hash)
    with h5py.File(no_hash, "a") as f:
        del f.attrs["config_hash"]
    _refused([no_hash], no_hash, "attribute 'config_hash'", out=out)

    c_sum = c.copy()
    c_sum[1, 0] += 1
    _refused([_raw(tmp_path, "sum.h5", cfg, u, c_sum, images, lab)], "sum.h5", "sum to", out=out)
    c_neg = c.copy()
    c_neg[2, :2] = [-1, c_neg[2, 0] + c_neg[2, 1] + 1]
    _refused([_raw(tmp_path, "neg.h5", cfg, u, c_neg, images, lab)], "neg.h5", "negative counts", out=out)
    _refused([_raw(tmp_path, "lab.h5", cfg, u, c, images, np.array([C]))], "lab.h5", "labels outside", out=out)
    u_bad = u.copy()
    u_bad[2, 2] = 7  # an estimation block the plan (n=120, block_size=50 -> 3 blocks) does not have
    _refused([_raw(tmp_path, "plan.h5", cfg, u_bad, c, images, lab)], "plan.h5", "no such unit", out=out)
    flipped = _raw(tmp_path, "flip.h5", cfg, u, c, images, (lab + 1) % C)
    _refused([paths[0], flipped], paths[0], "flip.h5", "label", out=out)
    no_key = {k: v for k, v in cfg.items() if k != "block_size"}
    _refused([_raw(tmp_path, "key.h5", no_key, u, c, images, lab)], "key.h5", "'block_size'", out=out)


def test_refuses_bad_paths_and_options(tmp_path):
    _, _, _, _, paths = _run(tmp_path)
    out = tmp_path / "o"
    _refused([str(tmp_path / "nothing-*.h5")], "nothing-*.h5", "matches no file", out=out)
    _refused([str(tmp_path / "absent.h5")], "absent.h5", "no such file", out=out)
    for alpha in ("0", "1", "1.5", "-0.1", "nan", "abc"):
        _refused([*paths, "--alpha", alpha], "--alpha", out=out)
    for radii in ("0,,1", "a,b", "-1", "0,inf", "0.5,0.25", "0,0", ""):
        _refused([*paths, "--radii", radii], "--radii", out=out)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused([*paths, "--out", blocker], "--out", "not a folder")
