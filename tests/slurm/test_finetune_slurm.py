"""``cpcluster finetune --executor slurm --nodes 2`` on a live SLURM cluster (marked ``slurm``; needs ``sinfo``).

Run by ``make test-slurm``; by hand: start the project's test cluster with ``NODES=2 WITH_SLURMDBD=1 bash
cpcluster/cluster/slurm-up.sh`` and run ``python -m pytest -m slurm tests/slurm/test_finetune_slurm.py``.
"""
import json
import subprocess

import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.config import FinetuneConfig
from cpcluster.jobs.finetune import FinetuneJob

pytestmark = pytest.mark.slurm
ARGS = ["--model", "demo-random", "--data", "demo:train", "--eval-data", "demo", "--steps", "6", "--batch-size", "8",
        "--lr", "0.03", "--lpips-net", "alex", "--lpips-resize", "32", "--lpips-random-backbone", "--eval-images",
        "16", "--checkpoint-every", "3", "--log-every", "1", "--ema-decay", "0.5"]


def _nodes() -> int:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return len(set(out.stdout.split())) if out.returncode == 0 else 0


def test_two_node_finetune_matches_one_process(tmp_path):
    if _nodes() < 2:
        pytest.skip("needs a reachable SLURM cluster with 2 nodes (NODES=2 WITH_SLURMDBD=1 slurm-up.sh)")
    out = tmp_path / "two-nodes"
    res = CliRunner().invoke(main, ["finetune", *ARGS, "--nodes", "2", "--executor", "slurm", "--time-min", "10",
                                    "--out", str(out), "--wait"])
    assert res.exit_code == 0, res.output
    assert "executor: slurm (as requested): 2 node(s) x 1 rank(s), CPU" in res.output
    digests = {line.split("weights sha256 ")[1].split(",")[0] for line in res.output.splitlines()
               if line.startswith("rank ")}
    assert len(digests) == 1  # both ranks hold the same weights
    assert "rank 0/2 on n1 (cpu)" in res.output and "rank 1/2 on n2 (cpu)" in res.output  # really on 2 nodes

    single = FinetuneConfig(model="demo-random", data="demo:train", eval_data="demo", out=str(tmp_path / "one"),
                            steps=6, batch_size=8, lr=0.03, lpips_net="alex", lpips_resize=32,
                            lpips_random_backbone=True, eval_images=16, checkpoint_every=3, log_every=1,
                            ema_decay=0.5)
    FinetuneJob(single)()
    two = torch.load(out / "checkpoints" / "step-00000006.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "checkpoints" / "step-00000006.pt", weights_only=True)
    assert max((two["net"][k] - one["net"][k]).abs().max().item() for k in one["net"]) < 5e-5
    record = json.loads((out / "finetune.json").read_text())
    assert record["config"]["nodes"] == 2


def test_preempted_job_requeues_and_resumes_from_disk(tmp_path):
    """USR2 (preemption / time limit) -> submitit calls FinetuneJob.checkpoint() -> requeued -> resumes from disk."""
    import time

    from cpcluster.orchestrate.finetune import build_executor
    from cpcluster.jobs import finetune_io

    if _nodes() < 1:
        pytest.skip("needs a reachable SLURM cluster (slurm-up.sh)")
    common = dict(model="demo-random", data="demo:train", eval_data="demo", steps=30, batch_size=16, lr=0.03,
                  lpips_net="vgg", lpips_resize=32, lpips_random_backbone=True, eval_images=0,
                  checkpoint_every=4, log_every=1, ema_decay=0.5)
    out = tmp_path / "preempted"
    executor = build_executor("slurm", str(tmp_path / "logs" / "%j"), 1, 1, 0, time_min=5)
    job = executor.submit(FinetuneJob(FinetuneConfig(out=str(out), **common)))
    deadline = time.monotonic() + 180
    while not finetune_io.list_checkpoints(str(out)):
        assert time.monotonic() < deadline, "the job made no checkpoint"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], check=True, capture_output=True)
    (result,) = job.results()
    assert result["attempt"] >= 2 and result["start_step"] >= 4 and result["step"] == 30
    assert "Caught signal SIGUSR2" in open(job.paths.stdout).read()  # submitit's checkpoint() path
    records = finetune_io.read_metrics(str(out))
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 31))  # each step once
    assert any(r["kind"] == "resume" for r in records)

    reference = FinetuneJob(FinetuneConfig(out=str(tmp_path / "uninterrupted"), **common))()
    assert result["param_sha256"] == reference["param_sha256"]
