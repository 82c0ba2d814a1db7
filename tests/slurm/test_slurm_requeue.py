"""Requeue and preemption on the live cluster: a Checkpointable job resumes from what it wrote to disk.

Three jobs run at once: one requeued from outside (``scontrol requeue``: restarted from scratch, no signal), one
sent USR2 on its batch shell (``scancel --batch``, passed on by cpcluster's setup lines), one sent USR2 on its
job step (what SLURM's own ``--signal=USR2@90`` does before a time limit). Then a cancelled job must show as
cancelled through real accounting (sacct) instead of leaving ``result()`` waiting.
"""
import subprocess
import time

import pytest

import slurm_probes
from cpcluster.orchestrate.slurm import SlurmOptions, make_executor
from cpcluster.orchestrate.slurm_arrays import submit_array

pytestmark = pytest.mark.slurm
STEPS, STEP_S = 12, 1.0
INTERRUPTS = {
    "scontrol-requeue": ["scontrol", "requeue"],
    "usr2-batch": ["scancel", "--batch", "--signal=USR2"],
    "usr2-step": ["scancel", "--signal=USR2"],
}


def _lines(path):
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _wait(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("requeue")
    # time_min < 10: submitit counts each USR2 as a timeout, so allow a few (max_num_timeout)
    ex = make_executor(str(root / "logs" / "%j"), SlurmOptions(time_min=5, max_num_timeout=3,
                                                               job_name="cpc-test-requeue"))
    outs = {name: root / name for name in INTERRUPTS}
    for out in outs.values():
        out.mkdir()
    jobs = dict(zip(INTERRUPTS, submit_array(ex, [slurm_probes.StepJob(str(outs[n]), STEPS, STEP_S)
                                                  for n in INTERRUPTS])))
    for name, command in INTERRUPTS.items():
        steps = outs[name] / "steps.log"
        _wait(lambda: len(_lines(steps)) >= 3, f"{name} to make progress")
        subprocess.run([*command, jobs[name].job_id], check=True, capture_output=True)
    return {name: (jobs[name], outs[name]) for name in INTERRUPTS}


@pytest.mark.parametrize("name", list(INTERRUPTS))
def test_interrupted_job_resumes_from_disk_without_repeating_steps(interrupted, name):
    job, out = interrupted[name]
    assert job.result() == STEPS
    assert _lines(out / "steps.log") == [str(s) for s in range(STEPS)]  # each step once, in order
    starts = [line.split() for line in _lines(out / "starts.log")]
    assert len(starts) == 2, starts
    assert starts[0][0] == "0" and int(starts[1][0]) >= 3  # the second start found the steps on disk
    log = open(job.paths.stdout).read()
    if name.startswith("usr2"):
        assert "Caught signal SIGUSR2" in log and "Requeued job" in log  # submitit's checkpoint path
    else:
        assert "Caught signal" not in log and starts[1][2] == "1"  # restarted by SLURM, no signal


def test_cancelled_job_shows_as_cancelled_through_sacct(tmp_path, logs):
    out = tmp_path / "out"
    out.mkdir()
    ex = make_executor(logs, SlurmOptions(time_min=5, job_name="cpc-test-cancel"))
    (job,) = submit_array(ex, [slurm_probes.StepJob(str(out), 600, 1.0)])
    _wait(lambda: _lines(out / "steps.log"), "the job to start")
    subprocess.run(["scancel", job.job_id], check=True)
    _wait(lambda: job.state.upper().startswith("CANCELLED"), "sacct to report the cancellation", timeout=60)
    assert job.done()
