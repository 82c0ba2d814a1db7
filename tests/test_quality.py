"""Purification quality as sharded jobs (``cpcluster quality``) and their aggregation (``cpcluster quality-report``).

The aggregation is tested on shard files written here in the real format (random features and images); the jobs
end to end through the CLI on the demo data, with a random-weight Inception and a random LPIPS trunk.
"""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_finetune_cli import assert_one_line_error

from cpcluster.aggregate.quality import fid, transport_w2
from cpcluster.aggregate.quality_io import shard_bytes, shard_name
from cpcluster.cli import main

torch.set_num_threads(1)
DATASET = {"name": "digits", "spec": "demo", "fingerprint": "f" * 64, "shape": [1, 4, 4]}


def write_run(folder, kind, sigma, images, features, *, total=1, skip=(), dataset=DATASET, pred=None):
    """A run of ``total`` shards (``skip``: indices not written) in the real quality shard format."""
    n = len(images)
    config = {"purifier": {"kind": kind}, "denoiser": None if kind in ("clean", "none") else {"spec": "demo"},
              "sigma": sigma, "dataset": dataset, "inception": {"weights": "random"}}
    digest = f"{kind}-{sigma}-{dataset['spec']}"
    folder.mkdir(parents=True, exist_ok=True)
    for k, ids in enumerate(np.array_split(np.arange(n), total)):
        if k in skip:
            continue
        arrays = {"image_index": ids * 2, "labels": ids % 3, "features": features[ids], "images": images[ids],
                  "lpips": np.full(len(ids), 0.1), "l2": np.full(len(ids), 0.2),
                  "pred": (ids % 3 if pred is None else pred[ids])}
        (folder / shard_name(k, total)).write_bytes(shard_bytes(arrays, config, digest, {"index": k, "total": total}))


RNG = np.random.default_rng(0)
CLEAN = RNG.random((10, 1, 4, 4)).astype(np.float16)
CLEAN_F = RNG.normal(size=(10, 8)).astype(np.float32)


def report(*paths, out):
    result = CliRunner().invoke(main, ["quality-report", *map(str, paths), "--out", str(out)])
    return result.exit_code, result.output


def test_report_rows_tables_and_plots(tmp_path):
    noisy = np.clip(CLEAN + 0.3 * RNG.normal(size=CLEAN.shape), 0, 1).astype(np.float16)
    noisy_f = CLEAN_F + RNG.normal(size=CLEAN_F.shape).astype(np.float32)
    write_run(tmp_path / "clean", "clean", None, CLEAN, CLEAN_F, total=3)
    wrong = np.arange(10) % 3
    wrong[:4] = 9
    write_run(tmp_path / "none", "none", 0.5, noisy, noisy_f, total=2, pred=wrong)
    code, output = report(tmp_path / "clean", tmp_path / "none", out=tmp_path / "rep")
    assert code == 0, output
    summary = json.loads((tmp_path / "rep" / "quality.json").read_text())
    (table,) = summary["datasets"]
    clean, none = table["rows"]
    assert clean["method"] == "clean" and clean["sigma"] is None and abs(clean["fid"]) < 1e-9
    assert clean["transport_w2"] == 0.0 and clean["accuracy"] == 1.0
    assert none["method"] == "none" and none["images"] == 10 and none["accuracy"] == pytest.approx(0.6)
    assert none["fid"] == pytest.approx(fid(noisy_f, CLEAN_F))
    assert none["transport_w2"] == pytest.approx(transport_w2(noisy, CLEAN))
    md = (tmp_path / "rep" / "quality-digits.md").read_text()
    assert md.strip() in output and "| none " in md and "60.0" in md
    assert (tmp_path / "rep" / "quality-digits.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_incomplete_runs_missing_references_and_other_sizes(tmp_path):
    write_run(tmp_path / "clean", "clean", None, CLEAN, CLEAN_F)
    write_run(tmp_path / "half", "none", 0.5, CLEAN, CLEAN_F, total=2, skip=(1,))
    assert_one_line_error(*report(tmp_path / "clean", tmp_path / "half", out=tmp_path / "r"), "1 of 2 shard files",
                          "missing [1]")
    write_run(tmp_path / "alone", "none", 0.5, CLEAN, CLEAN_F)
    assert_one_line_error(*report(tmp_path / "alone", out=tmp_path / "r"), "no clean reference run")
    big = RNG.random((10, 1, 8, 8)).astype(np.float16)
    write_run(tmp_path / "big", "none", 0.25, big, CLEAN_F)
    assert_one_line_error(*report(tmp_path / "clean", tmp_path / "big", out=tmp_path / "r"), "images of size (1, 8, 8)",
                          "(1, 4, 4)")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*report(tmp_path / "empty", out=tmp_path / "r"), "holds no quality-*-of-*.npz files")
    write_run(tmp_path / "zero", "clean", None, CLEAN[:0], CLEAN_F[:0], dataset={**DATASET, "spec": "other"})
    assert_one_line_error(*report(tmp_path / "zero", out=tmp_path / "r"), "no images (an empty set)")
    (tmp_path / "bad" / shard_name(0, 1)).parent.mkdir()
    (tmp_path / "bad" / shard_name(0, 1)).write_bytes(b"not an npz")
    assert_one_line_error(*report(tmp_path / "bad", out=tmp_path / "r"), "not a quality shard file")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ end to end
QUALITY = ["quality", "--purifier", "consistency:demo", "--purifier", "none", "--sigma", "0.5", "--skip", "50",
           "--max-images", "6", "--shards", "2", "--batch", "4", "--lpips-net", "alex", "--lpips-resize", "32",
           "--lpips-random-backbone", "--device", "cpu", "--executor", "debug"]


def test_missing_inception_weights_stop_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    result = CliRunner().invoke(main, [*QUALITY, "--out", str(tmp_path / "q")])
    assert_one_line_error(result.exit_code, result.output, "Inception weights for FID missing",
                          str(tmp_path / "th" / "hub" / "checkpoints"), "weights-inception-2015-12-05-6726825d.pth")
    assert not (tmp_path / "q").exists()


def test_quality_runs_share_the_noise_and_report(tmp_path):
    from cpcluster.jobs.quality import image_noise
    from cpcluster.models.purifier_base import LabelPolicy
    from cpcluster.models.purifiers import build_purifier
    from cpcluster.models.specs import load_dataset, load_denoiser

    out = tmp_path / "q"
    result = CliRunner().invoke(main, [*QUALITY, "--inception-random-weights", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"next: cpcluster quality-report {out}/clean {out}/consistency-demo-sigma0.5 {out}/none-sigma0.5" \
        in result.output
    load = lambda run: [np.load(out / run / shard_name(k, 2)) for k in range(2)]  # noqa: E731
    ids = np.concatenate([z["image_index"] for z in load("clean")])
    assert ids.tolist() == [0, 50, 100, 150, 200, 250]
    x = torch.from_numpy(load_dataset("demo").get(ids)[0])
    z, _ = image_noise(0, ids, x.shape[1:], LabelPolicy(), None)
    noisy = np.concatenate([s["images"] for s in load("none-sigma0.5")]).astype(np.float32)
    np.testing.assert_allclose(noisy, (x + 0.5 * z).numpy(), atol=2e-3, rtol=1e-3)  # float16 storage
    with torch.no_grad():
        purified = build_purifier("consistency", load_denoiser("demo"), 0.5)(x + 0.5 * z).numpy()
    stored = np.concatenate([s["images"] for s in load("consistency-demo-sigma0.5")]).astype(np.float32)
    np.testing.assert_allclose(stored, purified, atol=1e-3)  # the same noise went into every purifier
    # per-image noise does not depend on the batch (hence not on the shards)
    assert torch.equal(image_noise(0, [150], (1, 16, 16), LabelPolicy(), None)[0][0], z[3])

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("quality-*.npz")}
    again = CliRunner().invoke(main, [*QUALITY, "--inception-random-weights", "--out", str(out)])
    assert again.exit_code == 0 and "2 of 2 shards complete" in again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("quality-*.npz")} == stamps
    changed = CliRunner().invoke(main, [*QUALITY, "--inception-random-weights", "--seed", "1", "--out", str(out)])
    assert_one_line_error(changed.exit_code, changed.output, "holds another quality run", "--overwrite")

    code, output = report(*sorted(out.iterdir()), out=tmp_path / "rep")
    assert code == 0, output
    rows = json.loads((tmp_path / "rep" / "quality.json").read_text())["datasets"][0]["rows"]
    assert [(r["method"], r["sigma"], r["images"]) for r in rows] == [
        ("clean", None, 6), ("consistency(demo)", 0.5, 6), ("none", 0.5, 6)]
    by = {r["method"]: r for r in rows}
    assert abs(by["clean"]["fid"]) < 1e-6 and by["clean"]["transport_w2"] == 0 and by["clean"]["l2"] == 0
    # the demo purifier brings the noisy digits back towards the clean ones, by every measure
    for key in ("fid", "transport_w2", "lpips", "l2"):
        assert by["consistency(demo)"][key] < by["none"][key], key
