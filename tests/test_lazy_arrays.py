"""Mapped .npz members, row concatenation, chunked hashing, and the ImageNet-64 training split built on them."""
import hashlib

import fsspec
import numpy as np
import pytest

from cpcluster.models.lazy_arrays import RowConcat, npz_member_memmap, sha256_rows
from cpcluster.models.specs import load_dataset
from cpcluster.util.errors import InputError

RNG = np.random.default_rng(7)


def chrabaszcz(planes):
    """(N, 3, S, S) -> the release's rows: the R plane, then G, then B, each row-major."""
    return planes.reshape(len(planes), -1)


def test_stored_members_are_mapped_and_compressed_ones_are_not(tmp_path):
    data = RNG.integers(0, 256, (5, 48), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", data=data, labels=np.arange(5))
    np.savez_compressed(tmp_path / "packed.npz", data=data)
    mapped = npz_member_memmap(str(tmp_path / "plain.npz"), "data")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint8 and np.array_equal(mapped, data)
    assert np.array_equal(npz_member_memmap(str(tmp_path / "plain.npz"), "labels"), np.arange(5))
    assert npz_member_memmap(str(tmp_path / "packed.npz"), "data") is None
    with pytest.raises(KeyError):
        npz_member_memmap(str(tmp_path / "plain.npz"), "x")


def test_row_concat_indexes_like_the_concatenated_array():
    parts = [RNG.integers(0, 256, (n, 2, 3), dtype=np.uint8) for n in (4, 1, 6)]
    whole = np.concatenate(parts)
    lazy = RowConcat(parts)
    assert lazy.shape == whole.shape and len(lazy) == 11 and lazy.dtype == np.uint8
    for index in ([10, 0, 4, 5, 4], np.array([[3, 9], [1, 6]]), slice(2, 9, 3), 7, -1, np.array([], np.int64)):
        assert np.array_equal(lazy[index], whole[index]), index
    with pytest.raises(IndexError):
        lazy[[11]]
    with pytest.raises(ValueError, match="trailing shape"):
        RowConcat([parts[0], parts[1].reshape(1, 3, 2)])


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1 << 20])
def test_chunked_hash_equals_the_hash_of_the_whole_bytes(chunk_bytes):
    parts = [RNG.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8) for n in (5, 3)]
    whole = np.concatenate(parts)
    expected = hashlib.sha256(whole.tobytes()).hexdigest()
    assert sha256_rows(RowConcat(parts), chunk_bytes).hexdigest() == expected
    assert sha256_rows(whole, chunk_bytes).hexdigest() == expected


def _write_batches(folder, sizes, side=8, compress=()):
    planes, labels = [], []
    for k, n in sizes.items():
        p = RNG.integers(0, 256, (n, 3, side, side), dtype=np.uint8)
        y = RNG.integers(1, 1001, n)
        save = np.savez_compressed if k in compress else np.savez
        save(folder / f"train_data_batch_{k}.npz", data=chrabaszcz(p), labels=y.tolist(), mean=np.zeros(3))
        planes.append(p)
        labels.append(y - 1)
    return planes, labels


def test_imagenet_train_split_is_every_batch_file_in_batch_order_mapped(tmp_path):
    # batches 1, 2, 10: numeric order, not the names' sort order (1, 10, 2); batch 2 compressed (read, not mapped)
    planes, labels = _write_batches(tmp_path, {10: 3, 1: 4, 2: 2}, compress=(2,))
    (tmp_path / "val_data.npz").write_bytes(b"")  # not part of the training split
    ds = load_dataset(f"imagenet64:{tmp_path}?split=train")
    order = [1, 2, 0]  # planes were written for batches 10, 1, 2
    images = np.concatenate([planes[i] for i in order])
    targets = np.concatenate([labels[i] for i in order])
    assert isinstance(ds.images, RowConcat) and ds.name == "imagenet8-train" and len(ds) == 9
    assert isinstance(ds.images.parts[0], np.memmap) and not isinstance(ds.images.parts[1], np.memmap)
    rows = [8, 0, 4, 5]
    x, y = ds.get(rows)
    assert np.array_equal(x, images[rows].astype(np.float32) / 255) and y.tolist() == targets[rows].tolist()
    h = hashlib.sha256(images.tobytes())
    h.update(targets.astype("<i8").tobytes())
    assert ds.fingerprint == h.hexdigest()  # the rule every dataset follows, as if read into memory

    one = load_dataset(f"imagenet64:{tmp_path}/train_data_batch_1.npz")
    assert isinstance(one.images, np.memmap) and one.name == "imagenet8-train_data_batch_1"
    assert np.array_equal(one.images, planes[1])


def test_imagenet_train_split_problems_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no train_data_batch_K.npz files there"):
        load_dataset(f"imagenet64:{tmp_path}?split=train")
    with pytest.raises(InputError, match="no such folder"):
        load_dataset(f"imagenet64:{tmp_path}/missing?split=train")
    _write_batches(tmp_path, {1: 2})
    with pytest.raises(InputError, match="split= selects files in a folder"):
        load_dataset(f"imagenet64:{tmp_path}/train_data_batch_1.npz?split=train")
    _write_batches(tmp_path, {2: 2}, side=16)
    with pytest.raises(InputError, match=r"images of different sizes \[8, 16\]"):
        load_dataset(f"imagenet64:{tmp_path}?split=train")
    (tmp_path / "train_data_batch_3.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="train_data_batch_3.npz: not a readable numeric .npz"):
        load_dataset(f"imagenet64:{tmp_path}?split=train")


def test_imagenet_files_on_an_object_store_are_read_and_give_the_same_dataset(tmp_path):
    _write_batches(tmp_path, {1: 3, 2: 2})
    fs = fsspec.filesystem("memory")
    for k in (1, 2):
        fs.pipe(f"/inet/train_data_batch_{k}.npz", (tmp_path / f"train_data_batch_{k}.npz").read_bytes())
    remote = load_dataset("imagenet64:memory://inet?split=train")
    local = load_dataset(f"imagenet64:{tmp_path}?split=train")
    assert remote.fingerprint == local.fingerprint and np.array_equal(remote.get([0, 4])[0], local.get([0, 4])[0])
