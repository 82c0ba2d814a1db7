"""``cpcluster finetune --executor slurm --nodes 2`` on a live SLURM cluster (marked ``slurm``; needs ``sinfo``).

Start the project's test cluster with ``NODES=2 WITH_SLURMDBD=1 bash cpcluster/cluster/slurm-up.sh`` and run
``python -m pytest -m slurm tests/test_finetune_slurm.py``. Without a reachable cluster the test is skipped.
"""
import json
import subprocess

import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.config import FinetuneConfig
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
