"""Read pickled numpy data (the CIFAR-10 python batches) without ever resolving a global.

A pickle is a program: ``pickle.load`` imports and calls whatever globals it names, so a doctored dataset file can
run code. :class:`InertUnpickler` resolves **no** global: ``find_class`` refuses every name except the handful that
a pickled numpy array is made of (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``,
``numpy.core.numeric._frombuffer``, and ``_codecs.encode`` / ``bytes()`` for bytes pickled by Python 3 at
protocol 2), and for those it returns local, inert stand-ins that only record their arguments. :func:`safe_load`
then rebuilds plain numeric arrays from the recorded (shape, dtype, raw bytes) with ``np.frombuffer`` after checking
that the sizes agree. Object arrays, structured dtypes and any other global raise :class:`pickle.UnpicklingError`.
"""
from __future__ import annotations

import io
import pickle
import struct

import numpy as np

_NUMERIC_KINDS = "biuf"


class _NDArrayMark:
    """Stands for ``numpy.ndarray`` (only ever used as an argument of ``_reconstruct``)."""


class _ArrayRecord:
    def __init__(self, cls, shape=(0,), typecode=b"b"):
        if cls is not _NDArrayMark:
            raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _DtypeRecord:
    def __init__(self, typestr, align=False, copy=True):
        self.typestr = typestr.decode("ascii") if isinstance(typestr, bytes) else str(typestr)
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def to_dtype(self) -> np.dtype:
        try:
            dtype = np.dtype(self.typestr)
        except TypeError:
            raise pickle.UnpicklingError(f"unsupported dtype {self.typestr!r}") from None
        if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
            raise pickle.UnpicklingError(f"refused non-numeric dtype {self.typestr!r}")
        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "|"
        order = order.decode("ascii") if isinstance(order, bytes) else order
        return dtype.newbyteorder(order) if order in ("<", ">") and dtype.itemsize > 1 else dtype


def _raw_bytes(raw) -> bytes:
    if isinstance(raw, str):  # Python 2 str read with encoding="latin1"
        return raw.encode("latin1")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    raise pickle.UnpicklingError("array data is not raw bytes (object array?)")


def _array(shape, dtype, raw, fortran: bool = False) -> np.ndarray:
    if isinstance(dtype, _DtypeRecord):
        dtype = dtype.to_dtype()
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("array without a dtype")
    shape = tuple(int(s) for s in shape)
    data = _raw_bytes(raw)
    count = 1
    for dim in shape:  # Python integers: an absurd shape cannot overflow into a match
        count *= dim
    if any(dim < 0 for dim in shape) or len(data) != count * dtype.itemsize:
        raise pickle.UnpicklingError(f"array of shape {shape} and dtype {dtype} does not match its {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _frombuffer(buf, dtype, shape, order="C"):
    return _array(shape, dtype, buf, fortran=(order == "F"))


def _codecs_encode(text, encoding="utf-8"):
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError("refused _codecs.encode with anything but latin1 text")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:
        raise pickle.UnpicklingError("refused bytes(...) with arguments")
    return b""


def _scalar(dtype, raw):
    """``numpy.core.multiarray.scalar(dtype, raw)`` (a pickled numpy scalar) as a plain Python number."""
    return _array((), dtype, raw).item()


# For other restricted unpicklers: the globals a pickled numeric numpy *scalar* is made of, as inert stand-ins.
NUMPY_SCALAR_STANDINS = {
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "dtype"): _DtypeRecord,
}

_STANDINS = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayRecord,
    ("numpy._core.multiarray", "_reconstruct"): _ArrayRecord,
    ("numpy", "ndarray"): _NDArrayMark,
    ("numpy", "dtype"): _DtypeRecord,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _codecs_encode,
    ("__builtin__", "bytes"): _empty_bytes,  # Python 3 writes b"" as bytes() at protocol 2
    ("builtins", "bytes"): _empty_bytes,
}


MAX_DEPTH = 32


class _Budget:
    """What loading and materialising may still build: containers and their items, and array bytes.

    A pickle can reference one object many times (the memo), so a small file can describe a structure that is
    huge once expanded (a list holding a list holding ..., each shared). Materialising copies, so every visit of a
    shared object counts: the totals are bounded by the size of the pickle itself, as they are for any file that
    does not share objects (each item costs at least one opcode byte, each array byte one file byte).
    """

    def __init__(self, size: int):
        self.items = size + 1024
        self.bytes = size + 1024

    def spend_items(self, n: int) -> None:
        self.items -= n
        if self.items < 0:
            raise pickle.UnpicklingError("the pickle expands to more objects than it holds (shared references?)")

    def spend_bytes(self, n: int) -> None:
        self.bytes -= n
        if self.bytes < 0:
            raise pickle.UnpicklingError("the pickle expands to more array data than it holds (shared references?)")


class InertUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` never imports anything (see the module docstring).

    The stand-ins that copy bytes while loading (``_frombuffer``, ``_codecs.encode``) spend from ``budget``
    (:func:`safe_load` gives the size of the pickle), so bytes shared through the memo cannot be copied into
    gigabytes.
    """

    def __init__(self, file, *, budget: _Budget | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self.budget = budget if budget is not None else _Budget(2**40)

    def find_class(self, module, name):
        standin = _STANDINS.get((module, name))
        if standin is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if standin in (_frombuffer, _codecs_encode):
            budget = self.budget

            def spending(*args, **kwargs):
                budget.spend_bytes(sum(len(a) for a in args if isinstance(a, (bytes, bytearray, str))))
                return standin(*args, **kwargs)

            return spending
        return standin

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def _materialize(obj, budget: _Budget, depth: int = 0):
    if depth > MAX_DEPTH:
        raise pickle.UnpicklingError(f"the pickle nests deeper than {MAX_DEPTH} levels")
    budget.spend_items(1)
    if isinstance(obj, _ArrayRecord):
        state = obj.state
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        budget.spend_bytes(len(raw) if isinstance(raw, (bytes, bytearray, str)) else 0)
        return _array(shape, dtype, raw, bool(fortran))
    if isinstance(obj, (_DtypeRecord, _NDArrayMark)) or obj is _NDArrayMark:
        raise pickle.UnpicklingError("stray numpy object outside an array")
    if isinstance(obj, np.ndarray):  # built by _frombuffer; a shared one would be copied again downstream
        budget.spend_bytes(obj.nbytes)
        return obj
    if isinstance(obj, (bytes, bytearray, str)):
        budget.spend_bytes(len(obj))
        return obj
    if isinstance(obj, dict):
        budget.spend_items(len(obj))
        return {_materialize(k, budget, depth + 1): _materialize(v, budget, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        budget.spend_items(len(obj))
        items = [_materialize(v, budget, depth + 1) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def safe_load(raw: bytes, encoding: str = "bytes"):
    """Unpickle ``raw`` with :class:`InertUnpickler`; numpy arrays come back as real (copied) numeric arrays.

    What the result may hold is bounded by ``len(raw)`` (objects and array bytes, see :class:`_Budget`) and by
    :data:`MAX_DEPTH`. Raises :class:`pickle.UnpicklingError` on anything refused or malformed.
    """
    try:
        obj = InertUnpickler(io.BytesIO(raw), encoding=encoding, budget=_Budget(len(raw))).load()
        return _materialize(obj, _Budget(len(raw)))
    except pickle.UnpicklingError:
        raise
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError, RecursionError, MemoryError,
            OverflowError, UnicodeDecodeError, struct.error) as e:
        raise pickle.UnpicklingError(f"malformed pickle ({type(e).__name__}: {e})") from None
