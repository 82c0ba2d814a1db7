"""Dataset specs -> :class:`ImageDataset` (uint8 (N, C, H, W), in memory or mapped), from local paths or fsspec URLs.

* ``cifar10:DIR[?split=test|train]`` -- ``DIR`` is ``cifar-10-batches-bin`` (``test_batch.bin``: records of 1 label
  byte + 3072 CHW pixel bytes) or ``cifar-10-batches-py`` (``test_batch``: a pickled dict, read by
  :mod:`cpcluster.models.safepickle`, never ``pickle.load``), or a folder holding one of them. ``train`` reads
  ``data_batch_1`` .. ``data_batch_5``.
* ``imagenet64:DIR[?split=val|train]`` or ``imagenet64:FILE.npz`` -- downsampled ImageNet (Chrabaszcz et al. 2017),
  the npz release: ``data`` (N, 3 S^2) uint8 with the R, G, B planes in order, ``labels`` 1..1000 (converted to
  0..999); any side S (8, 16, 32, 64). ``val`` is ``val_data.npz``; ``train`` is every ``train_data_batch_K.npz``
  of the folder, in K order, as one dataset. Local files are memory-mapped (:mod:`.lazy_arrays`), so the 15.7 GB
  training set of ImageNet-64 costs no memory beyond the rows a job reads.
* ``npz:FILE[?x=KEY&y=KEY&layout=nchw|nhwc&num_classes=K]`` -- images (N, C, H, W), (N, H, W, C) or (N, H, W) as
  uint8, or float in [0, 1] (kept as float32); integer labels in [0, K) (K defaults to max label + 1).
* ``folder:DIR[?mode=RGB|L]`` -- one subfolder per class (sorted names are classes 0, 1, ...), PNG/JPEG/BMP/WebP
  files of one common size, read in sorted order.

``fingerprint`` = sha256 of the C-contiguous image array bytes followed by the int64 label bytes, the same rule as
the demo dataset. Every malformed input is an :class:`InputError` naming the file.
"""
from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np

from cpcluster.models.lazy_arrays import RowConcat, npz_member_memmap, read_npz, sha256_rows
from cpcluster.models.loaded import ImageDataset
from cpcluster.models.safepickle import safe_load
from cpcluster.models.transforms import parse_choice, parse_int, split_options
from cpcluster.models.weights import read_bytes
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import (check_regular, exists, filesystem, is_local, is_local_fs, join_url, open_regular,
                                   read_regular)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_IMAGE_PIXELS = 2**24  # 4096 x 4096: far above any dataset image, far below a decompression bomb
MAX_IMAGE_BYTES = 64 * 2**20
CIFAR_RECORD = 1 + 3 * 32 * 32


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 hex of ``images`` (C order) bytes + ``labels`` as little-endian int64 bytes (images read in chunks)."""
    h = sha256_rows(images)
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def make_dataset(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int, where: str) -> ImageDataset:
    """Checked :class:`ImageDataset`: (N, C, H, W) uint8 or float32 in [0, 1], labels (N,) in [0, num_classes)."""
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"{where}: images have shape {images.shape}; expected (N, C, H, W) with C = 1 or 3")
    if labels.shape != (images.shape[0],):
        raise InputError(f"{where}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{where}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{where}: labels out of range [0, {num_classes}): min {labels.min()}, max {labels.max()}")
    if images.dtype != np.uint8:
        if isinstance(images, RowConcat) or not np.issubdtype(images.dtype, np.floating):
            raise InputError(f"{where}: images must be uint8 or float in [0, 1], got {images.dtype}")
        images = images.astype(np.float32)
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise InputError(f"{where}: float images must lie in [0, 1]")
    if not isinstance(images, (RowConcat, np.memmap)):
        images = np.ascontiguousarray(images)
    return ImageDataset(name, images, labels, int(num_classes), fingerprint(images, labels))


# ------------------------------------------------------------------------------------------------------ CIFAR-10


def _cifar_bin(url: str) -> tuple[np.ndarray, np.ndarray]:
    raw = read_bytes(url, "CIFAR-10 batch")
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise InputError(f"CIFAR-10 batch {url}: {len(raw)} bytes is not a whole number of {CIFAR_RECORD}-byte "
                         "records (1 label byte + 3x32x32 pixels)")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def _cifar_py(url: str) -> tuple[np.ndarray, np.ndarray]:
    raw = read_bytes(url, "CIFAR-10 batch")
    try:
        batch = safe_load(raw)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise InputError(f"CIFAR-10 batch {url}: refused or unreadable pickle ({e})") from None
    if not isinstance(batch, dict):
        raise InputError(f"CIFAR-10 batch {url}: expected a pickled dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise InputError(f"CIFAR-10 batch {url}: missing key(s) {missing}")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise InputError(f"CIFAR-10 batch {url}: 'data' must be uint8 of shape (N, 3072), got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (data.shape[0],):
        raise InputError(f"CIFAR-10 batch {url}: {data.shape[0]} images but {labels.size} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_layout(root: str, split: str) -> tuple[list[str], str]:
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    for folder in (root, join_url(root, "cifar-10-batches-bin"), join_url(root, "cifar-10-batches-py")):
        if exists(join_url(folder, names[0] + ".bin")):
            return [join_url(folder, n + ".bin") for n in names], "bin"
        if exists(join_url(folder, names[0])):
            return [join_url(folder, n) for n in names], "py"
    raise InputError(f"--dataset cifar10:{root}: no {names[0]}.bin (cifar-10-batches-bin) or {names[0]} "
                     "(cifar-10-batches-py) there or in a cifar-10-batches-* subfolder")


def load_cifar10(argument: str) -> ImageDataset:
    what = f"--dataset cifar10:{argument}"
    root, options = split_options(argument, what, ("split",))
    split = parse_choice(options, "split", ("test", "train"), what)
    files, layout = _cifar_layout(root.rstrip("/"), split)
    xs, ys = [], []
    for url in files:
        x, y = (_cifar_bin if layout == "bin" else _cifar_py)(url)
        if y.size and (y.min() < 0 or y.max() >= 10):
            raise InputError(f"CIFAR-10 batch {url}: labels out of range [0, 10): min {y.min()}, max {y.max()}")
        xs.append(x)
        ys.append(y)
    return make_dataset(f"cifar10-{split}", np.concatenate(xs), np.concatenate(ys), 10, f"CIFAR-10 batch {files[0]}")


# ------------------------------------------------------------------------------------------------- npz formats


def _npz(url: str, what: str) -> dict:
    """Every array of an .npz file (streamed from the file object; each member's header checked against the bytes
    it holds before anything is allocated: :func:`cpcluster.models.lazy_arrays.read_npz`)."""
    with open_regular(url, what) as fh:
        try:
            return read_npz(fh, f"{what} {url}")
        except ValueError as e:
            raise InputError(str(e) if str(e).startswith(f"{what} {url}") else
                             f"{what} {url}: not a readable numeric .npz file ({e})") from None
        except (OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as e:
            raise InputError(f"{what} {url}: not a readable numeric .npz file ({type(e).__name__}: {e})") from None


def load_imagenet64(argument: str) -> ImageDataset:
    what = f"--dataset imagenet64:{argument}"
    url, options = split_options(argument, what, ("split",))
    if url.endswith(".npz"):
        if options:
            raise InputError(f"{what}: split= selects files in a folder; give the folder, or this file alone")
        stem = url.rstrip("/").rsplit("/", 1)[-1][:-len(".npz")]
        files, name = [url], "val" if stem == "val_data" else stem
    else:
        name = parse_choice(options, "split", ("val", "train"), what)
        files = [join_url(url, "val_data.npz")] if name == "val" else _imagenet_train_files(url, what)
    parts = [_imagenet_file(f) for f in files]
    sides = sorted({images.shape[-1] for images, _ in parts})
    if len(sides) > 1:
        raise InputError(f"{what}: the files hold images of different sizes {sides}")
    images = parts[0][0] if len(parts) == 1 else RowConcat([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return make_dataset(f"imagenet{sides[0]}-{name}", images, labels, 1000, f"downsampled ImageNet {url}")


def _imagenet_train_files(url: str, what: str) -> list[str]:
    """``train_data_batch_1.npz`` .. ``train_data_batch_K.npz`` of the folder ``url``, in batch order."""
    fs, root = filesystem(url, what)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        raise InputError(f"{what}: no such folder") from None
    numbered = sorted((int(n[len("train_data_batch_"):-4]), n) for n in names
                      if n.startswith("train_data_batch_") and n.endswith(".npz") and n[17:-4].isdigit())
    if not numbered:
        raise InputError(f"{what}: no train_data_batch_K.npz files there (the npz release of downsampled ImageNet)")
    return [join_url(url, n) for _, n in numbered]


def _imagenet_file(url: str) -> tuple:
    """``(images (N, 3, S, S) uint8, labels (N,) int64 0-based)`` of one downsampled-ImageNet ``.npz`` file.

    Local files written by ``np.savez`` (the official ones) are memory-mapped, not read; others are read.
    """
    where = f"downsampled ImageNet file {url}"
    data = labels = None
    if is_local(url):
        path = filesystem(url)[1]
        check_regular(url, "downsampled ImageNet file")
        try:
            data = npz_member_memmap(path, "data")
            if data is not None:
                with open(path, "rb") as fh:
                    labels = read_npz(fh, where, ("labels",)).get("labels")
        except (KeyError, OSError, ValueError, zipfile.BadZipFile):
            data = None  # read below, which names the problem
    if data is None or labels is None:
        z = _npz(url, "downsampled ImageNet file")
        missing = [k for k in ("data", "labels") if k not in z]
        if missing:
            raise InputError(f"{where}: missing key(s) {missing} (has {sorted(z)})")
        data, labels = z["data"], z["labels"]
    labels = np.asarray(labels).reshape(-1)
    side = int(round((data.shape[-1] / 3) ** 0.5)) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or data.ndim != 2 or 3 * side * side != data.shape[1]:
        raise InputError(f"{where}: 'data' must be uint8 (N, 3*S*S), got {data.dtype} {data.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 1 or labels.max() > 1000):
        raise InputError(f"{where}: labels must be integers 1..1000 (1-based), got {labels.dtype} "
                         f"{labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, side, side), labels.astype(np.int64) - 1


def load_npz(argument: str) -> ImageDataset:
    what = f"--dataset npz:{argument}"
    url, options = split_options(argument, what, ("x", "y", "layout", "num_classes"))
    z = _npz(url, "dataset file")
    xk, yk = options.get("x", "x"), options.get("y", "y")
    missing = [k for k in (xk, yk) if k not in z]
    if missing:
        raise InputError(f"dataset file {url}: missing key(s) {missing} (has {sorted(z)}); name them with ?x=&y=")
    x, y = z[xk], z[yk].reshape(-1)
    if x.ndim == 3:
        x = x[:, None]
    layout = parse_choice(options, "layout", ("auto", "nchw", "nhwc"), what)
    if x.ndim == 4 and (layout == "nhwc" or (layout == "auto" and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3))):
        x = x.transpose(0, 3, 1, 2)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"dataset file {url}: labels {yk!r} must be integers, got {y.dtype}")
    k = parse_int(options["num_classes"], what, "num_classes", 2) if "num_classes" in options else (
        int(y.max()) + 1 if y.size else 1)
    name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".npz")
    return make_dataset(name, x, y, k, f"dataset file {url}")


# ------------------------------------------------------------------------------------------------- image folder


def load_image_folder(argument: str) -> ImageDataset:
    from PIL import Image, UnidentifiedImageError

    what = f"--dataset folder:{argument}"
    url, options = split_options(argument, what, ("mode",))
    mode = parse_choice(options, "mode", ("RGB", "L"), what)
    fs, root = filesystem(url, what)
    if not fs.isdir(root):
        raise InputError(f"{what}: {url} is not a folder")
    classes = sorted(e["name"].rstrip("/") for e in fs.ls(root, detail=True) if e["type"] == "directory")
    if not classes:
        raise InputError(f"{what}: {url} has no class subfolders")
    images, labels, size = [], [], None
    for label, folder in enumerate(classes):
        for path in sorted(p for p in fs.find(folder) if p.lower().endswith(IMAGE_SUFFIXES)):
            raw = read_regular(path if is_local_fs(fs) else fs.unstrip_protocol(path), "image", MAX_IMAGE_BYTES)
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:  # checked before the pixels are decoded
                        raise InputError(f"image {path}: {im.size[0]}x{im.size[1]} pixels is more than the "
                                         f"{MAX_IMAGE_PIXELS:,} an image of a dataset may have (decompression bomb?)")
                    arr = np.asarray(im.convert(mode))
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
                raise InputError(f"image {path}: cannot be decoded ({type(e).__name__}: {e})") from None
            if size is None:
                size = arr.shape[:2]
            elif arr.shape[:2] != size:
                raise InputError(f"image {path}: size {arr.shape[1]}x{arr.shape[0]} differs from the first image's "
                                 f"{size[1]}x{size[0]}; resize the folder to one size")
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise InputError(f"{what}: no {'/'.join(IMAGE_SUFFIXES)} files under {url}")
    name = root.rstrip("/").rsplit("/", 1)[-1]
    return make_dataset(name, np.stack(images), np.array(labels, dtype=np.int64), len(classes), url)
