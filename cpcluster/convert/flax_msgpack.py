"""Read a Flax msgpack checkpoint (``flax.serialization.to_bytes``) without jax or flax: numpy arrays only.

Flax writes a pytree's state dict as one msgpack map; arrays are msgpack extension values, type 1 (ndarray) or
3 (numpy scalar), whose payload is itself msgpack: ``[shape, dtype name, raw C-order bytes]``. Arrays over
2**30 bytes are split into ``{"__msgpack_chunked_array__": ...}`` maps (none of the networks read here comes near).

:func:`read_flax_entries` streams the file and decodes only the top-level entries asked for (``params_ema`` of a
jcm ``State``); the rest (optimizer moments, rng state) is skipped without being decoded. Everything is bounded
before it is allocated: the length of one extension value, of maps and lists, the nesting depth, and each array's
declared shape against the bytes it actually carries. Any deviation is one :class:`InputError` naming the file.
"""
from __future__ import annotations

import math

import numpy as np

from cpcluster.util.errors import InputError

MAX_ARRAY_BYTES = 2**30  # flax chunks arrays above this, so a plain array is never larger
MAX_CONTAINER_LEN = 100_000  # entries of one map or list: a parameter tree has a few hundred per level
MAX_DEPTH = 32
MAX_NDIM = 8
EXT_NDARRAY, EXT_NPSCALAR = 1, 3
DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": None, "int32": "<i4", "int64": "<i8",
          "uint32": "<u4", "uint8": "u1", "int8": "i1", "bool": "?"}


def _import_msgpack(what: str):
    try:
        import msgpack
    except ImportError:
        raise InputError(f"{what}: reading Flax checkpoints needs the msgpack package: pip install "
                         "'cpcluster[convert]'") from None
    return msgpack


def decode_array(payload: bytes, msgpack, where: str) -> np.ndarray:
    """The numpy array of one ndarray extension payload, checked: shape, dtype and byte count agree."""
    try:
        value = msgpack.unpackb(payload, raw=True, max_bin_len=MAX_ARRAY_BYTES, max_array_len=MAX_NDIM + 3,
                                max_map_len=0, max_str_len=64)
    except (ValueError, msgpack.UnpackException) as e:
        raise InputError(f"{where}: an array entry is not valid ({type(e).__name__})") from None
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], (list, tuple))
            and isinstance(value[1], bytes) and isinstance(value[2], bytes)):
        raise InputError(f"{where}: an array entry is not [shape, dtype, bytes]")
    shape, dtype, buffer = value
    name = dtype.decode("ascii", "replace")
    if name not in DTYPES:
        raise InputError(f"{where}: array dtype {name!r} is not supported (known: {', '.join(DTYPES)})")
    if len(shape) > MAX_NDIM or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InputError(f"{where}: array shape {list(shape)[:MAX_NDIM + 1]} is not valid")
    itemsize = 2 if name == "bfloat16" else np.dtype(DTYPES[name]).itemsize
    if math.prod(shape) * itemsize != len(buffer):
        raise InputError(f"{where}: an array declares shape {list(shape)} ({name}) but carries {len(buffer)} bytes")
    if name == "bfloat16":  # the upper half of a float32
        bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=DTYPES[name]).reshape(shape)


def _check_tree(value, where: str, depth: int = 0):
    """Nested str-keyed dicts whose leaves are numpy arrays or plain scalars; the depth bounded."""
    if depth > MAX_DEPTH:
        raise InputError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError(f"{where}: a map key is not a string ({type(key).__name__})")
            _check_tree(item, where, depth + 1)
    elif isinstance(value, (list, tuple)):
        raise InputError(f"{where}: found a list where Flax writes maps and arrays")


def read_flax_entries(url: str, keys, what: str) -> tuple[dict, list[str]]:
    """``({key: tree}, top-level names)``: the entries ``keys`` of the Flax msgpack file ``url``, and every name
    at its top level (to say what a file holds instead).

    Trees are nested dicts with numpy-array leaves (read-only views). Keys absent from the file are absent from
    the result; the file's other entries are skipped undecoded.
    """
    import fsspec

    msgpack = _import_msgpack(what)
    where = what if url in what else f"{what} {url}"

    def ext_hook(code: int, payload: bytes):
        if code == EXT_NDARRAY:
            return decode_array(payload, msgpack, where)
        if code == EXT_NPSCALAR:
            return decode_array(payload, msgpack, where)[()]
        raise InputError(f"{where}: msgpack extension type {code} is not a Flax array")

    found: dict = {}
    names: list[str] = []
    try:
        with fsspec.open(url, "rb") as fh:
            unpacker = msgpack.Unpacker(
                fh, raw=False, ext_hook=ext_hook, max_buffer_size=MAX_ARRAY_BYTES + 2**20,
                max_bin_len=MAX_ARRAY_BYTES, max_ext_len=MAX_ARRAY_BYTES + 4096, max_str_len=2**16,
                max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN)
            entries = unpacker.read_map_header()
            for _ in range(entries):
                key = unpacker.unpack()
                if not isinstance(key, str):
                    raise InputError(f"{where}: a top-level key is not a name ({type(key).__name__}); not a "
                                     "Flax msgpack checkpoint")
                names.append(key)
                if key in keys and key not in found:
                    found[key] = unpacker.unpack()
                    _check_tree(found[key], where)
                else:
                    unpacker.skip()
            try:
                unpacker.skip()
                trailing = True
            except msgpack.OutOfData:
                trailing = False
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except InputError:
        raise
    except msgpack.OutOfData:
        raise InputError(f"{where}: the file ends early (truncated download?); fetch the checkpoint again") from None
    except msgpack.StackError:
        raise InputError(f"{where}: nested too deeply to be a Flax checkpoint") from None
    except (msgpack.UnpackException, msgpack.ExtraData, ValueError, TypeError) as e:
        raise InputError(f"{where}: not a Flax msgpack checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    except OSError as e:
        raise InputError(f"{where}: cannot read ({e})") from None
    if trailing:
        raise InputError(f"{where}: bytes follow the checkpoint's top-level map; not a Flax msgpack checkpoint")
    return found, names
