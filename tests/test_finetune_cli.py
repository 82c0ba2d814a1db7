"""``cpcluster finetune``: bad input fails in one line with exit 2 before anything is submitted; a tiny run works."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.orchestrate import slurm
from cpcluster.core.shards import read_shard

torch.set_num_threads(1)
TINY = ["--model", "demo-random", "--data", "demo:train", "--eval-data", "demo", "--steps", "2", "--batch-size", "8",
        "--lpips-net", "alex", "--lpips-resize", "32", "--eval-images", "8", "--log-every", "1"]


@pytest.fixture
def no_submit(monkeypatch, tmp_path):
    """Fail the test if anything reaches the executor; an empty torchvision cache."""
    def refuse(*args, **kwargs):
        raise AssertionError("a job was submitted")

    monkeypatch.setattr(slurm, "make_executor", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path


def run(*args):
    result = CliRunner().invoke(main, ["finetune", *args])
    return result.exit_code, result.output


def assert_one_line_error(code, output, *needles):
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_help_shows_a_runnable_example():
    code, output = run("--help")
    assert code == 0
    assert "cpcluster finetune --model demo-random --data demo:train" in output
    assert "finetuned:<out>/final" in output


def test_missing_lpips_backbone_is_caught_before_submitting(no_submit):
    out = no_submit / "out"
    code, output = run(*TINY, "--lpips-net", "vgg", "--out", str(out))
    folder = os.path.join(str(no_submit / "torch-home"), "hub", "checkpoints")
    assert_one_line_error(code, output, "vgg16-397923af.pth", folder)
    assert not out.exists()


@pytest.mark.parametrize("sigmas, needle", [("", "(empty)"), (",", "(empty)"), ("0.25,0", "0 is not positive"),
                                            ("-0.5", "-0.5 is not positive"), ("0.5,abc", "is not a number")])
def test_bad_sigma_sets(no_submit, sigmas, needle):
    code, output = run(*TINY, "--lpips-random-backbone", "--sigma", sigmas, "--out", str(no_submit / "o"))
    assert_one_line_error(code, output, "--sigma", needle)


@pytest.mark.parametrize("layout, ranks", [(["--ranks-per-node", "3"], 3),
                                           (["--nodes", "3", "--gpus-per-node", "2"], 6)])
def test_batch_not_divisible_by_ranks(no_submit, layout, ranks):
    code, output = run(*TINY, "--lpips-random-backbone", "--batch-size", "64", *layout, "--out", str(no_submit))
    assert_one_line_error(code, output, "--batch-size 64", f"{ranks} ranks")


def test_missing_data_path(no_submit):
    code, output = run(*TINY, "--lpips-random-backbone", "--data", "npz:/no/such/folder/train.npz",
                       "--out", str(no_submit / "o"))
    assert_one_line_error(code, output, "--data", "/no/such/folder/train.npz does not exist")
    code, output = run(*TINY, "--lpips-random-backbone", "--eval-data", "cifar10:./no-such-cifar",
                       "--out", str(no_submit / "o"))
    assert_one_line_error(code, output, "--eval-data", "./no-such-cifar does not exist")


def test_local_executor_is_one_node(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    code, output = run(*TINY, "--lpips-random-backbone", "--nodes", "2", "--executor", "local",
                       "--out", str(tmp_path / "o"))
    assert_one_line_error(code, output, "--nodes 2", "local executor")


def test_dry_run_prints_the_config_and_submits_nothing(no_submit):
    code, output = run(*TINY, "--lpips-random-backbone", "--ranks-per-node", "2", "--dry-run", "--executor", "local",
                       "--out", str(no_submit / "o"))
    assert code == 0, output
    assert "executor: local (as requested): 1 node(s) x 2 rank(s), CPU" in output
    assert "RANDOMLY INITIALISED alex" in output  # loud, on stderr (mixed into output by CliRunner)
    config = json.loads(output[output.index("{"):])["config"]
    assert config["ranks_per_node"] == 2 and config["device"] == "cpu" and config["sigmas"] == [0.25, 0.5, 1.0]


def test_debug_executor_runs_and_the_result_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    out = tmp_path / "out"
    code, output = run(*TINY, "--lpips-random-backbone", "--executor", "debug", "--out", str(out))
    assert code == 0, output
    assert "executor: debug (as requested): 1 node(s) x 1 rank(s), CPU" in output and "rank 0/1 on " in output
    assert "(cpu): step 0 -> 2" in output
    from cpcluster.models.specs import load_denoiser

    den = load_denoiser(f"finetuned:{out}/final")
    assert den.meta["finetuned"]["step"] == 2

    # the fine-tuned output certifies
    certified = tmp_path / "certified"
    res = CliRunner().invoke(main, ["certify", "--denoiser", f"finetuned:{out}/final", "--classifier", "demo-random",
                                    "--sigma", "0.5", "--max-images", "3", "--n0", "10", "--n", "40",
                                    "--block-size", "20", "--draw-batch", "10", "--batch", "20",
                                    "--executor", "debug", "--out", str(certified)])
    assert res.exit_code == 0, res.output
    (shard_file,) = [p for p in certified.rglob("shard-*.h5")]
    shard = read_shard(str(shard_file))
    weights = json.loads((out / "final" / "cpcluster.json").read_text())["weights"]
    assert shard.complete and shard.counts.sum() == 3 * (10 + 40)
    assert shard.config["denoiser"]["spec"] == f"finetuned:{out}/final"
    assert shard.config["denoiser"]["sha256"] == weights["sha256"] == den.sha256
    # rerunning with another configuration into the same folder is refused before submitting
    code, output = run(*TINY, "--lpips-random-backbone", "--lr", "0.5", "--executor", "debug", "--out", str(out))
    assert_one_line_error(code, output, "differs in: lr")
