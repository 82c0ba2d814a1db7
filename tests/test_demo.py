"""``cpcluster demo --quick`` end to end (fine-tune, certify three purifiers x three sigmas on several shards with
the local executor, aggregate), its rerun (reuses and resumes, same results) and its one-line errors."""
import json
import os

import pytest
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.orchestrate.demo import label
from cpcluster.orchestrate.demo_plan import FULL, METHODS, QUICK, certify_args


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--workers", "2"])
    return out, result


def test_quick_demo_writes_table_png_and_summary(quick):
    out, result = quick
    assert result.exit_code == 0, result.output
    agg = out / "quick" / "aggregate"
    assert (agg / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((agg / "summary.json").read_text())
    groups = summary["groups"]
    final = os.path.join(str(out), "quick", "finetune", "final")
    methods = {"none", "consistency(demo)", f"consistency(finetuned:{final}) [DM-FT]"}
    cls = {f"consistency(demo) [CLS-FT: finetuned:{out}/quick/cls-ft/final]",
           f"consistency(finetuned:{final}) [DM-FT + CLS-FT: finetuned:{out}/quick/both/final]"}
    assert {(g["method"], g["sigma"]) for g in groups} == \
        {(m, s) for m in methods for s in (0.25, 0.5, 1.0)} | {(m, 1.0) for m in cls}
    assert all(g["images_evaluated"] == QUICK.max_images and g["n0"] == QUICK.n0 and g["n"] == QUICK.n for g in groups)
    assert summary["alpha"] == QUICK.alpha
    # every run was cut into the planned number of shards, all complete
    for prefix, _, _ in METHODS:
        for sigma in ("0.25", "0.5", "1"):
            run = out / "quick" / "certify" / f"{prefix}-sigma{sigma}"
            assert len(list(run.glob(f"shard-*-of-{QUICK.shards:05d}.h5"))) == QUICK.shards
    table = (agg / "table.md").read_text()
    assert table.strip() in result.output and "best over sigma" in table
    for m in methods | cls:
        assert m in table
    # the classifiers were fine-tuned behind the purifier before (CLS-FT) and after (both) LPIPS fine-tuning
    both = json.loads((out / "quick" / "both" / "final" / "cpcluster.json").read_text())
    assert both["purifier"]["denoiser"]["spec"] == f"finetuned:{final}" and both["step"] == QUICK.evidence.cls_ft["steps"]
    # the quality table and the grid
    quality = (out / "quick" / "quality" / "report" / "quality-demo-digits-test.md").read_text()
    assert quality.strip() in result.output and "| clean " in quality and "| none " in quality
    assert (out / "quick" / "grid.png").read_bytes()[:4] == b"\x89PNG" and (out / "quick" / "grid.npz").exists()
    assert "RANDOMLY INITIALISED InceptionV3" in result.output
    # the fine-tuning really ran: its exported weights differ from the base, and it started from `demo`
    meta = json.loads((out / "quick" / "finetune" / "final" / "cpcluster.json").read_text())
    assert meta["finetuned"]["base"] == "demo" and meta["finetuned"]["step"] == QUICK.finetune["steps"]
    assert meta["finetune_run"]["config"]["lpips_random_backbone"] is True and meta["architecture"] == "demo-unet"
    from cpcluster.models.specs import load_denoiser

    before = load_denoiser("demo").module.state_dict()
    after = load_denoiser(f"finetuned:{final}").module.state_dict()
    assert before.keys() == after.keys() and any(not (before[k] == after[k]).all() for k in before)
    # the output says loudly that LPIPS used a random trunk, and shows the commands it ran
    assert result.output.count("RANDOMLY INITIALISED") >= 2 and "Inception network ran with random weights" in result.output
    assert "$ cpcluster certify --purifier none" in result.output and "$ cpcluster aggregate" in result.output
    assert "held-out check" in result.output and "wall time" in result.output


def test_rerun_reuses_finished_work(quick):
    out, first = quick
    assert first.exit_code == 0, first.output
    summary = (out / "quick" / "aggregate" / "summary.json").read_text()
    stamp = {p: p.stat().st_mtime_ns for p in (out / "quick" / "certify").glob("*/shard-*.h5")}
    again = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "reusing the finished fine-tuning" in again.output
    assert again.output.count(f"resume, {QUICK.shards} of {QUICK.shards} shards complete") == 11
    assert again.output.count("reusing the finished fine-tuning") == 3 and "1 of 1 shards complete" in again.output
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # no shard rewritten
    assert (out / "quick" / "aggregate" / "summary.json").read_text() == summary


def test_other_settings_in_the_same_folder_are_refused_in_one_line(quick, tmp_path):
    out, first = quick
    assert first.exit_code == 0, first.output
    record = out / "quick" / "finetune" / "finetune.json"
    data = json.loads(record.read_text())
    data["run_hash"], data["run"]["lr"] = "0" * 64, 1.0  # as if made with other settings
    odd = tmp_path / "odd"
    (odd / "quick" / "finetune").mkdir(parents=True)
    (odd / "quick" / "finetune" / "finetune.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(odd)])
    assert result.exit_code == 2
    assert "another configuration" in result.output and "cpcluster demo --overwrite" in result.output
    assert "Traceback" not in result.output and not (odd / "quick" / "certify").exists()
    assert result.output.count("Error:") == 1


def test_overwrite_deletes_only_the_demo_folders_then_runs(tmp_path, monkeypatch):
    from cpcluster.orchestrate import demo as pipeline

    root = tmp_path / "quick"
    for sub in ("finetune/final", "certify/none-sigma0.5", "certify/my-own-run", "aggregate"):
        (root / sub).mkdir(parents=True)
        (root / sub / "x.txt").write_text("old")
    calls = []
    monkeypatch.setattr(pipeline, "_stages", lambda *a: calls.append(a) or "ran")
    assert pipeline.run_demo(QUICK, str(tmp_path), echo=lambda s: None, overwrite=True) == "ran"
    assert calls and not (root / "finetune").exists() and not (root / "aggregate").exists()
    assert not (root / "certify" / "none-sigma0.5").exists()
    assert (root / "certify" / "my-own-run" / "x.txt").read_text() == "old"  # not a demo folder: kept


def test_bad_workers_and_help(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--workers", "0", "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "--workers 0" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "w").exists()  # refused before anything ran
    help_text = runner.invoke(main, ["demo", "--help"]).output
    assert "cpcluster demo --quick --out /tmp/demo" in help_text and "RANDOM" in help_text


def test_presets_are_valid_certify_and_finetune_settings(tmp_path):
    """The full preset's options parse into valid configs (no run): n0/n/blocks/shards, fine-tuning fields."""
    from cpcluster.orchestrate.demo_plan import finetune_config

    for plan in (FULL, QUICK):
        cfg = finetune_config(plan, str(tmp_path))
        assert cfg.lpips_random_backbone and cfg.model == "demo" and cfg.sigmas == plan.sigmas
        args = certify_args(plan, str(tmp_path), METHODS[2], "final", 2)
        assert args[:2] == ["--denoiser", "finetuned:final"] and args.count("--sigma") == 3
        assert int(args[args.index("--block-size") + 1]) % plan.draw_batch == 0
    assert label("consistency(finetuned:x/final) [DM-FT]") == "after fine-tuning (DM-FT)"
    assert label("none") == "no purifier" and label("consistency(demo) [CLS-FT: finetuned:c]").endswith("(CLS-FT)")
    assert label("consistency(finetuned:x) [DM-FT + CLS-FT: finetuned:b]") == "both (DM-FT + CLS-FT)"
    from cpcluster.orchestrate.demo_plan import cls_config

    for plan in (FULL, QUICK):
        cfg = cls_config(plan, str(tmp_path), "both", "finetuned:x")
        assert cfg.sigmas == (plan.evidence.sigma,) and cfg.classifier == "demo" and cfg.denoiser == "finetuned:x"
