"""Arrays too large to read: members of uncompressed ``.npz`` files mapped from disk, and their row concatenation.

Downsampled ImageNet-64's training set is ten ``train_data_batch_K.npz`` files of about 1.6 GB each (1.28 M images,
15.7 GB as uint8). Reading them would cost that much memory in every rank of a fine-tuning job; mapped, the rank
touches only the rows of its batches and the page cache is shared by the ranks of a node.

* :func:`npz_member_memmap` maps one array of a local ``.npz`` written by ``np.savez`` (members stored, not
  deflated) read-only; it returns None when it cannot (compressed member, Fortran order, object dtype), and the
  caller reads the array instead.
* :class:`RowConcat` presents several (N_i, ...) arrays as one (sum N_i, ...) array for the indexing the datasets
  use (``x[int_array]``, ``x[slice]``), copying only the rows asked for.
* :func:`sha256_rows` hashes such an array in chunks: the same digest as ``sha256(np.ascontiguousarray(x).tobytes())``
  without the copy.
* :func:`read_npz` reads every array of an ``.npz`` file object, checking each member's header (shape, dtype)
  against the bytes the archive holds for it *before* allocating: a header claiming TiBs is refused, not allocated.
"""
from __future__ import annotations

import hashlib
import struct
import zipfile

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. uncompressed size), name length, extra length
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data more than ~1032-fold


def _header(fh):
    """``(shape, fortran, dtype)`` of the .npy header at ``fh``'s position (ValueError for an unknown version)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy format version {version}")


def _nbytes(shape, dtype) -> int:
    """Bytes of an array of ``shape`` and ``dtype``, in Python integers (no int64 overflow on absurd shapes)."""
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize


def read_npz(fh, where: str, names=None) -> dict:
    """The arrays of the ``.npz`` file object ``fh`` (all, or those in ``names``) as ``{name: ndarray}``; no
    pickles (object arrays are refused).

    Before reading a member, its header must describe exactly the bytes the archive says it holds (uncompressed
    size), and a compressed member may not claim more than :data:`MAX_DEFLATE_RATIO` times its compressed size:
    so the memory allocated is bounded by the file's size. Raises ValueError (naming ``where``) otherwise.
    """
    out = {}
    with zipfile.ZipFile(fh) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            if names is not None and name not in names:
                continue
            limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else \
                MAX_DEFLATE_RATIO * info.compress_size + 2**20
            if info.file_size > limit:
                raise ValueError(f"{where}: member {name!r} claims {info.file_size} bytes from {info.compress_size}")
            with archive.open(info) as member:
                shape, fortran, dtype = _header(member)
                if dtype.hasobject:
                    raise ValueError(f"{where}: member {name!r} holds Python objects (pickles are refused)")
                if _nbytes(shape, dtype) != info.file_size - member.tell():
                    raise ValueError(f"{where}: member {name!r} claims shape {shape} of {dtype} "
                                     f"({_nbytes(shape, dtype)} bytes), but holds {info.file_size - member.tell()}")
                data, got = bytearray(_nbytes(shape, dtype)), 0
                while got < len(data):
                    step = member.readinto(memoryview(data)[got:])
                    if not step:
                        raise ValueError(f"{where}: member {name!r} ends early")
                    got += step
            out[name] = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return out


def npz_member_memmap(path: str, name: str) -> np.ndarray | None:
    """Array ``name`` of the local ``.npz`` file ``path`` as a read-only ``np.memmap``, or None if not mappable.

    Raises KeyError when the file has no such member and ``zipfile.BadZipFile`` when it is not a zip file.
    """
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")  # (the caller checked that path is a regular file)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            return None
        fh.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
        shape, fortran, dtype = _header(fh)
        offset = fh.tell()
    if fortran or dtype.hasobject or offset + _nbytes(shape, dtype) != info.header_offset + \
            _LOCAL_HEADER.size + name_len + extra_len + info.file_size:
        return None  # read instead, which checks the header against the member's size and names the problem
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


class RowConcat:
    """Read-only row concatenation of arrays with one trailing shape and dtype; nothing is copied until indexed."""

    def __init__(self, parts):
        if not parts:
            raise ValueError("RowConcat needs at least one array")
        tail, dtype = parts[0].shape[1:], parts[0].dtype
        if any(p.shape[1:] != tail or p.dtype != dtype for p in parts):
            raise ValueError("RowConcat: arrays differ in trailing shape or dtype")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *tail)
        self.dtype = dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        """Rows ``index`` (an int, a slice or an integer array of any shape) as a new in-memory array."""
        rows = np.arange(self.shape[0])[index]
        flat = np.asarray(rows, dtype=np.int64).reshape(-1)
        part = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((len(flat), *self.shape[1:]), dtype=self.dtype)
        for p in np.unique(part):
            chosen = part == p
            out[chosen] = self.parts[p][flat[chosen] - self.starts[p]]
        return out.reshape(np.shape(rows) + self.shape[1:])


def sha256_rows(array, chunk_bytes: int = 64 << 20) -> "hashlib._Hash":
    """sha256 state over the C-order bytes of ``array`` (ndarray, memmap or :class:`RowConcat`), read in chunks."""
    h = hashlib.sha256()
    parts = array.parts if isinstance(array, RowConcat) else [array]
    for part in parts:
        row_bytes = max(1, int(np.prod(part.shape[1:], dtype=np.int64)) * part.dtype.itemsize)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, len(part), step):
            h.update(np.ascontiguousarray(part[start:start + step]).tobytes())
    return h
