"""Dataset loaders on files written here in the real on-disk formats; malformed files give one-line errors."""
import hashlib
import io
import os
import pickle
import pickletools
import struct

import fsspec
import numpy as np
import pytest
from PIL import Image

from cpcluster.models.specs import load_dataset
from cpcluster.util.errors import InputError

RNG = np.random.default_rng(0)


def fp(images, labels):
    return hashlib.sha256(np.ascontiguousarray(images).tobytes() + labels.astype("<i8").tobytes()).hexdigest()


def one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


# ------------------------------------------------------------------------------------------ CIFAR-10 writers


def write_cifar_bin(folder, name, x, y):
    os.makedirs(folder, exist_ok=True)
    rec = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(y), -1)], axis=1)
    with open(os.path.join(folder, name + ".bin"), "wb") as fh:
        fh.write(rec.tobytes())


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as cPickle did for the official cifar-10-batches-py."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
                   + obj)
        self.memoize(obj)

    def save_text(self, obj):  # Python 2 pickled its native str (e.g. numpy's dtype code 'u1') the same way
        self.save_py2_str(obj.encode("latin1"))

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_text


def cifar_py_bytes(x, y, py2=True, extra=None):
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in y],
             b"data": x.reshape(len(y), -1), b"filenames": [b"img_%d.png" % i for i in range(len(y))]}
    batch.update(extra or {})
    if not py2:
        return pickle.dumps(batch)  # Python 3 default protocol: numpy uses _frombuffer
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(batch)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # the name the 2009 file has


def write_cifar_py(folder, name, x, y, **kw):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as fh:
        fh.write(cifar_py_bytes(x, y, **kw))


def cifar_arrays(n):
    return RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), RNG.integers(0, 10, n)


# ------------------------------------------------------------------------------------------------ CIFAR-10


def test_cifar10_bin_and_py_layouts_agree(tmp_path):
    x, y = cifar_arrays(30)
    write_cifar_bin(tmp_path / "cifar-10-batches-bin", "test_batch", x, y)
    write_cifar_py(tmp_path / "cifar-10-batches-py", "test_batch", x, y)
    write_cifar_py(tmp_path / "py3", "test_batch", x, y, py2=False)
    pickled = (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in pickled and pickle.SHORT_BINSTRING + b"\x02u1" in pickled
    assert not {op.name for op, _, _ in pickletools.genops(pickled)} & {"BINUNICODE", "SHORT_BINUNICODE"}
    sets = [load_dataset(f"cifar10:{tmp_path}/{d}") for d in ("cifar-10-batches-bin", "cifar-10-batches-py", "py3")]
    for ds in sets:
        assert ds.images.dtype == np.uint8 and np.array_equal(ds.images, x) and np.array_equal(ds.labels, y)
        assert ds.num_classes == 10 and ds.fingerprint == fp(x, y) and len(ds) == 30
    assert load_dataset(f"cifar10:{tmp_path}").fingerprint == fp(x, y)  # parent folder: finds a layout
    img, lab = sets[0].get([3, 7])
    assert img.dtype == np.float32 and np.allclose(img, x[[3, 7]] / 255.0) and lab.tolist() == y[[3, 7]].tolist()


def test_cifar10_train_split_and_fsspec(tmp_path):
    fs = fsspec.filesystem("memory")
    parts = [cifar_arrays(4) for _ in range(5)]
    for i, (x, y) in enumerate(parts, 1):
        write_cifar_bin(tmp_path, f"data_batch_{i}", x, y)
        fs.pipe(f"/cifar/data_batch_{i}", cifar_py_bytes(x, y))
    xs, ys = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    for spec in (f"cifar10:{tmp_path}?split=train", "cifar10:memory://cifar?split=train"):
        ds = load_dataset(spec)
        assert np.array_equal(ds.images, xs) and ds.fingerprint == fp(xs, ys) and ds.name == "cifar10-train"


def test_fingerprint_sees_one_label_and_one_pixel(tmp_path):
    x, y = cifar_arrays(10)
    write_cifar_bin(tmp_path / "a", "test_batch", x, y)
    y2 = y.copy()
    y2[4] = (y2[4] + 1) % 10
    write_cifar_bin(tmp_path / "b", "test_batch", x, y2)
    x2 = x.copy()
    x2[9, 2, 31, 31] ^= 1
    write_cifar_bin(tmp_path / "c", "test_batch", x2, y)
    prints = {load_dataset(f"cifar10:{tmp_path}/{d}").fingerprint for d in "abc"}
    assert len(prints) == 3


def test_cifar10_malformed_files(tmp_path):
    x, y = cifar_arrays(5)
    write_cifar_bin(tmp_path / "short", "test_batch", x, y)
    with open(tmp_path / "short" / "test_batch.bin", "ab") as fh:
        fh.write(b"\0" * 100)
    with pytest.raises(InputError) as e:
        load_dataset(f"cifar10:{tmp_path}/short")
    assert "test_batch.bin" in one_line(e) and "3073" in str(e.value)
    y_bad = y.copy()
    y_bad[2] = 10
    write_cifar_bin(tmp_path / "labels", "test_batch", x, y_bad)
    with pytest.raises(InputError, match="out of range") as e:
        load_dataset(f"cifar10:{tmp_path}/labels")
    assert "test_batch.bin" in one_line(e)
    write_cifar_py(tmp_path / "nolabels", "test_batch", x, y)
    raw = cifar_py_bytes(x, y)
    with open(tmp_path / "nolabels" / "test_batch", "wb") as fh:  # rename the key 'labels' -> 'lxbels'
        fh.write(raw.replace(b"\x06labels", b"\x06lxbels"))
    with pytest.raises(InputError, match=r"missing key\(s\) \['labels'\]") as e:
        load_dataset(f"cifar10:{tmp_path}/nolabels")
    assert "nolabels/test_batch" in one_line(e)
    write_cifar_py(tmp_path / "wide", "test_batch", RNG.integers(0, 255, (5, 3, 16, 16), dtype=np.uint8), y)
    with pytest.raises(InputError, match=r"\(N, 3072\)"):
        load_dataset(f"cifar10:{tmp_path}/wide")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="trunc/test_batch"):
        load_dataset(f"cifar10:{tmp_path}/trunc")
    with pytest.raises(InputError, match="no test_batch.bin"):
        load_dataset(f"cifar10:{tmp_path}/nothing_here")


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", ["os.system", "object array", "py2 os.system"])
def test_cifar10_pickle_naming_a_global_is_refused(tmp_path, payload):
    x, y = cifar_arrays(3)
    target = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    if payload == "object array":
        raw = pickle.dumps({b"data": np.array([Evil(target)] * 3, dtype=object), b"labels": [0, 1, 2]}, protocol=2)
    else:
        raw = cifar_py_bytes(x, y, py2=payload.startswith("py2"), extra={b"batch_label": Evil(target)})
    (folder / "test_batch").write_bytes(raw)
    with pytest.raises(InputError, match="refused") as e:
        load_dataset(f"cifar10:{folder}")
    assert "cifar-10-batches-py/test_batch" in one_line(e)
    assert not target.exists()


# ------------------------------------------------------------------------------------------ ImageNet-64 npz


@pytest.mark.parametrize("side", [64, 32])
def test_imagenet64_npz(tmp_path, side):
    n = 6
    planes = RNG.integers(0, 256, (n, 3, side, side), dtype=np.uint8)
    labels = RNG.integers(1, 1001, n)
    labels[0], labels[1] = 1, 1000
    # the Chrabaszcz et al. layout: each row is the R plane, then G, then B, each row-major
    data = np.concatenate([planes[:, 0].reshape(n, -1), planes[:, 1].reshape(n, -1), planes[:, 2].reshape(n, -1)], 1)
    np.savez(tmp_path / "val_data.npz", data=data, labels=labels.tolist())
    ds = load_dataset(f"imagenet64:{tmp_path}")
    assert np.array_equal(ds.images, planes) and ds.labels.tolist() == (labels - 1).tolist()
    assert ds.num_classes == 1000 and ds.labels.min() == 0 and ds.labels.max() == 999
    assert ds.fingerprint == fp(planes, labels - 1) and ds.shape == (3, side, side)
    assert load_dataset(f"imagenet64:{tmp_path}/val_data.npz").fingerprint == ds.fingerprint


@pytest.mark.parametrize("change, message", [
    ({"labels": [0, 5, 7]}, "1..1000"), ({"labels": [1, 5, 1001]}, "1..1000"),
    ({"data": np.zeros((3, 12287), np.uint8)}, r"\(N, 3\*S\*S\)"), ({"labels": None}, "missing key"),
    ({"data": np.zeros((3, 12288), np.float32)}, "uint8")])
def test_imagenet64_malformed(tmp_path, change, message):
    arrays = {"data": np.zeros((3, 12288), np.uint8), "labels": np.array([1, 2, 3])}
    arrays.update(change)
    np.savez(tmp_path / "val_data.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(InputError, match=message) as e:
        load_dataset(f"imagenet64:{tmp_path}")
    assert "val_data.npz" in one_line(e)


# ---------------------------------------------------------------------------------------------- generic npz


def test_generic_npz_layouts_and_fsspec(tmp_path):
    x = RNG.integers(0, 256, (7, 3, 8, 8), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4, 0, 1])
    np.savez(tmp_path / "nchw.npz", x=x, y=y)
    np.savez(tmp_path / "nhwc.npz", images=x.transpose(0, 2, 3, 1), targets=y)
    np.savez(tmp_path / "float.npz", x=(x / 255.0).astype(np.float64), y=y)
    a = load_dataset(f"npz:{tmp_path}/nchw.npz")
    b = load_dataset(f"npz:{tmp_path}/nhwc.npz?x=images&y=targets")
    assert np.array_equal(a.images, x) and np.array_equal(b.images, x) and a.fingerprint == b.fingerprint
    assert a.num_classes == 5 and load_dataset(f"npz:{tmp_path}/nchw.npz?num_classes=10").num_classes == 10
    c = load_dataset(f"npz:{tmp_path}/float.npz")
    assert c.images.dtype == np.float32 and np.allclose(c.get([0])[0], x[:1] / 255.0, atol=1e-7)
    fs = fsspec.filesystem("memory")
    fs.pipe("/data/nchw.npz", (tmp_path / "nchw.npz").read_bytes())
    assert load_dataset("npz:memory://data/nchw.npz").fingerprint == a.fingerprint
    grey = RNG.integers(0, 256, (4, 9, 9), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x=grey, y=np.arange(4))
    assert load_dataset(f"npz:{tmp_path}/grey.npz").shape == (1, 9, 9)


@pytest.mark.parametrize("arrays, spec_tail, message", [
    ({"x": np.zeros((3, 3, 4, 4), np.uint8)}, "", "missing key"),
    ({"x": np.zeros((3, 3, 4, 4), np.uint8), "y": np.array([0, 1, 5])}, "?num_classes=3", "out of range"),
    ({"x": np.zeros((3, 3, 4, 4), np.uint8), "y": np.array([0, 1])}, "", "labels"),
    ({"x": np.full((2, 3, 4, 4), 1.5), "y": np.array([0, 1])}, "", r"\[0, 1\]"),
    ({"x": np.zeros((2, 3, 4, 4), np.uint8), "y": np.array([0.0, 1.0])}, "", "integers"),
    ({"x": np.zeros((2, 5, 4, 4), np.uint8), "y": np.array([0, 1])}, "?layout=nchw", "C = 1 or 3")])
def test_generic_npz_malformed(tmp_path, arrays, spec_tail, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=message) as e:
        load_dataset(f"npz:{tmp_path}/d.npz{spec_tail}")
    assert "d.npz" in one_line(e)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([Evil(tmp_path / "pwned")], dtype=object), y=np.array([0]))
    with pytest.raises(InputError, match="obj.npz"):
        load_dataset(f"npz:{tmp_path}/obj.npz")
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------- image folder


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder(tmp_path):
    imgs = {("dog", "b.png"): RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8),
            ("cat", "z.png"): RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8),
            ("cat", "a.png"): RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)}
    for (cls, name), arr in imgs.items():
        write_png(str(tmp_path / "set" / cls / name), arr)
    (tmp_path / "set" / "dog" / "notes.txt").write_text("ignored")
    ds = load_dataset(f"folder:{tmp_path}/set")
    order = [("cat", "a.png"), ("cat", "z.png"), ("dog", "b.png")]  # classes sorted, files sorted
    expected = np.stack([imgs[k].transpose(2, 0, 1) for k in order])
    assert np.array_equal(ds.images, expected) and ds.labels.tolist() == [0, 0, 1] and ds.num_classes == 2
    assert ds.fingerprint == fp(expected, np.array([0, 0, 1]))
    grey = load_dataset(f"folder:{tmp_path}/set?mode=L")
    assert grey.shape == (1, 6, 5)
    fs = fsspec.filesystem("memory")
    for (cls, name), arr in imgs.items():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        fs.pipe(f"/imgs/{cls}/{name}", buf.getvalue())
    assert load_dataset("folder:memory://imgs").fingerprint == ds.fingerprint


def test_image_folder_malformed(tmp_path):
    write_png(str(tmp_path / "s" / "a" / "1.png"), np.zeros((6, 5, 3), np.uint8))
    write_png(str(tmp_path / "s" / "b" / "2.png"), np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(InputError, match="differs") as e:
        load_dataset(f"folder:{tmp_path}/s")
    assert "2.png" in one_line(e)
    os.remove(tmp_path / "s" / "b" / "2.png")
    (tmp_path / "s" / "b" / "3.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="3.png"):
        load_dataset(f"folder:{tmp_path}/s")
    with pytest.raises(InputError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path}/s/a")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_inert_unpickler_round_trips_numeric_arrays(protocol):
    from cpcluster.models.safepickle import safe_load

    arrays = {"u8": RNG.integers(0, 256, (4, 5), dtype=np.uint8), "be": np.arange(6, dtype=">i4").reshape(2, 3),
              "f": np.asfortranarray(RNG.random((3, 4))), "empty": np.zeros((0, 3), np.float32), "n": [1, 2.5, b"x"]}
    back = safe_load(pickle.dumps(arrays, protocol=protocol))
    for key in ("u8", "be", "f", "empty"):
        assert back[key].dtype == arrays[key].dtype and np.array_equal(back[key], arrays[key])
    assert back["n"] == [1, 2.5, b"x"]
    for bad in (pickle.dumps(np.array([1, "a"], dtype=object), protocol=protocol),
                pickle.dumps(np.zeros(2, dtype=[("a", "i4")]), protocol=protocol),
                pickle.dumps(print, protocol=protocol)):
        with pytest.raises(pickle.UnpicklingError):
            safe_load(bad)


@pytest.mark.parametrize("spec, message", [
    ("cifar10:/data?split=val", "--dataset cifar10:/data?split=val: split='val'; use one of test, train"),
    ("npz:{tmp}/x.npz?layout=hwc", "layout='hwc'; use one of auto, nchw, nhwc"),
    ("folder:/data?mode=CMYK", "mode='CMYK'; use one of RGB, L"),
])
def test_an_option_outside_its_choices_is_named_with_the_choices(spec, message, tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 3, 4, 4), np.uint8), y=np.array([0, 1]))
    with pytest.raises(InputError) as e:
        load_dataset(spec.format(tmp=tmp_path))
    assert message in str(e.value)
