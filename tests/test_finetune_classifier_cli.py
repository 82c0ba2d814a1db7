"""``cpcluster finetune-classifier``: one-line errors before submitting, a dry run, and "both" end to end."""
import json

import pytest
import torch
from click.testing import CliRunner
from test_finetune_cli import assert_one_line_error

from cpcluster.cli import main
from cpcluster.orchestrate import slurm

torch.set_num_threads(1)
TINY = ["--classifier", "demo", "--data", "demo:train", "--eval-data", "demo", "--sigma", "0.5", "--steps", "2",
        "--batch-size", "8", "--eval-images", "8", "--log-every", "1"]


def run(*args):
    result = CliRunner().invoke(main, ["finetune-classifier", *args])
    return result.exit_code, result.output


@pytest.fixture
def no_submit(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a job was submitted")

    monkeypatch.setattr(slurm, "make_executor", refuse)
    return tmp_path


def test_help_names_the_example_and_the_certify_spec():
    code, output = run("--help")
    assert code == 0 and "cpcluster finetune-classifier --classifier demo --denoiser demo" in output
    assert "--classifier finetuned:<out>/final" in output and "--schedule" in output


@pytest.mark.parametrize("extra, needles", [
    (["--data", "npz:/no/such/train.npz"], ["--data", "/no/such/train.npz does not exist"]),
    (["--denoiser", "finetuned:/no/such/ft"], ["--denoiser", "/no/such/ft does not exist"]),
    (["--momentum", "1.5"], ["--momentum 1.5"]),
    (["--ranks-per-node", "3"], ["--batch-size 8", "3 ranks"]),
    (["--optimizer", "adam"], ["--optimizer", "'adam' is not one of"]),
])
def test_bad_input_is_one_line_before_submitting(no_submit, extra, needles):
    code, output = run(*TINY, *extra, "--out", str(no_submit / "o"))
    assert_one_line_error(code, output, *needles)
    assert not (no_submit / "o").exists()


def test_dry_run(no_submit):
    code, output = run(*TINY, "--purifier", "none", "--dry-run", "--executor", "local", "--out", str(no_submit / "o"))
    assert code == 0, output
    config = json.loads(output[output.index("{"):])["config"]
    assert config["denoiser"] is None and config["purifier"] == "none" and config["sigmas"] == [0.5]


def test_both_dm_ft_then_cls_ft_behind_it(tmp_path):
    """The paper's "both": fine-tune the purifier, then the classifier behind the fine-tuned purifier."""
    dm = tmp_path / "dm"
    res = CliRunner().invoke(main, ["finetune", "--model", "demo", "--data", "demo:train", "--sigma", "0.5",
                                    "--steps", "2", "--batch-size", "8", "--loss", "l2", "--eval-images", "0",
                                    "--executor", "debug", "--out", str(dm)])
    assert res.exit_code == 0, res.output
    code, output = run(*TINY, "--denoiser", f"finetuned:{dm}/final", "--executor", "debug", "--out",
                       str(tmp_path / "both"))
    assert code == 0, output
    assert "(cpu): step 0 -> 2" in output and f"--classifier finetuned:{tmp_path / 'both'}/final" in output
    from cpcluster.models.specs import load_classifier

    both = load_classifier(f"finetuned:{tmp_path}/both/final")
    assert both.finetuned["purifier"]["denoiser"]["spec"] == f"finetuned:{dm}/final"
    assert both.finetuned["purifier"]["denoiser"]["finetuned"]["step"] == 2
