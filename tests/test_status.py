"""cpcluster.orchestrate.status and cpcluster.orchestrate.slurm_jobs without a cluster: shard states from real run folders (files,
journals, locks), SLURM's view from a fake squeue/sacct on PATH, the state table, speed and ETA."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.shard_writer import ShardWriter
from cpcluster.core.shards import read_shard, shard_name
from cpcluster.orchestrate.shard_files import ShardFiles
from cpcluster.orchestrate.slurm_jobs import (JobState, expand_job_id, parse_sacct, parse_squeue, query_job_states,
                                              record_jobs)
from cpcluster.orchestrate.status import RESUBMITTABLE, STATES, collect, decide, load_run, resubmittable
from cpcluster.orchestrate.status_report import format_duration, format_status
from cpcluster.util.errors import InputError

SMALL = ["--denoiser", "demo-random", "--classifier", "demo-random", "--max-images", "5", "--n0", "20",
         "--n", "200", "--block-size", "100", "--draw-batch", "20", "--batch", "100", "--device", "cpu"]
SHARDS = 5
NAME = "certify-consistency-sigma0.5"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A complete 5-shard run folder (debug executor), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("reference")
    res = CliRunner().invoke(main, ["certify", *SMALL, "--sigma", "0.5", "--shards", str(SHARDS), "--executor",
                                    "debug", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return str(out / NAME)


@pytest.fixture
def run_dir(reference, tmp_path):
    path = str(tmp_path / NAME)
    shutil.copytree(reference, path)
    return path


def shard_path(run_dir, k):
    return os.path.join(run_dir, shard_name(k, SHARDS))


def make_partial(run_dir, k, units, start_time=None):
    """Turn finished shard ``k`` back into an interrupted one: its first ``units`` units in a journal, no file."""
    shard = read_shard(shard_path(run_dir, k))
    os.remove(shard_path(run_dir, k))
    info = {**shard.shard, "start_time": time.time() if start_time is None else start_time}
    writer = ShardWriter(shard_path(run_dir, k), config=shard.config, shard_info=info,
                         image_index=shard.image_index, labels=shard.labels,
                         num_classes=shard.config["num_classes"])
    for unit, counts in list(zip(shard.units, shard.counts))[:units]:
        writer.append(unit, counts)
    writer.close()
    return shard, writer.journal_path


@pytest.fixture
def lock_holder():
    """Start a process that holds a shard's lock (what CertifyShardJob does while it runs)."""
    procs = []

    def hold(path):
        code = ("import fcntl, sys; fh = open(sys.argv[1], 'a'); fcntl.flock(fh, fcntl.LOCK_EX); "
                "print('locked', flush=True); sys.stdin.read()")
        proc = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=10)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``squeue``/``sacct`` on PATH answering from files; every call is logged with its arguments."""
    bin_dir, state = tmp_path / "fakebin", tmp_path / "fakestate"
    bin_dir.mkdir()
    state.mkdir()
    for tool in ("squeue", "sacct"):
        script = bin_dir / tool
        script.write_text(f"""#!/bin/sh
printf "%s\\n" "$*" >> {state}/{tool}.calls
[ -f {state}/{tool}.err ] && cat {state}/{tool}.err >&2
[ -f {state}/{tool}.out ] && cat {state}/{tool}.out
exit $(cat {state}/{tool}.rc 2>/dev/null || echo 0)
""")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    class Fake:
        def answer(self, tool, out="", rc=0, err=""):
            (state / f"{tool}.out").write_text(out)
            (state / f"{tool}.rc").write_text(str(rc))
            (state / f"{tool}.err").write_text(err)

        def calls(self, tool):
            path = state / f"{tool}.calls"
            return path.read_text().splitlines() if path.exists() else []

    fake = Fake()
    fake.answer("squeue")
    fake.answer("sacct")
    return fake


class FakeJob:
    def __init__(self, job_id, folder="/logs"):
        self.job_id = job_id
        self.paths = type("Paths", (), {"folder": folder})()


SlurmJob = type("SlurmJob", (FakeJob,), {})  # record_jobs names the backend after the class: "slurm"


def record(run_dir, shards, array="500", submitted_at=None):
    records = record_jobs(run_dir, [SlurmJob(f"{array}_{k}") for k in shards],
                          [{"shard": k, "sigma": 0.5} for k in shards])
    if submitted_at is not None:  # age the records
        path = os.path.join(run_dir, "jobs.jsonl")
        lines = [json.loads(line) for line in open(path)]
        for line in lines:
            if line["job_id"] in {r["job_id"] for r in records}:
                line["submitted_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(submitted_at))
        with open(path, "w") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)


def states(status):
    return [s.state for s in status.shards]


# ------------------------------------------------------------------------------------------ files only
def test_complete_run_reads_as_complete_with_the_shards_own_speed(run_dir):
    (status,) = collect([run_dir])
    assert states(status) == ["complete"] * SHARDS and status.slurm == "unused"
    for row in status.shards:
        shard = read_shard(shard_path(run_dir, row.index))
        assert row.draws_done == row.draws_planned == int(shard.units[:, 3].sum())
        assert row.units_done == row.units_planned == len(shard.units)
        assert row.draws_per_s == pytest.approx(shard.shard["draws_per_s"])
    assert status.draws_done == json.load(open(os.path.join(run_dir, "run.json")))["total_draws"]
    assert status.eta_s == 0 and not status.failed and resubmittable(status) == []


def test_states_from_files_journals_and_locks(run_dir, reference, lock_holder, tmp_path):
    shard1, _ = make_partial(run_dir, 1, units=2, start_time=time.time() - 50)
    shard2, journal2 = make_partial(run_dir, 2, units=1, start_time=time.time() - 10)
    os.utime(journal2, (time.time(), time.time()))
    lock_holder(journal2 + ".lock")
    os.remove(shard_path(run_dir, 3))
    # shard 4: a file of another configuration (another seed)
    other = tmp_path / "other"
    res = CliRunner().invoke(main, ["certify", *SMALL, "--sigma", "0.5", "--shards", str(SHARDS), "--seed", "7",
                                    "--executor", "debug", "--out", str(other)], catch_exceptions=False)
    assert res.exit_code == 0
    shutil.copy(other / NAME / shard_name(4, SHARDS), shard_path(run_dir, 4))

    (status,) = collect([run_dir])
    assert states(status) == ["complete", "partial", "running", "missing", "failed"]
    rows = status.shards
    assert rows[1].units_done == 2 and rows[1].draws_done == int(shard1.units[:2, 3].sum())
    assert rows[2].units_done == 1 and rows[2].draws_done == int(shard2.units[:1, 3].sum())
    assert rows[2].detail == "lock held on this machine"
    assert "another run configuration" in rows[4].detail and rows[4].draws_done == 0
    # speed of a journal: its draws over creation -> last write; the ETA runs on the running shards only
    journal1 = shard_path(run_dir, 1) + ".journal"
    start1 = json.loads(read_journal_header(journal1))["shard"]["start_time"]
    assert rows[1].draws_per_s == pytest.approx(rows[1].draws_done / (os.path.getmtime(journal1) - start1))
    assert status.draws_per_s == pytest.approx(rows[2].draws_per_s)
    left = sum(r.draws_planned - r.draws_done for r in rows)
    assert status.eta_s == pytest.approx(left / rows[2].draws_per_s)
    assert resubmittable(status) == [1, 3, 4]
    text = format_status(status)
    assert "failed: shard 4 (shard file of another run configuration)" in text
    assert f"cpcluster resubmit {run_dir}" in text


def test_speed_of_a_resumed_shard_counts_only_its_current_session(run_dir):
    """Requeued after an hour in the queue: the speed is the new session's draws over its own time, as written in
    the lock file by the job, not the journal's draws since the first start."""
    shard, journal = make_partial(run_dir, 1, units=3, start_time=time.time() - 3600)
    before = int(shard.units[:1, 3].sum())  # the first session recorded one unit, this one the next two
    now = time.time()
    with open(journal + ".lock", "w") as fh:
        json.dump({"start_time": now - 10, "draws_at_start": before, "host": "n1", "pid": 1}, fh)
    os.utime(journal, (now, now))
    (status,) = collect([run_dir], use_slurm=False)
    row = status.shards[1]
    assert row.draws_done == int(shard.units[:3, 3].sum())
    assert row.draws_per_s == pytest.approx((row.draws_done - before) / 10, rel=1e-3)
    with open(journal + ".lock", "w") as fh:  # a session that has recorded nothing yet has no speed
        json.dump({"start_time": now - 10, "draws_at_start": row.draws_done}, fh)
    (status,) = collect([run_dir], use_slurm=False)
    assert status.shards[1].draws_per_s is None


def test_a_running_shard_writes_its_session_into_the_lock_file(tmp_path):
    """What the status reads: the job's own note of when this session started and what was recorded before."""
    from cpcluster.jobs.certify import _note_session, _shard_lock

    journal = str(tmp_path / "shard.h5.journal")
    with _shard_lock(journal) as lock:
        lock.write("stale text of a killed session")
        lock.flush()
        _note_session(lock, draws_at_start=1234)
        with open(journal + ".lock") as fh:
            session = json.load(fh)
    assert session["draws_at_start"] == 1234 and abs(session["start_time"] - time.time()) < 60
    assert not os.path.exists(journal + ".lock")


def read_journal_header(path):
    from cpcluster.core.journal import read_journal

    return json.dumps(read_journal(path).header)


def test_damaged_and_incomplete_shard_files_are_failed(run_dir):
    with open(shard_path(run_dir, 0), "r+b") as fh:
        fh.truncate(100)
    (status,) = collect([run_dir])
    assert status.shards[0].state == "failed" and "unreadable" in status.shards[0].detail


@pytest.mark.parametrize("content, message", [(None, "no run.json"), ("[1]", "run record is damaged"),
                                              ('{"certify_config": {}}', "cannot be read as a certify run")])
def test_folders_without_a_readable_run_record_are_refused(tmp_path, content, message):
    if content is not None:
        (tmp_path / "run.json").write_text(content)
    with pytest.raises(InputError, match=message):
        load_run(str(tmp_path))


def test_run_record_whose_plan_disagrees_with_its_totals_is_refused(run_dir):
    path = os.path.join(run_dir, "run.json")
    record = json.load(open(path))
    record["total_draws"] += 1
    json.dump(record, open(path, "w"))
    with pytest.raises(InputError, match="does not match its own totals"):
        load_run(run_dir)


# ------------------------------------------------------------------------------------------ with SLURM
SQUEUE = "500_0|COMPLETED|None\n500_1|RUNNING|None\n500_2|PENDING|JobArrayTaskLimit\n500_3|COMPLETING|None\n"
SACCT = "500_0|COMPLETED|0:0\n500_4|CANCELLED by 0|0:15\n500_1|FAILED|1:0\n"


def test_slurm_states_refine_the_file_states(run_dir, fake_slurm):
    for k in (1, 2, 3):
        os.remove(shard_path(run_dir, k))
    make_partial(run_dir, 4, units=1)
    record(run_dir, range(SHARDS))
    fake_slurm.answer("squeue", SQUEUE)
    fake_slurm.answer("sacct", SACCT)
    (status,) = collect([run_dir])
    assert status.slurm == "reachable"
    # squeue outranks sacct (500_1 is RUNNING, not FAILED); the cancelled shard keeps its recorded units
    assert states(status) == ["complete", "running", "pending", "running", "failed"]
    assert [s.slurm_state for s in status.shards] == ["COMPLETED", "RUNNING", "PENDING", "COMPLETING", "CANCELLED"]
    assert status.shards[2].detail == "JobArrayTaskLimit"
    assert status.shards[4].detail == "job 500_4 CANCELLED (0:15)" and status.shards[4].units_done == 1
    assert resubmittable(status) == [4]
    # squeue is asked for the array, sacct only for what squeue did not know
    assert fake_slurm.calls("squeue") == ["-h -r -t all -o %i|%T|%r -j 500"]
    assert fake_slurm.calls("sacct") == ["-n -X -P -o JobID,State,ExitCode -j 500"]

    res = CliRunner().invoke(main, ["status", run_dir])
    assert res.exit_code == 1, res.output
    assert "failed: shard 4 (job 500_4 CANCELLED (0:15))" in res.output
    assert "1 complete, 2 running, 1 pending, 1 failed" in res.output


def test_the_latest_job_of_a_shard_decides(run_dir, fake_slurm):
    os.remove(shard_path(run_dir, 4))
    record(run_dir, [4], array="500")
    record(run_dir, [4], array="501")  # resubmitted
    fake_slurm.answer("squeue", "500_4|CANCELLED|None\n501_4|PENDING|Priority\n")
    (status,) = collect([run_dir])
    assert status.shards[4].state == "pending" and status.shards[4].job_id == "501_4"


def test_completed_job_without_its_file_is_failed(run_dir, fake_slurm):
    os.remove(shard_path(run_dir, 0))
    record(run_dir, [0])
    fake_slurm.answer("squeue", "500_0|COMPLETED|None\n")
    (status,) = collect([run_dir])
    assert status.shards[0].state == "failed" and "COMPLETED without writing" in status.shards[0].detail


def test_jobs_unknown_to_slurm_are_pending_during_the_grace_period_then_failed(run_dir, fake_slurm):
    for k in (0, 1):
        os.remove(shard_path(run_dir, k))
    record(run_dir, [0])
    record(run_dir, [1], array="400", submitted_at=time.time() - 3600)
    fake_slurm.answer("squeue", "", rc=1, err="slurm_load_jobs error: Invalid job id specified\n")
    (status,) = collect([run_dir])
    assert status.slurm == "reachable"
    assert states(status)[:2] == ["pending", "failed"]
    assert "not visible in SLURM yet" in status.shards[0].detail
    assert "gone from SLURM" in status.shards[1].detail
    later = collect([run_dir], now=time.time() + 3600)[0]
    assert states(later)[:2] == ["failed", "failed"]


def test_unreachable_slurm_leaves_the_file_states(run_dir, fake_slurm, lock_holder):
    os.remove(shard_path(run_dir, 0))
    _, journal = make_partial(run_dir, 1, units=1)
    _, journal2 = make_partial(run_dir, 2, units=1)
    lock_holder(journal2 + ".lock")
    record(run_dir, [0, 1, 2])
    fake_slurm.answer("squeue", "", rc=1, err="slurm_load_jobs error: Unable to contact slurm controller\n")
    (status,) = collect([run_dir])
    assert status.slurm == "unreachable"
    assert states(status)[:3] == ["pending", "partial", "running"]
    assert all("SLURM not reachable" in s.detail for s in status.shards[:2])
    assert not status.failed and resubmittable(status) == [1]
    assert collect([run_dir], use_slurm=False)[0].slurm == "unused"
    assert fake_slurm.calls("sacct") == []


# ------------------------------------------------------------------------------------------ decide
NOW = 1_000_000.0
FRESH = {"job_id": "9_1", "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 10))}
OLD = {"job_id": "9_1", "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 1000))}
NONE, JOURNAL, LOCKED = ShardFiles("none"), ShardFiles("journal", 1, 10), ShardFiles("journal", 1, 10, locked=True)


@pytest.mark.parametrize("files, rec, job, queried, expected", [
    (ShardFiles("complete", 2, 20), OLD, JobState("9_1", "CANCELLED"), True, "complete"),  # the file wins
    (ShardFiles("bad", detail="x"), None, None, False, "failed"),
    (NONE, OLD, JobState("9_1", "RUNNING"), True, "running"),
    (NONE, OLD, JobState("9_1", "REQUEUED"), True, "pending"),
    (JOURNAL, OLD, JobState("9_1", "PENDING"), True, "pending"),
    (JOURNAL, OLD, JobState("9_1", "TIMEOUT"), True, "failed"),
    (NONE, OLD, JobState("9_1", "NODE_FAIL"), True, "failed"),
    (NONE, OLD, JobState("9_1", "OUT_OF_MEMORY"), True, "failed"),
    (NONE, OLD, JobState("9_1", "COMPLETED"), True, "failed"),
    (LOCKED, OLD, JobState("9_1", "CANCELLED"), True, "running"),  # rerun here since, e.g. --executor local
    (NONE, FRESH, None, True, "pending"),
    (NONE, OLD, None, True, "failed"),
    (LOCKED, OLD, None, True, "running"),
    (NONE, OLD, None, False, "pending"),
    (JOURNAL, OLD, None, False, "partial"),
    (JOURNAL, None, None, True, "partial"),
    (LOCKED, None, None, False, "running"),
    (NONE, None, None, True, "missing"),
])
def test_decide(files, rec, job, queried, expected):
    state, _ = decide(files, rec, job, queried, NOW)
    assert state == expected and state in STATES
    assert (state in RESUBMITTABLE) == (state in ("failed", "missing", "partial"))


# ------------------------------------------------------------------------------------------ parsing
def test_job_ids_in_folded_array_form_expand():
    assert expand_job_id("125_[2-4%2]") == ["125_2", "125_3", "125_4"]
    assert expand_job_id("125_[2,4,7-8]") == ["125_2", "125_4", "125_7", "125_8"]
    assert expand_job_id("125_3") == ["125_3"] and expand_job_id(" 126 ") == ["126"]


def test_parse_real_squeue_and_sacct_output():
    # captured on the project's test cluster (slurm 22.05): squeue -h -r -t all -o '%i|%T|%r', sacct -n -X -P
    squeue = parse_squeue("125_2|PENDING|JobArrayTaskLimit\n125_0|RUNNING|None\n126|CANCELLED|None\n")
    assert squeue["125_2"] == JobState("125_2", "PENDING", "JobArrayTaskLimit", "squeue")
    assert squeue["126"].state == "CANCELLED"
    sacct = parse_sacct("126|CANCELLED by 0|0:0\n125_0|RUNNING|0:0\n125_[2,4%2]|PENDING|0:0\n"
                        "127.batch|FAILED|1:0\n128+0|FAILED|1:0\n127|FAILED|1:0\n")
    assert sacct["126"] == JobState("126", "CANCELLED", "0:0", "sacct")
    assert sorted(sacct) == ["125_0", "125_2", "125_4", "126", "127"]


def test_query_job_states(fake_slurm):
    assert query_job_states([]) == {}
    fake_slurm.answer("squeue", "7_0|RUNNING|None\n")
    fake_slurm.answer("sacct", "7_0|FAILED|1:0\n7_1|TIMEOUT|0:0\n8|COMPLETED|0:0\n")
    got = query_job_states(["7_0", "7_1", "8", "9"])
    assert {k: v.state for k, v in got.items()} == {"7_0": "RUNNING", "7_1": "TIMEOUT", "8": "COMPLETED"}
    assert fake_slurm.calls("squeue")[-1].endswith("-j 7,8,9")
    assert fake_slurm.calls("sacct")[-1].endswith("-j 7,8,9")
    fake_slurm.answer("squeue", "", rc=1, err="Unable to contact slurm controller")
    assert query_job_states(["7_0"]) is None
    fake_slurm.answer("squeue", "7_0|PENDING|Priority\n")
    fake_slurm.answer("sacct", "", rc=1, err="Slurm accounting storage is disabled")
    assert {k: v.state for k, v in query_job_states(["7_0", "7_1"]).items()} == {"7_0": "PENDING"}


def test_format_duration():
    assert [format_duration(s) for s in (None, 0, 59.6, 75, 3600 * 2 + 61, 90000)] == [
        "unknown", "0s", "1m 0s", "1m 15s", "2h 1m", "1d 1h"]


def test_large_runs_list_only_their_unfinished_shards_unless_all():
    from cpcluster.orchestrate.status import RunStatus, ShardStatus

    rows = tuple(ShardStatus(k, "complete" if k != 41 else "running", 2 if k != 41 else 1, 2, 200 if k != 41 else 50,
                             200, 100.0, f"7_{k}", None, "") for k in range(48))
    status = RunStatus("/runs/r", "ab" * 32, 0.5, rows, "reachable")
    short, full = format_status(status), format_status(status, all_shards=True)
    table = [line for line in short.splitlines() if line.lstrip()[:1].isdigit()]
    assert [line.split()[0] for line in table] == ["41"]
    assert "(47 complete shards not listed; --all lists them)" in short
    assert len([line for line in full.splitlines() if line.lstrip()[:1].isdigit()]) == 48
    assert "47 complete, 1 running; draws 9,450/9,600 (98.4%); 100 draws/s; ETA 2s" in short
    assert status.eta_s == pytest.approx(150 / 100.0)
