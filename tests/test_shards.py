"""The shard file contract (DESIGN.md section 4): journal-backed writer, atomic finish, checked reader."""
import os

import h5py
import numpy as np
import pytest

from cpcluster.core.journal import read_journal
from cpcluster.core.shard_writer import ShardWriter
from cpcluster.core.shards import expand_paths, read_shard
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import config_hash

CFG = {"sigma": 0.5, "num_classes": 3, "n0": 10, "n": 20}


def _writer(url, cfg=CFG):
    return ShardWriter(url, config=cfg, shard_info={"index": 0, "total": 1}, image_index=[4, 7],
                       labels=[2, 0], num_classes=3)


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_resume_after_torn_record_keeps_whole_units_only(tmp_path):
    url = str(tmp_path / "shard-00000-of-00001.h5")
    w = _writer(url)
    w.append((4, 0, 0, 10), [1, 2, 7])
    w.append((4, 1, 0, 20), [0, 1, 19])
    w.close()
    size = os.path.getsize(w.journal_path)
    with open(w.journal_path, "r+b") as fh:  # a kill in the middle of the second record
        fh.truncate(size - 5)
    w = _writer(url)
    assert w.done == {(4, 0, 0): 10}
    assert not os.path.exists(url), "no final file before finish"
    w.append((4, 1, 0, 20), [0, 1, 19])
    w.append((7, 0, 0, 10), [10, 0, 0])
    w.finish({"end_time": 1.0})
    s = read_shard(url)
    assert s.complete and s.shard["end_time"] == 1.0
    np.testing.assert_array_equal(s.units, [[4, 0, 0, 10], [4, 1, 0, 20], [7, 0, 0, 10]])
    np.testing.assert_array_equal(s.counts, [[1, 2, 7], [0, 1, 19], [10, 0, 0]])
    assert not os.path.exists(w.journal_path)
    assert sorted(os.listdir(tmp_path)) == ["shard-00000-of-00001.h5"]


def test_writer_refuses_double_count_and_bad_rows(tmp_path):
    w = _writer(str(tmp_path / "s.h5"))
    w.append((4, 0, 0, 10), [1, 2, 7])
    with pytest.raises(ValueError, match="already recorded"):
        w.append((4, 0, 0, 10), [1, 2, 7])
    with pytest.raises(ValueError, match="sum"):
        w.append((7, 0, 0, 10), [1, 2, 3])
    assert read_journal(w.journal_path).units.shape == (1, 4)


def test_journal_of_other_config_is_refused(tmp_path):
    url = str(tmp_path / "s.h5")
    _writer(url).close()
    with pytest.raises(InputError, match="different run configuration"):
        _writer(url, {**CFG, "n": 21})


def test_memory_filesystem_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("CPCLUSTER_SCRATCH", str(tmp_path))
    w = _writer("memory://cpc-test/run/shard-00000-of-00001.h5")
    w.append((4, 0, 0, 10), [0, 0, 10])
    w.finish()
    assert expand_paths(["memory://cpc-test/run/*.h5"]) == ["memory:///cpc-test/run/shard-00000-of-00001.h5"]
    assert read_shard("memory://cpc-test/run/shard-00000-of-00001.h5").counts.tolist() == [[0, 0, 10]]


def _finished(tmp_path):
    url = str(tmp_path / "shard-00000-of-00001.h5")
    w = _writer(url)
    w.append((4, 0, 0, 10), [1, 2, 7])
    w.finish()
    return url


def test_truncated_file_is_refused_naming_it(tmp_path):
    url = _finished(tmp_path)
    with open(url, "r+b") as fh:
        fh.truncate(os.path.getsize(url) // 2)
    with pytest.raises(InputError, match="shard-00000-of-00001.h5: not a readable HDF5"):
        read_shard(url)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.__delitem__("labels"), "missing dataset 'labels'"),
    (lambda f: f.attrs.__delitem__("config_hash"), "missing attribute 'config_hash'"),
    (lambda f: f["counts"].__setitem__((0, 0), 2), "sum to 11, but n_draws is 10"),
    (lambda f: f["labels"].__setitem__(0, 3), "labels outside"),
    (lambda f: f.attrs.__setitem__("config", '{"num_classes": 3}'), "does not match"),
])
def test_damaged_files_are_refused(tmp_path, edit, message):
    url = _finished(tmp_path)
    with h5py.File(url, "r+") as f:
        edit(f)
    with pytest.raises(InputError, match=message):
        read_shard(url)


def test_expand_paths_errors(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        expand_paths([str(tmp_path / "*.h5")])
    with pytest.raises(InputError, match="no such file"):
        expand_paths([str(tmp_path / "absent.h5")])


def test_finished_shard_is_readable_by_others_per_umask(tmp_path):
    old = os.umask(0o022)
    try:
        url = _finished(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(url).st_mode & 0o777 == 0o644
