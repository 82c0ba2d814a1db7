"""The research route of a released-format network, run as a user runs it: inspect -> finetune (2 DDP ranks) ->
certify the export -> aggregate. Shared by the route tests of every checkpoint format.

Everything goes through the ``cpcluster`` command line (Click's runner; the fine-tuning job runs in two real
processes through submitit's local executor). Sizes are tiny: the demo digits (1x16x16, 10 classes) unless the
caller passes another dataset.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from click.testing import CliRunner

from cpcluster.cli import main


def cli(*args: str) -> str:
    """Run ``cpcluster ARGS``; assert exit code 0; return the output."""
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, f"cpcluster {' '.join(map(str, args))}\n{res.output}"
    return res.output


def write_cifar_batch(root, labels=(3, 1, 4, 1), seed: int = 0) -> np.ndarray:
    """``root/cifar-10-batches-bin/test_batch.bin`` (CIFAR-10's binary format) of random 3x32x32 images with these
    labels; returns the images (N, 3, 32, 32) uint8. ``cifar10:ROOT`` reads it."""
    x = np.random.default_rng(seed).integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    os.makedirs(os.path.join(root, "cifar-10-batches-bin"))
    with open(os.path.join(root, "cifar-10-batches-bin", "test_batch.bin"), "wb") as fh:
        fh.write(np.concatenate([np.asarray(labels, np.uint8)[:, None], x.reshape(len(labels), -1)], axis=1).tobytes())
    return x


def finetune_two_ranks(model: str, out: str, data: str = "demo:train", eval_data: str = "demo",
                       steps: int = 2, extra: tuple = ()) -> tuple[str, list[str]]:
    """``cpcluster finetune`` on 2 local CPU ranks; returns (output, the per-rank weight digests it printed)."""
    output = cli("finetune", "--model", model, "--data", data, "--eval-data", eval_data, "--steps", steps,
                 "--batch-size", 4, "--lr", 1e-2, "--lpips-random-backbone", "--lpips-net", "alex",
                 "--lpips-resize", 32, "--eval-images", 4, "--eval-batch", 4, "--ema-decay", 0,
                 "--log-every", 1, "--checkpoint-every", steps, "--ranks-per-node", 2, "--executor", "local",
                 "--out", out, "--wait", *extra)
    digests = [line.split("weights sha256 ")[1].split(",")[0] for line in output.splitlines()
               if line.startswith("rank ")]
    return output, digests


def certify_and_aggregate(denoiser: str, out: str, name: str, dataset: str = "demo", classifier: str = "demo",
                          purifier: str = "consistency", extra: tuple = ()) -> dict:
    """Certify 3 images (n0 4, n 8, 2 shards, in this process) and aggregate; returns ``summary.json``."""
    cli("certify", "--denoiser", denoiser, "--classifier", classifier, "--dataset", dataset,
        "--purifier", purifier, "--sigma", 0.5, "--max-images", 3, "--n0", 4, "--n", 8, "--block-size", 4,
        "--draw-batch", 4, "--batch", 8, "--shards", 2, "--device", "cpu", "--executor", "debug",
        "--out", out, "--name", name, *extra)
    agg = os.path.join(out, f"{name}-aggregate")
    cli("aggregate", os.path.join(out, name), "--alpha", 0.05, "--radii", "0,0.25", "--out", agg)
    with open(os.path.join(agg, "summary.json")) as fh:
        return json.load(fh)


def states_differ(a: dict, b: dict) -> bool:
    """Same tensor names and shapes, and at least one tensor changed."""
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return any(not torch.equal(a[k], b[k]) for k in a)
