"""The demo runs what it prints: each ``$ cpcluster certify|quality ...`` line, parsed by the real command, builds
the same configs the demo runs through the orchestration functions (no run, no models loaded)."""
import pytest
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.orchestrate import certify, quality
from cpcluster.orchestrate.demo_plan import (CLS_RUNS, FULL, METHODS, QUICK, certify_args, certify_configs,
                                             certify_request, cls_certify_request, command_line, quality_configs,
                                             quality_request)


def _captured(monkeypatch, module, name, args):
    seen = {}
    monkeypatch.setattr(module, name, lambda configs, executor, slurm, **kw: seen.update(
        configs=configs, executor=executor, slurm=slurm, **kw))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return seen


@pytest.mark.parametrize("plan", [FULL, QUICK], ids=["full", "quick"])
def test_printed_certify_commands_build_the_configs_the_demo_runs(plan, tmp_path, monkeypatch):
    requests = [certify_request(plan, str(tmp_path), m, "/x/final", 2) for m in METHODS]
    requests += [cls_certify_request(plan, str(tmp_path), p, d.format(final="/x/final"), "finetuned:/c/final", 2)
                 for p, _, d in CLS_RUNS]
    for request in requests:
        configs, executor, workers = certify_configs(request)
        seen = _captured(monkeypatch, certify, "certify_runs", ["certify", *command_line(request)])
        assert seen["configs"] == configs and len(configs) in (1, len(plan.sigmas))
        assert (seen["executor"], seen["workers"]) == (executor, workers) == ("local", 2)
        assert not seen["dry_run"] and not seen["overwrite"]
    assert certify_args(plan, str(tmp_path), METHODS[0], "", 2)[:2] == ["--purifier", "none"]


def test_printed_quality_command_builds_the_configs_the_demo_runs(tmp_path, monkeypatch):
    request = quality_request(QUICK, str(tmp_path), "/x/final")
    configs, executor = quality_configs(request)
    monkeypatch.setattr(quality, "preflight", lambda configs: None)
    seen = _captured(monkeypatch, quality, "run_quality", ["quality", *command_line(request)])
    assert seen["configs"] == configs and seen["executor"] == executor == "debug"
    assert [c.purifier for c in configs] == ["clean", "none", "consistency", "consistency"]
    assert configs[-1].denoiser == "finetuned:/x/final" and configs[-1].lpips_random_backbone
