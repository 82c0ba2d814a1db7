"""cpcluster.orchestrate.slurm without a cluster: array splitting, options -> submitit parameters, the rendered sbatch script
(golden file), the USR2 forwarding shell code, refused submissions (fake sbatch), and the job record file."""
import math
import multiprocessing
import os
import signal
import stat
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcluster.orchestrate.slurm import (FORWARD_USR2_SETUP, SlurmOptions, executor_parameters, make_executor,
                                         parse_sbatch_options)
from cpcluster.orchestrate.slurm_arrays import cluster_max_array_size, parse_max_array_size, submit_array
from cpcluster.orchestrate.slurm_dryrun import render_sbatch
from cpcluster.orchestrate.slurm_jobs import read_jobs, record_jobs
from cpcluster.sharding.arrays import split_array
from cpcluster.util.errors import InputError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "sbatch-array-split.txt")
SEPARATOR = "\n##### next sbatch script #####\n"
RICH = SlurmOptions(partition="gpu", account="proj42", qos="normal", time_min=240, gpus_per_task=1,
                    cpus_per_task=8, mem_gb=32, constraint="a100", array_parallelism=16,
                    extra=parse_sbatch_options(["mail-type=END", "--exclusive"]),
                    setup=("module load cuda/12.1", "export MALLOC_MMAP_MAX_=0"), python="python3",
                    job_name="cpc-certify")


# ------------------------------------------------------------------------------------------------ split_array
@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 5000), max_size=st.integers(1, 1200))
def test_split_array_covers_range_in_order_with_bounded_chunks(n, max_size):
    chunks = split_array(n, max_size)
    assert [i for c in chunks for i in c] == list(range(n))
    assert len(chunks) == math.ceil(n / max_size)
    assert all(1 <= len(c) <= max_size for c in chunks)
    assert all(len(c) == max_size for c in chunks[:-1])


@pytest.mark.parametrize("n, max_size", [(-1, 5), (3, 0), (2.0, 5), (True, 5), (3, None)])
def test_split_array_refuses_bad_sizes(n, max_size):
    with pytest.raises(InputError):
        split_array(n, max_size)


# ---------------------------------------------------------------------------------------------- MaxArraySize
SCONTROL = """Configuration data as of 2026-01-01T00:00:00
AccountingStorageType   = accounting_storage/slurmdbd
MaxArraySize            = 5
MaxJobCount             = 10000
"""


def _fake_bin(folder, name, body):
    path = os.path.join(folder, name)
    with open(path, "w") as fh:
        fh.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def test_parse_max_array_size():
    assert parse_max_array_size(SCONTROL) == 5
    assert parse_max_array_size(SCONTROL.replace("= 5", "= 40001")) == 40001
    assert parse_max_array_size("MaxJobCount = 10\n") is None


def test_cluster_max_array_size_reads_scontrol_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cluster_max_array_size() == 1001  # no scontrol at all
    _fake_bin(tmp_path, "scontrol", "".join(f"echo '{line}'\n" for line in SCONTROL.splitlines()))
    assert cluster_max_array_size() == 5
    _fake_bin(tmp_path, "scontrol", "echo 'slurm_load_ctl_conf error: Unable to contact slurm controller' >&2\nexit 1")
    assert cluster_max_array_size() == 1001
    _fake_bin(tmp_path, "scontrol", "echo 'MaxArraySize = 0'")
    assert cluster_max_array_size() == 1001


# --------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs", [
    {"time_min": 0}, {"nodes": 0}, {"cpus_per_task": -2}, {"gpus_per_task": 1.5}, {"array_parallelism": True},
    {"mem_gb": 0}, {"mem_gb": "8G"}, {"partition": ""}, {"qos": "a\nb"}, {"max_num_timeout": -1},
    {"setup": ("echo a\necho b",)}, {"extra": (("partition", "gpu"),)}, {"extra": (("array", "0-3"),)},
    {"extra": (("--mail-type", "END"),)}, {"extra": (("mail-type", 3),)},
])
def test_options_refuse_bad_values_with_input_error(kwargs):
    with pytest.raises(InputError):
        SlurmOptions(**kwargs)


def test_parse_sbatch_options():
    assert parse_sbatch_options(["mail-type=END", "--exclusive", "comment=a=b"]) == (
        ("mail-type", "END"), ("exclusive", True), ("comment", "a=b"))
    with pytest.raises(InputError, match="time_min"):
        parse_sbatch_options(["time=10"])


def test_executor_parameters_map_every_option():
    params = executor_parameters(RICH)
    assert params == {
        "name": "cpc-certify", "timeout_min": 240, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 8,
        "mem_gb": 32, "slurm_partition": "gpu", "slurm_account": "proj42", "slurm_qos": "normal",
        "slurm_gpus_per_task": 1, "slurm_constraint": "a100", "slurm_array_parallelism": 16,
        "slurm_signal_delay_s": 90, "slurm_additional_parameters": {"mail-type": "END", "exclusive": True},
        "slurm_setup": [*FORWARD_USR2_SETUP, "module load cuda/12.1", "export MALLOC_MMAP_MAX_=0"],
    }
    bare = executor_parameters(SlurmOptions(forward_usr2=False))
    assert "slurm_setup" not in bare and "slurm_partition" not in bare and "mem_gb" not in bare


def test_parameters_are_accepted_by_a_real_local_auto_executor(tmp_path):
    ex = make_executor(tmp_path / "logs", RICH, cluster="local")
    assert ex.cluster == "local"
    assert ex._executor.parameters["timeout_min"] == 240  # generic ones reach the local backend


def test_make_executor_refuses_slurm_without_srun_and_unknown_clusters(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="srun"):
        make_executor(tmp_path / "logs", SlurmOptions(), cluster="slurm")
    with pytest.raises(InputError, match="unknown"):
        make_executor(tmp_path / "logs", SlurmOptions(), cluster="kubernetes")


# ------------------------------------------------------------------------------------------- rendered script
def test_rendered_scripts_match_golden_file():
    scripts = render_sbatch(RICH, n_tasks=12, folder="/shared/runs/demo/slurm/%j", max_array_size=5)
    text = SEPARATOR.join(scripts)
    if os.environ.get("CPCLUSTER_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as fh:
            fh.write(text)
    with open(GOLDEN) as fh:
        assert text == fh.read(), "sbatch script changed; rerun with CPCLUSTER_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("nodes, tasks, kills", [(2, 1, True), (1, 2, True), (1, 1, False), (None, None, False)])
def test_multi_task_jobs_end_when_one_task_fails(nodes, tasks, kills):
    (script,) = render_sbatch(SlurmOptions(nodes=nodes, tasks_per_node=tasks, python="python3"), 1, "/runs/x/%j",
                              max_array_size=5)
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert ("--kill-on-bad-exit=1" in srun) == kills, srun


@pytest.mark.parametrize("n, max_size, parallelism", [(12, 5, 16), (3, 1001, 2), (7, 3, 2), (1, 5, None)])
def test_rendered_arrays_follow_the_split_and_keep_the_throttle(n, max_size, parallelism):
    opts = SlurmOptions(array_parallelism=parallelism, python="python3")
    scripts = render_sbatch(opts, n, "/runs/x/%j", max_array_size=max_size)
    chunks = split_array(n, max_size)
    assert len(scripts) == len(chunks)
    running = 0
    for script, chunk in zip(scripts, chunks):
        arrays = [line for line in script.splitlines() if line.startswith("#SBATCH --array=")]
        if len(chunk) == 1:
            assert arrays == []  # submitit submits a one-task chunk as a plain job
            running += 1
            continue
        (line,) = arrays
        spec, throttle = line.split("=", 1)[1].split("%")
        assert spec == f"0-{len(chunk) - 1}"
        running += int(throttle)
        assert int(throttle) <= len(chunk)
    bound = parallelism if parallelism is not None else 256 * len(chunks)
    assert running <= max(bound, len(chunks))


def test_rendered_script_is_what_submitit_submits(tmp_path, monkeypatch):
    """With fake sbatch/srun, the file submitit hands to sbatch equals render_sbatch's text, array by array."""
    bin_dir, seen = tmp_path / "bin", tmp_path / "seen"
    bin_dir.mkdir(), seen.mkdir()
    _fake_bin(bin_dir, "srun", "exit 0")
    _fake_bin(bin_dir, "sbatch",
              f'n=$(ls {seen} | wc -l); cp "$1" {seen}/$n.sh; echo "Submitted batch job $((100 + n))"')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    opts = SlurmOptions(array_parallelism=4, setup=("export A=1",), python="python3")
    ex = make_executor(tmp_path / "logs" / "%j", opts)
    jobs = submit_array(ex, [_Noop(i) for i in range(7)], max_array_size=3)
    assert [j.job_id for j in jobs] == ["100_0", "100_1", "100_2", "101_0", "101_1", "101_2", "102"]
    sent = [(seen / f"{k}.sh").read_text() for k in range(3)]
    assert sent == render_sbatch(opts, 7, tmp_path / "logs" / "%j", max_array_size=3)
    assert "#SBATCH --array=0-2%1" in sent[0]  # 4 running tasks spread over 3 arrays
    assert ex._executor.parameters["array_parallelism"] == 4  # restored after submission


class _Noop:
    def __init__(self, i):
        self.i = i

    def __call__(self):
        return self.i


def test_refused_sbatch_is_one_line_input_error_and_leaves_nothing(tmp_path, monkeypatch, capfd):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir(), state.mkdir()
    _fake_bin(bin_dir, "srun", "exit 0")
    _fake_bin(bin_dir, "scancel", f'echo "$@" >> {state}/scancel')
    _fake_bin(bin_dir, "sbatch", f"""n=$(ls {state} | grep -c ok); if [ "$n" -ge 1 ]; then
  echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2
  echo 'sbatch: error: Batch job submission failed: Job violates accounting/QOS policy' >&2; exit 1; fi
touch {state}/ok$n; echo "Submitted batch job 7" """)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    logs = tmp_path / "logs"
    ex = make_executor(logs / "%j", SlurmOptions(python="python3"))
    with pytest.raises(InputError) as info:
        submit_array(ex, [_Noop(i) for i in range(5)], max_array_size=3)
    message = str(info.value)
    assert "\n" not in message
    assert "QOSMaxSubmitJobPerUserLimit; sbatch: error: Batch job submission failed: Job violates" in message
    assert "array 2 of 2" in message
    assert (state / "scancel").read_text().split() == ["7"]  # the array that did go in was cancelled
    leftovers = [n for n in os.listdir(logs) if n.endswith((".pkl", ".sh")) and not os.path.islink(logs / n)]
    assert leftovers == []
    assert "QOSMax" not in capfd.readouterr().err  # submitit's own stderr dump was swallowed


# ------------------------------------------------------------------------------------------ USR2 forwarding
def _forwarding_shell(tmp_path, exit_code):
    """A batch-like script: the forwarding setup, then `srun` (a fake that records USR2 and exits)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake_bin(bin_dir, "srun", f"""trap 'echo usr2 >> {tmp_path}/got; exit {exit_code}' USR2
echo ready > {tmp_path}/ready
i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; exit 99""")
    script = tmp_path / "batch.sh"
    script.write_text("\n".join(["#!/bin/bash", *FORWARD_USR2_SETUP, "srun --unbuffered python -c pass", ""]))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.Popen(["bash", str(script)], env=env)


def _wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("exit_code", [0, 3])
def test_usr2_to_the_batch_shell_reaches_srun_and_its_status_is_kept(tmp_path, exit_code):
    proc = _forwarding_shell(tmp_path, exit_code)
    _wait_for(tmp_path / "ready")
    # What `scancel --batch --signal=USR2` does. The fake srun writes "ready" as soon as it runs, which on a loaded
    # machine can be before the shell has recorded its pid; a USR2 then is ignored by the shell (it survives, as it
    # must) and the signal is sent again, as SLURM's repeated checkpoint signals would.
    deadline = time.monotonic() + 30
    while proc.poll() is None and not (tmp_path / "got").exists() and time.monotonic() < deadline:
        proc.send_signal(signal.SIGUSR2)
        time.sleep(0.5)
    assert proc.wait(timeout=30) == exit_code  # the shell survived the signal and returns srun's status
    assert (tmp_path / "got").read_text() == "usr2\n"


def test_without_forwarding_usr2_kills_the_batch_shell(tmp_path):
    script = tmp_path / "plain.sh"
    script.write_text(f"#!/bin/bash\necho ready > {tmp_path}/ready\nsleep 60\n")
    proc = subprocess.Popen(["bash", str(script)])
    _wait_for(tmp_path / "ready")
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=30) == -signal.SIGUSR2  # why FORWARD_USR2_SETUP exists


# ----------------------------------------------------------------------------------------------- job records
def _jobs(folder, ids):
    from submitit.slurm.slurm import SlurmJob

    return [SlurmJob(folder=folder, job_id=i) for i in ids]


def test_record_and_read_jobs(tmp_path):
    run = str(tmp_path / "run")
    first = record_jobs(run, _jobs(tmp_path / "logs" / "%j", ["12_0", "12_1"]), tags=[{"shard": 0}, {"shard": 1}])
    record_jobs(run, _jobs(tmp_path / "logs", ["13"]), tags=[{"shard": 2, "sigma": 0.5}])
    records = read_jobs(run)
    assert records[:2] == first
    assert [(r["job_id"], r["array_job_id"], r["array_task"], r["shard"]) for r in records] == [
        ("12_0", "12", 0, 0), ("12_1", "12", 1, 1), ("13", None, None, 2)]
    assert records[2]["sigma"] == 0.5 and records[0]["backend"] == "slurm"
    assert records[0]["log_folder"] == str(tmp_path / "logs" / "12_0")
    assert read_jobs(str(tmp_path / "elsewhere")) == []
    with pytest.raises(ValueError):
        record_jobs(run, _jobs(tmp_path / "logs", ["14"]), tags=[])


def _append_many(run, worker):
    for k in range(15):
        record_jobs(run, _jobs("/tmp/logs", [f"{worker}_{k}"]))


def test_concurrent_writers_lose_no_record(tmp_path):
    run = str(tmp_path / "run")
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(run, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = sorted(r["job_id"] for r in read_jobs(run))
    assert ids == sorted(f"{w}_{k}" for w in range(4) for k in range(15))


def test_job_records_on_fsspec_url_and_damaged_file():
    run = "memory://cpcluster-slurm-test/run"
    record_jobs(run, _jobs("/tmp/logs", ["5"]))
    assert [r["job_id"] for r in read_jobs(run)] == ["5"]
    import fsspec

    with fsspec.open(run + "/jobs.jsonl", "ab") as fh:
        fh.write(b"{not json\n")
    with pytest.raises(InputError, match="line 2"):
        read_jobs(run)
