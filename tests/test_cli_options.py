"""The option spellings every command shares (cpcluster/cli/options.py): ``--sigma`` repeated or comma-separated,
``--time-rule`` and ``--solver-steps``, with the older spellings as hidden aliases that give the same settings, and
the ``CPCLUSTER_`` environment defaults of the cluster options (a command-line value wins). Nothing runs: the
orchestration functions are replaced by recorders."""
import pytest
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.orchestrate import certify as certify_orchestration
from cpcluster.orchestrate import finetune as finetune_orchestration


@pytest.fixture
def certify_calls(monkeypatch):
    """Run `cpcluster certify ARGS` up to the orchestration; return (build_configs kwargs, certify_runs args)."""
    seen = {}

    def build_configs(sigmas, out, name, **fields):
        seen["build"] = dict(fields, sigmas=tuple(sigmas))
        return ["config"]

    def certify_runs(configs, executor, slurm, **kwargs):
        seen["run"] = dict(executor=executor, **slurm)

    monkeypatch.setattr(certify_orchestration, "build_configs", build_configs)
    monkeypatch.setattr(certify_orchestration, "certify_runs", certify_runs)
    for name in ("CPCLUSTER_EXECUTOR", "CPCLUSTER_PARTITION", "CPCLUSTER_ACCOUNT", "CPCLUSTER_TIME_MIN"):
        monkeypatch.delenv(name, raising=False)

    def run(*args, env=None):
        seen.clear()
        result = CliRunner().invoke(main, ["certify", *args], env=env)
        assert result.exit_code == 0, result.output
        return seen["build"], seen["run"]

    return run


def test_sigma_repeated_comma_separated_or_both_give_the_same_runs(certify_calls):
    repeated, _ = certify_calls("--sigma", "0.25", "--sigma", "0.5", "--sigma", "1.0")
    commas, _ = certify_calls("--sigma", "0.25,0.5,1.0")
    mixed, _ = certify_calls("--sigma", "0.25,0.5", "--sigma", "1")
    assert repeated["sigmas"] == commas["sigmas"] == mixed["sigmas"] == (0.25, 0.5, 1.0)


def test_new_spellings_and_hidden_aliases_set_the_same_fields(certify_calls):
    new, _ = certify_calls("--sigma", "0.5", "--purifier", "pf-ode", "--time-rule", "exact", "--solver-steps", "3")
    old, _ = certify_calls("--sigma", "0.5", "--purifier", "pf-ode", "--time", "exact", "--steps", "3")
    assert new == old and new["time_rule"] == "exact" and new["steps"] == 3
    default, _ = certify_calls("--sigma", "0.5")
    assert default["time_rule"] == "nearest" and default["steps"] is None


@pytest.mark.parametrize("command", ["certify", "inspect", "quality", "grid", "finetune", "finetune-classifier"])
def test_help_shows_the_new_names_only(command):
    text = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    assert "--time-rule" in text and "--time " not in text and "--time," not in text
    assert "--sigmas" not in text and "--purifier-steps" not in text
    if command in ("certify", "inspect", "quality", "grid", "finetune-classifier"):
        assert "--solver-steps" in text
    if command in ("certify", "inspect"):
        assert "--steps" not in text


def test_cluster_options_default_from_the_environment_and_the_command_line_wins(certify_calls):
    env = {"CPCLUSTER_EXECUTOR": "slurm", "CPCLUSTER_PARTITION": "gpu", "CPCLUSTER_ACCOUNT": "lab",
           "CPCLUSTER_TIME_MIN": "90"}
    _, from_env = certify_calls("--sigma", "0.5", env=env)
    assert (from_env["executor"], from_env["partition"], from_env["account"], from_env["time_min"]) == \
        ("slurm", "gpu", "lab", 90)
    _, given = certify_calls("--sigma", "0.5", "--executor", "local", "--partition", "debug", "--time-min", "5",
                             env=env)
    assert (given["executor"], given["partition"], given["account"], given["time_min"]) == \
        ("local", "debug", "lab", 5)
    _, none = certify_calls("--sigma", "0.5")
    assert (none["executor"], none["partition"], none["account"], none["time_min"]) == ("auto", None, None, 240)


def test_a_bad_environment_default_is_one_error_line_naming_the_variable(certify_calls):
    result = CliRunner().invoke(main, ["certify", "--sigma", "0.5"], env={"CPCLUSTER_EXECUTOR": "cloud"})
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "--executor" in errors[0] and "cloud" in errors[0], result.output


def test_finetune_commands_take_sigma_and_the_old_sigmas(monkeypatch, tmp_path):
    configs = []
    monkeypatch.setattr(finetune_orchestration, "submit_training", lambda job, config, *a, **k: configs.append(config))
    monkeypatch.setenv("CPCLUSTER_PARTITION", "gpu")
    base = ["--data", "demo:train", "--out", str(tmp_path / "o"), "--lpips-random-backbone", "--executor", "local"]
    for spelling in (["--sigma", "0.25,0.5"], ["--sigma", "0.25", "--sigma", "0.5"], ["--sigmas", "0.25,0.5"]):
        result = CliRunner().invoke(main, ["finetune", "--model", "demo-random", *base, *spelling])
        assert result.exit_code == 0, result.output
    assert [c.sigmas for c in configs] == [(0.25, 0.5)] * 3


def test_solver_steps_take_a_number_or_grid_and_refuse_anything_else(certify_calls):
    grid, _ = certify_calls("--sigma", "0.5", "--purifier", "pf-ode", "--solver-steps", "grid")
    assert grid["steps"] == "grid"
    for bad in ("gird", "0", "-3"):
        result = CliRunner().invoke(main, ["certify", "--sigma", "0.5", "--purifier", "pf-ode", "--solver-steps", bad])
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and "--solver-steps" in errors[0], result.output
