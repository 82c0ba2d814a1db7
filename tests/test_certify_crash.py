"""A shard killed with SIGKILL at random moments, then rerun, ends with exactly the counts of an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from cpcluster.core import runs
from cpcluster.orchestrate import rundir
from cpcluster.core.config import CertifyConfig
from cpcluster.core.journal import read_journal
from cpcluster.core.shards import read_shard
from cpcluster.jobs.certify import CertifyShardJob

KILLS = 6


def _config(run_dir):
    # one shard of 40 units (4 images x (selection + 9 blocks)), a few seconds of work on one CPU thread
    return CertifyConfig(sigma=0.5, run_dir=str(run_dir), num_shards=1, n0=20, n=450, block_size=50, draw_batch=10,
                         batch=50, max_images=4, denoiser="demo-random", classifier="demo-random", threads=1)


def _start(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cpcluster.jobs.certify", str(run_dir), "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _journal_units(journal):
    state = read_journal(journal)
    return [] if state is None else [tuple(int(v) for v in u) for u in state.units]


def _prepare(run_dir):
    """(config, shard URL, journal path, planned units) of a prepared one-shard run folder."""
    cfg = _config(run_dir)
    run = runs.resolve(cfg, runs.load_models(cfg))
    rundir.prepare_run_dir(run)
    url = run.shard_url(0)
    return cfg, url, url + ".journal", [tuple(int(v) for v in u) for u in run.plan.shard_units(0)]


def _uninterrupted(run_dir):
    """The shard of the same configuration, counted in one go in this process."""
    cfg = _prepare(run_dir)[0]
    return read_shard(CertifyShardJob(cfg, 0)())


def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_counts(tmp_path):
    cfg, url, journal, planned = _prepare(tmp_path / "killed")
    rng = random.Random(1234)
    kills, seen = 0, 0
    for round_ in range(KILLS):
        proc = _start(cfg.run_dir)
        # wait until this process has recorded a few more units (or, in round 0, only until it started counting)
        target = seen + (0 if round_ == 0 else rng.randint(1, 4))
        deadline = time.time() + 60
        while len(_journal_units(journal)) < target or not os.path.exists(journal):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the shard made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))  # a random moment: inside a forward, a journal append, or in between
        if proc.poll() is not None:
            break  # finished before the kill: nothing more to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        units = _journal_units(journal)
        assert units == planned[:len(units)], "recorded units are a prefix of the plan: none twice, none skipped"
        assert len(units) >= seen
        seen = len(units)
        assert not os.path.exists(url), "the shard is not complete while units are missing"
    assert kills >= 5 and 0 < seen < len(planned)
    proc = _start(cfg.run_dir)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    proc.stderr.close()
    killed = read_shard(url)
    assert killed.complete and not os.path.exists(journal)

    clean = _uninterrupted(tmp_path / "clean")
    assert killed.config_hash == clean.config_hash
    assert [tuple(u) for u in killed.units.tolist()] == planned
    np.testing.assert_array_equal(killed.units, clean.units)
    np.testing.assert_array_equal(killed.counts, clean.counts)
    assert killed.shard["resumed_units"] == seen


def test_sigterm_stops_the_shard_after_the_unit_in_progress_and_a_rerun_completes_it(tmp_path):
    """scancel's SIGTERM: the shard records the unit in progress and exits at once, not after SLURM's KillWait."""
    cfg, url, journal, planned = _prepare(tmp_path / "terminated")
    proc = _start(cfg.run_dir)
    deadline = time.time() + 60
    while len(_journal_units(journal)) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the shard made no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Stopped: shard 0: stopped by SIGTERM after" in err and "Traceback" not in err
    units = _journal_units(journal)
    assert 3 <= len(units) < len(planned) and units == planned[:len(units)]
    assert f"after {len(units)} recorded units" in err  # it stopped right after recording the last of them
    assert not os.path.exists(url)

    proc = _start(cfg.run_dir)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    proc.stderr.close()
    resumed = read_shard(url)
    assert resumed.shard["resumed_units"] == len(units)
    clean = _uninterrupted(tmp_path / "clean")
    np.testing.assert_array_equal(resumed.units, clean.units)
    np.testing.assert_array_equal(resumed.counts, clean.counts)


def test_sigterm_to_a_debug_run_is_one_error_line_and_the_same_command_resumes(tmp_path):
    args = [os.path.join(os.path.dirname(sys.executable), "cpcluster"), "certify", "--denoiser", "demo-random", "--classifier",
            "demo-random", "--max-images", "4", "--n0", "20", "--n", "450", "--block-size", "50", "--draw-batch",
            "10", "--batch", "50", "--sigma", "0.5", "--shards", "1", "--executor", "debug", "--out", str(tmp_path)]
    journal = tmp_path / "certify-consistency-sigma0.5" / "shard-00000-of-00001.h5.journal"
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(_journal_units(str(journal))) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == ("Error: stopped by SIGTERM; recorded units are kept: rerun the same "
                                             "command to resume")
    done = len(_journal_units(str(journal)))
    res = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert read_shard(str(journal)[:-len(".journal")]).shard["resumed_units"] == done
