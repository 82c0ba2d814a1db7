"""Classifier fine-tuning (CLS-FT): config, schedule, routing, 2 ranks = 1 rank, kill + rerun, export, method labels.

One uninterrupted single-rank run (module fixture) is the reference: the 2-rank run with the same global batch must
follow it, and so must a run that was SIGKILLed and rerun.
"""
import json
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from test_finetune_ddp import final_state, max_difference, submit_two_local_ranks

from cpcluster.aggregate.finetuning import finetuning_label
from cpcluster.aggregate.merge import method_name
from cpcluster.core.config_evidence import ClassifierFinetuneConfig
from cpcluster.jobs import finetune_io
from cpcluster.jobs.finetune_classifier import ClassifierFinetuneJob, learning_rate, preflight, purify
from cpcluster.jobs.training import FAULT_KILL_ENV, FAULT_TERM_ENV
from cpcluster.models.purifier_base import LabelPolicy
from cpcluster.models.purifiers import build_purifier
from cpcluster.models.specs import load_classifier, load_denoiser
from cpcluster.util.errors import InputError

torch.set_num_threads(1)
STEPS = 8
TOLERANCE = 5e-5  # float32 sums over 2 x 8 images instead of 16 (see test_finetune_ddp.py)


def config(out, **kw):
    base = dict(classifier="demo-random", denoiser="demo", data="demo:train", eval_data="demo", out=str(out),
                sigmas=(0.25, 0.5), steps=STEPS, batch_size=16, optimizer="sgd", lr=0.05, eval_images=32,
                eval_every=0, checkpoint_every=3, log_every=1)
    return ClassifierFinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls-ref")
    result = ClassifierFinetuneJob(config(out))()
    return out, result, final_state(str(out))


# ------------------------------------------------------------------------------------------------ config, schedule
@pytest.mark.parametrize("kw, match", [
    ({"optimizer": "adam"}, "--optimizer"), ({"schedule": "linear"}, "--schedule"), ({"momentum": 1.0}, "--momentum"),
    ({"lr_gamma": 0.0}, "--lr-gamma"), ({"batchnorm": "off"}, "--batchnorm"), ({"purifier": "magic"}, "--purifier"),
    ({"denoiser": None}, "needs a --denoiser"), ({"batch_size": 10, "ranks_per_node": 4}, "not divisible"),
    ({"sigmas": ()}, "--sigma"), ({"warmup_steps": -1}, "--warmup-steps"), ({"weight_decay": -1}, "--weight-decay"),
])
def test_config_rejects_bad_values(tmp_path, kw, match):
    with pytest.raises(InputError, match=match):
        config(tmp_path, **kw)


def test_steps_resume_freely_only_under_the_constant_schedule(tmp_path):
    assert config(tmp_path).run_dict() == config(tmp_path, steps=99, ranks_per_node=2, log_every=5).run_dict()
    assert config(tmp_path, schedule="cosine").run_dict() != config(tmp_path, schedule="cosine", steps=99).run_dict()
    assert config(tmp_path, purifier="none").denoiser is None and config(tmp_path).run_dict()["job"]


def test_learning_rate_schedules(tmp_path):
    warm = config(tmp_path, lr=0.1, warmup_steps=4, steps=104)
    assert [learning_rate(warm, k) for k in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    cos = config(tmp_path, lr=0.1, schedule="cosine", warmup_steps=4, steps=104)
    assert learning_rate(cos, 4) == pytest.approx(0.1) and learning_rate(cos, 54) == pytest.approx(0.05)
    assert learning_rate(cos, 103) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    step = config(tmp_path, lr=0.1, schedule="step", lr_step_every=10, lr_gamma=0.5)
    assert [learning_rate(step, k) for k in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])


def test_purify_routes_each_row_to_its_sigma_and_uses_the_given_labels():
    den = load_denoiser("demo-random:conditional")
    with torch.no_grad():  # demo-random's zero GroupNorm weights make its output F zero: perturb every weight
        for p in den.module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pur = [build_purifier("consistency", den, s, label_policy=LabelPolicy("random")) for s in (0.25, 1.0)]
    noisy = torch.rand(6, 1, 16, 16)
    choice, labels = torch.tensor([0, 1, 1, 0, 1, 0]), torch.tensor([3, 1, 4, 1, 5, 9])
    with torch.no_grad():
        out = purify(pur, noisy, choice, labels)
        for b in range(6):  # the same image alone through its own sigma's purifier with its own label
            alone = pur[int(choice[b])](noisy[b:b + 1], None, labels[b:b + 1])
            torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-6)
        other = purify(pur, noisy, choice, labels.flip(0))
    assert not torch.allclose(out, other)  # the labels are used, not redrawn


def test_job_pickles_and_checkpoint_resubmits(tmp_path):
    job = ClassifierFinetuneJob(config(tmp_path))
    assert pickle.loads(pickle.dumps(job)).config == job.config
    delayed = job.checkpoint()
    assert delayed.function.config == job.config and delayed.function is not job


# ---------------------------------------------------------------------------------------------------- the job
def test_run_trains_exports_and_the_export_certifies(tmp_path, reference):
    from click.testing import CliRunner

    from cpcluster.cli import main
    from cpcluster.core.shards import read_shard

    out, result, state = reference
    assert (result["start_step"], result["step"], result["attempt"]) == (0, STEPS, 1)
    records = finetune_io.read_metrics(str(out))
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    evals = [r for r in records if r["kind"] == "eval"]
    assert sorted({r["step"] for r in evals}) == [0, STEPS] and {r["sigma"] for r in evals} == {0.25, 0.5}
    assert all(r["lpips"] is None and 0 <= r["acc"] <= 1 and r["images"] == 32 for r in evals)

    loaded = load_classifier(f"finetuned:{out}/final")
    assert max_difference(loaded.module.state_dict(), state["net"]) == 0.0
    assert loaded.finetuned["base"] == "demo-random" and loaded.finetuned["step"] == STEPS
    assert loaded.finetuned["purifier"]["denoiser"]["spec"] == "demo"
    certified = tmp_path / "certified"
    res = CliRunner().invoke(main, ["certify", "--denoiser", "demo", "--classifier", f"finetuned:{out}/final",
                                    "--sigma", "0.5", "--max-images", "3", "--n0", "10", "--n", "40",
                                    "--block-size", "20", "--draw-batch", "10", "--batch", "20",
                                    "--executor", "debug", "--out", str(certified)])
    assert res.exit_code == 0, res.output
    (shard_file,) = certified.rglob("shard-*.h5")
    shard = read_shard(str(shard_file))
    assert shard.complete and shard.counts.sum() == 3 * 50
    assert shard.config["classifier"]["sha256"] == loaded.sha256
    assert method_name(shard.config) == f"consistency(demo) [CLS-FT: finetuned:{out}/final]"


def test_training_raises_the_accuracy_on_purified_images(tmp_path):
    """The clean-trained demo classifier behind the demo purifier at sigma 1.0 (held-out accuracy 0.56): 30 RAdam
    steps raised it to 0.63 / 0.63 / 0.64 with seeds 0 / 1 / 2 (250 held-out digits, fixed noise)."""
    cfg = config(tmp_path, classifier="demo", sigmas=(1.0,), steps=30, batch_size=32, optimizer="radam", lr=1e-3,
                 eval_images=250, eval_batch=125, checkpoint_every=30, log_every=10)
    ClassifierFinetuneJob(cfg)()
    acc = {r["step"]: r["acc"] for r in finetune_io.read_metrics(cfg.out) if r["kind"] == "eval"}
    assert acc[30] > acc[0] + 0.04, acc


def test_two_ranks_match_one_rank(tmp_path, reference):
    _, _, ref = reference
    two_ranks = ClassifierFinetuneJob(config(tmp_path / "two", ranks_per_node=2))
    job = submit_two_local_ranks(tmp_path / "logs", two_ranks)
    results = job.results()
    assert [(r["rank"], r["world_size"], r["step"]) for r in results] == [(0, 2, STEPS), (1, 2, STEPS)]
    assert results[0]["param_sha256"] == results[1]["param_sha256"]
    two = final_state(str(tmp_path / "two"))
    assert max_difference(two["net"], ref["net"]) < TOLERANCE
    losses = lambda log: [r["loss"] for r in log if r["kind"] == "train"]  # noqa: E731
    assert losses(two["log"]) == pytest.approx(losses(ref["log"]), rel=1e-4)


SCRIPT = ("import json, sys; from cpcluster.core.config_evidence import ClassifierFinetuneConfig as C; "
          "from cpcluster.jobs.finetune_classifier import ClassifierFinetuneJob as J; J(C(**json.loads(sys.argv[1])))()")


def run_in_a_process(cfg, fault: dict):
    """The job in its own process with a fault-injection variable set (it kills or terminates itself)."""
    return subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg.to_dict())], env={**os.environ, **fault},
                          capture_output=True, text=True, timeout=300)


def test_sigkill_then_rerun_equals_the_uninterrupted_run(tmp_path, reference):
    _, ref_result, _ = reference
    out = tmp_path / "killed"
    cfg = config(out)
    proc = run_in_a_process(cfg, {FAULT_KILL_ENV: "5"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in finetune_io.list_checkpoints(str(out))] == [3]
    result = ClassifierFinetuneJob(cfg)()
    assert (result["start_step"], result["step"], result["attempt"]) == (3, STEPS, 2)
    assert result["param_sha256"] == ref_result["param_sha256"]  # bit for bit
    trains = [r["step"] for r in finetune_io.read_metrics(str(out)) if r["kind"] == "train"]
    assert trains == list(range(1, STEPS + 1))


def test_sigterm_stops_at_a_checkpointed_step_and_the_rerun_matches(tmp_path, reference):
    _, ref_result, _ = reference
    out = tmp_path / "terminated"
    cfg = config(out)
    proc = run_in_a_process(cfg, {FAULT_TERM_ENV: "4"})
    assert proc.returncode == 1 and "FinetuneTerminated: stopped by SIGTERM after step 5 of 8" in proc.stderr, \
        proc.stderr[-2000:]
    assert [s for s, _ in finetune_io.list_checkpoints(str(out))] == [5, 3]  # step 5 is not on the schedule
    result = ClassifierFinetuneJob(cfg)()
    assert (result["start_step"], result["param_sha256"]) == (5, ref_result["param_sha256"])


# ------------------------------------------------------------------------------------------------------ preflight
def test_preflight(tmp_path):
    preflight(config(tmp_path))
    with pytest.raises(InputError, match="/no/such.npz does not exist"):
        preflight(config(tmp_path, data="npz:/no/such.npz"))
    with pytest.raises(InputError, match="--classifier 'nope': unknown kind"):
        preflight(config(tmp_path, classifier="nope"))


# ---------------------------------------------------------------------------------------------------- labels
def test_method_labels_say_what_was_finetuned():
    plain = {"purifier": {"kind": "consistency"}, "denoiser": {"spec": "demo"}, "classifier": {"spec": "demo"}}
    dm = {**plain, "denoiser": {"spec": "finetuned:a", "finetuned": {"step": 3}}}
    cls = {**plain, "classifier": {"spec": "finetuned:b", "finetuned": {"step": 2}}}
    both = {**dm, "classifier": cls["classifier"]}
    assert [finetuning_label(c) for c in (plain, dm, cls, both)] == ["", "DM-FT", "CLS-FT: finetuned:b",
                                                                     "DM-FT + CLS-FT: finetuned:b"]
    assert method_name(plain) == "consistency(demo)" and method_name(dm) == "consistency(finetuned:a) [DM-FT]"
    assert method_name({**cls, "purifier": {"kind": "none"}}) == "none [CLS-FT: finetuned:b]"
