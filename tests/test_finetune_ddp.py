"""Fine-tuning across processes: 2 gloo ranks through submitit's LocalExecutor, SIGKILL + rerun, SIGTERM + rerun.

One uninterrupted single-rank run (module fixture) is the reference for both: the 2-rank run with the same global
batch must follow it, and so must a run that was killed or terminated and resumed.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from cpcluster.core.config import FinetuneConfig
from cpcluster.jobs import finetune_io
from cpcluster.jobs.finetune import FinetuneJob
from cpcluster.jobs.training import FAULT_KILL_ENV, FAULT_TERM_ENV

torch.set_num_threads(1)
STEPS = 16
# Float32 sums over 2 x 8 images instead of 16 differ in the last bits: after 16 RAdam steps (lr 3e-2) we measured
# a largest weight difference of 4e-8 (weights up to 0.5). The bound leaves room for other BLAS builds.
TOLERANCE = 5e-5


def config(out, **kw):
    base = dict(model="demo-random", data="demo:train", eval_data="demo", out=str(out), steps=STEPS, batch_size=16,
                lr=3e-2, lpips_net="alex", lpips_resize=32, lpips_random_backbone=True, eval_images=32,
                eval_every=0, checkpoint_every=3, log_every=1, ema_decay=0.5)
    return FinetuneConfig(**{**base, **kw})


def final_state(out):
    ckpt = finetune_io.list_checkpoints(out)[0][1]
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def submit_two_local_ranks(logs, job):
    """``job`` as one submitit job of 2 tasks on this machine (``.results()``: one result per rank)."""
    import submitit

    executor = submitit.LocalExecutor(folder=str(logs))
    executor.update_parameters(tasks_per_node=2, timeout_min=5)
    return executor.submit(job)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft-ref")
    result = FinetuneJob(config(out))()
    return out, result, final_state(str(out))


def test_two_ranks_match_one_rank_and_each_other(tmp_path, reference):
    _, _, ref = reference
    job = submit_two_local_ranks(tmp_path / "logs", FinetuneJob(config(tmp_path / "two", ranks_per_node=2)))
    results = job.results()
    assert [(r["rank"], r["world_size"], r["step"]) for r in results] == [(0, 2, STEPS), (1, 2, STEPS)]
    # DDP: every rank ends with bit-identical weights (each rank also reports what the others hold)
    assert results[0]["param_sha256"] == results[1]["param_sha256"]
    assert results[0]["all_param_sha256"] == results[1]["all_param_sha256"] == [results[0]["param_sha256"]] * 2
    assert results[0]["ema_sha256"] == results[1]["ema_sha256"]

    two = final_state(str(tmp_path / "two"))
    assert max_difference(two["net"], ref["net"]) < TOLERANCE
    assert max_difference(two["ema"], ref["ema"]) < TOLERANCE
    losses = lambda log: [r["loss"] for r in log if r["kind"] == "train"]  # noqa: E731
    assert losses(two["log"]) == pytest.approx(losses(ref["log"]), rel=1e-5)

    # The loss falls on the demo data. The per-step training loss is too noisy over 16 steps (each batch draws
    # its own sigmas); the held-out evaluation is the same objective at fixed images and fixed noise, per sigma.
    evals = [r for r in two["log"] if r["kind"] == "eval"]
    for sigma in (0.25, 0.5, 1.0):
        (start_lpips, end_lpips), (start_l2, end_l2) = (
            [r[key] for r in evals if r["sigma"] == sigma] for key in ("lpips", "l2"))
        assert end_lpips < 0.95 * start_lpips and end_l2 < start_l2
    assert "2 rank(s) on cpu (gloo)" in (tmp_path / "logs" / f"{job.job_id}_0_log.out").read_text()


SCRIPT = ("import json, sys; from cpcluster.core.config import FinetuneConfig; from cpcluster.jobs.finetune import "
          "FinetuneJob; FinetuneJob(FinetuneConfig(**json.loads(sys.argv[1])))()")


def test_sigkill_then_rerun_resumes_without_repeating_steps(tmp_path, reference):
    _, ref_result, ref = reference
    out = tmp_path / "killed"
    cfg = config(out)
    env = {**os.environ, FAULT_KILL_ENV: "8"}  # dies after step 8; the last checkpoint holds step 6
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg.to_dict())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in finetune_io.list_checkpoints(str(out))] == [6, 3]
    assert not (out / "final").exists()
    (out / "checkpoints" / "step-00000009.pt.dead.tmp").write_bytes(b"torn write")  # a writer killed mid-file

    result = FinetuneJob(cfg)()  # the rerun: what a requeue does
    assert (result["start_step"], result["step"], result["attempt"]) == (6, STEPS, 2)
    assert not (out / "checkpoints" / "step-00000009.pt.dead.tmp").exists()
    records = finetune_io.read_metrics(str(out))
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in trains] == list(range(1, STEPS + 1))  # every step logged once
    assert [r["step"] for r in trains if r["attempt"] == 2] == list(range(7, STEPS + 1))  # nothing redone before 7
    assert [r for r in records if r["kind"] == "resume"] == [{"kind": "resume", "step": 6, "attempt": 2}]

    resumed = final_state(str(out))
    assert result["param_sha256"] == ref_result["param_sha256"]  # same weights as the uninterrupted run, bit for bit
    assert max_difference(resumed["ema"], ref["ema"]) == 0.0
    assert [r["loss"] for r in trains] == [r["loss"] for r in ref["log"] if r["kind"] == "train"]


def test_sigterm_checkpoints_the_step_it_stops_at_and_the_rerun_matches(tmp_path, reference):
    """scancel's SIGTERM after step 7: the job stops after step 8 (the next log step, log_every 1) with a checkpoint
    of step 8 that the periodic schedule (every 3) would not have written, and the rerun loses nothing."""
    _, ref_result, _ = reference
    out = tmp_path / "terminated"
    cfg = config(out)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg.to_dict())],
                          env={**os.environ, FAULT_TERM_ENV: "7"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "FinetuneTerminated: stopped by SIGTERM after step 8 of 16" in proc.stderr, \
        proc.stderr[-2000:]
    assert [s for s, _ in finetune_io.list_checkpoints(str(out))] == [8, 6]
    result = FinetuneJob(cfg)()
    assert (result["start_step"], result["attempt"]) == (8, 2)
    assert result["param_sha256"] == ref_result["param_sha256"]


def test_sigterm_on_one_rank_stops_both_at_the_same_step(tmp_path, reference, monkeypatch):
    _, _, ref = reference
    out = tmp_path / "two-terminated"
    monkeypatch.setenv(FAULT_TERM_ENV, "4")
    monkeypatch.setenv("CPCLUSTER_FAULT_KILL_RANK", "1")  # only rank 1 is signalled
    job = submit_two_local_ranks(tmp_path / "logs", FinetuneJob(config(out, ranks_per_node=2)))
    with pytest.raises(Exception, match="stopped by SIGTERM after step 5 of 16"):
        job.results()
    assert [s for s, _ in finetune_io.list_checkpoints(str(out))] == [5, 3]  # rank 0 wrote step 5 before exiting
    monkeypatch.delenv(FAULT_TERM_ENV)
    job = submit_two_local_ranks(tmp_path / "logs", FinetuneJob(config(out, ranks_per_node=2)))
    assert [(r["start_step"], r["step"]) for r in job.results()] == [(5, STEPS), (5, STEPS)]
    assert max_difference(final_state(str(out))["net"], ref["net"]) < TOLERANCE
