"""The certify shard job: pickling, checkpoint, resume rules, locking, refusal of foreign files."""
import dataclasses
import fcntl
import os
import pickle

import cloudpickle
import numpy as np
import pytest

from cpcluster.core import runs
from cpcluster.orchestrate import rundir
from cpcluster.sharding.plan import select_images
from cpcluster.core.config import CertifyConfig
from cpcluster.core.journal import read_journal
from cpcluster.core.shard_writer import ShardWriter
from cpcluster.core.shards import read_shard
from cpcluster.jobs.certify import CertifyShardJob, tune_allocator
from cpcluster.util.errors import InputError


def config(run_dir, **kw):
    base = dict(sigma=0.5, run_dir=str(run_dir), num_shards=2, n0=20, n=100, block_size=50, draw_batch=10,
                batch=50, max_images=3, denoiser="demo-random", classifier="demo-random", threads=1)
    return CertifyConfig(**{**base, **kw})


def prepared(cfg):
    run = runs.resolve(cfg, runs.load_models(cfg))
    rundir.prepare_run_dir(run)
    return run


def test_job_pickles_and_checkpoint_resubmits_the_same_shard(tmp_path):
    job = CertifyShardJob(config(tmp_path), 1)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads)):
        back = loads(dumps(job))
        assert type(back) is CertifyShardJob and back.config == job.config and back.shard_index == 1
    delayed = job.checkpoint()
    again = pickle.loads(cloudpickle.dumps(delayed))
    assert isinstance(again.function, CertifyShardJob) and again.function is not job
    assert again.function.config == job.config and again.function.shard_index == 1 and not again.args


def test_finished_shard_is_a_noop_and_resume_keeps_recorded_units(tmp_path):
    cfg = config(tmp_path / "a")
    run = prepared(cfg)
    # a shard whose journal already holds its first unit, with made-up counts: a rerun must keep them as they are
    first = run.plan.shard_units(0)[0]
    fake = np.zeros(10, dtype=np.int64)
    fake[7] = first[3]
    images = run.plan.shard_images(0)
    w = ShardWriter(run.shard_url(0), config=run.shard_config, shard_info={"rng_device": "cuda"},
                    image_index=images, labels=run.labels[:len(images)], num_classes=10)
    w.append(first, fake)
    w.close()
    url = CertifyShardJob(cfg, 0)()
    shard = read_shard(url)
    assert shard.complete and shard.shard["resumed_units"] == 1
    assert shard.shard["rng_device"] == "mixed", "started on a GPU, finished on the CPU"
    np.testing.assert_array_equal(shard.units, run.plan.shard_units(0))
    np.testing.assert_array_equal(shard.counts[0], fake)
    stamp = os.stat(url).st_mtime_ns
    assert CertifyShardJob(cfg, 0)() == url and os.stat(url).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path / "a")) == ["run.json", "shard-00000-of-00002.h5"]


def test_job_refuses_a_foreign_run_and_a_shard_in_use(tmp_path):
    cfg = config(tmp_path / "b")
    run = prepared(cfg)
    other = dataclasses.replace(cfg, seed=5)
    with pytest.raises(InputError, match="run.json describes another run"):
        CertifyShardJob(other, 0)()
    with pytest.raises(InputError, match="run.json describes another run"):
        CertifyShardJob(dataclasses.replace(cfg, num_shards=3), 0)()
    journal = run.shard_url(1) + ".journal"
    with open(journal + ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another process is running this shard"):
            CertifyShardJob(cfg, 1)()
    assert read_journal(journal) is None and not os.path.exists(run.shard_url(1))
    assert CertifyShardJob(cfg, 1)() == run.shard_url(1)


def test_batch_and_threads_do_not_enter_the_run_identity(tmp_path):
    cfg = config(tmp_path / "c")
    models = runs.load_models(cfg)
    a = runs.resolve(cfg, models)
    b = runs.resolve(dataclasses.replace(cfg, batch=20, threads=2, num_shards=3, run_dir="elsewhere"), models)
    assert a.config_hash == b.config_hash
    c = runs.resolve(dataclasses.replace(cfg, draw_batch=25, block_size=50), models)
    assert c.config_hash != a.config_hash, "draw_batch fixes the noise, so it is part of the run"


def test_image_selection_follows_cohen_skip():
    np.testing.assert_array_equal(select_images(100, skip=20), [0, 20, 40, 60, 80])
    np.testing.assert_array_equal(select_images(100, skip=20, max_images=2), [0, 20])
    np.testing.assert_array_equal(select_images(10, skip=2, indices=[9, 1, 4, 7]), [9, 4])
    with pytest.raises(InputError, match="outside"):
        select_images(10, indices=[10])


def test_allocator_tuning_applies_on_glibc():
    assert tune_allocator() in (True, False)
    if os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") or os.path.exists("/usr/lib/x86_64-linux-gnu/libc.so.6"):
        assert tune_allocator()


def test_fsspec_run_directory_end_to_end_and_overwrite_clears_scratch_journals(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cpcluster.cli import main
    from cpcluster.core.journal import journal_path
    from cpcluster.core.shards import expand_paths

    monkeypatch.setenv("CPCLUSTER_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    out = "memory://cpc-certify-test/out"
    args = ["certify", "--sigma", "0.5", "--denoiser", "demo-random", "--classifier", "demo-random",
            "--max-images", "2", "--n0", "10", "--n", "40", "--block-size", "20", "--draw-batch", "10",
            "--batch", "40", "--shards", "2", "--executor", "debug", "--out", out]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    files = expand_paths([out + "/certify-consistency-sigma0.5"])
    assert len(files) == 2 and all(read_shard(f).complete for f in files)

    cfg = config(out + "/other", num_shards=2)
    run = prepared(cfg)
    w = ShardWriter(run.shard_url(1), config=run.shard_config, shard_info={}, image_index=[2], labels=[0],
                    num_classes=10)
    w.close()
    journal = journal_path(run.shard_url(1), None)
    assert os.path.exists(journal) and journal.startswith(str(tmp_path / "scratch"))
    changed = runs.resolve(dataclasses.replace(cfg, seed=9), runs.load_models(cfg))
    with pytest.raises(InputError, match="different seed"):
        rundir.prepare_run_dir(changed)
    assert os.path.exists(journal)
    assert rundir.prepare_run_dir(changed, overwrite=True) == "overwrite"
    assert not os.path.exists(journal)
    assert CertifyShardJob(dataclasses.replace(cfg, seed=9), 1)() == run.shard_url(1)
