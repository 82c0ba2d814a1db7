"""Read an NVlabs/edm network pickle without running any of it: a restricted unpickler that records the tree.

EDM writes its snapshots with ``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...))``.
Its networks are ``torch_utils.persistence`` classes: each one pickles as ``_reconstruct_persistent_obj(meta)`` with
``meta = {type: "class", version: 6, module_src: <the whole source file>, class_name, state: obj.__dict__}``, and
unpickling it normally *executes* ``module_src``. Here nothing is executed:

* :class:`EDMUnpickler` resolves only the globals in :data:`ALLOWED`; any other global (``os.system``,
  ``builtins.eval``, a class of ``training.networks`` ...) is refused by name (:class:`RefusedGlobal`) before
  anything could call it, and persistent ids are refused.
* ``_reconstruct_persistent_obj`` becomes :func:`record_persistent`, which keeps ``class_name``, the ``state`` dict
  (``_parameters``, ``_buffers``, ``_modules``, ``_init_args``, ``_init_kwargs`` ...) and only the sha256 of
  ``module_src``.
* torch containers (``ModuleDict`` ...) become :class:`ModuleRecord` placeholders that only store their state.
* tensors: ``torch.storage._load_from_bytes(b)`` loads the embedded storage with ``torch.load(weights_only=True)``;
  ``_rebuild_tensor_v2`` checks sizes and strides against that storage; ``_rebuild_parameter`` keeps the tensor.
* numpy scalars in constructor arguments (EDM passes ``np.sqrt(0.5)``) become Python numbers.

The file is read through :class:`BoundedReader`, which refuses to read past its end, so a damaged length field
cannot make the reader allocate more than the file holds.
"""
from __future__ import annotations

import collections
import hashlib
import io
import pickle

import torch

from cpcluster.models.safepickle import NUMPY_SCALAR_STANDINS

PERSISTENCE_VERSION = 6
MAX_TENSOR_DIMS = 8


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (never resolved, never called)."""


class PersistentRecord:
    """What a ``torch_utils.persistence`` object was: its class name, state dict and the hash of its source."""

    def __init__(self, class_name: str, state: dict, module_src_sha256: str):
        self.class_name, self.state, self.module_src_sha256 = class_name, state, module_src_sha256

    def __repr__(self) -> str:
        return f"<persistent {self.class_name}>"


class ModuleRecord:
    """Stands for a ``torch.nn`` container class; instances keep the state the pickle gives them, nothing else."""

    torch_class = "torch.nn.Module"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.torch_class} with a state that is not a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.torch_class}>"


def _module_record_class(qualified: str) -> type:
    return type(qualified.rsplit(".", 1)[1] + "Record", (ModuleRecord,), {"torch_class": qualified})


def record_persistent(meta) -> PersistentRecord:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: records, never executes."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("a persistent object whose meta is not {'type': 'class', ...}")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise pickle.UnpicklingError(f"torch_utils.persistence version {meta.get('version')!r}; this reader knows "
                                     f"version {PERSISTENCE_VERSION}")
    name, src, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if not isinstance(name, str) or not isinstance(src, str) or not isinstance(state, dict):
        raise pickle.UnpicklingError("a persistent object without class_name, module_src and state")
    return PersistentRecord(name, state, hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest())


def load_storage(data) -> torch.storage.TypedStorage:
    """Stand-in for ``torch.storage._load_from_bytes``: the embedded storage, read with ``weights_only=True``."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a tensor storage that is not raw bytes")
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"embedded bytes hold a {type(storage).__name__}, not a tensor storage")
    return storage


def _ints(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_TENSOR_DIMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"tensor {what} {value!r} is not a short tuple of non-negative integers")
    return tuple(value)


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a view of ``storage`` after checking it lies inside."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor whose storage is not a loaded storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    (offset,) = _ints((storage_offset,), "offset")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    tensor = torch.empty(0, dtype=storage.dtype)
    elements = storage._untyped_storage.nbytes() // tensor.element_size()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= elements:
        raise pickle.UnpicklingError(f"tensor of size {size} at offset {offset} lies outside its storage of "
                                     f"{elements} elements")
    return tensor.set_(storage._untyped_storage, offset, size, stride)


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: the plain tensor (no hooks, no grad)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter that is not a tensor")
    return data.detach()


_CONTAINERS = ("torch.nn.modules.container.ModuleDict", "torch.nn.modules.container.ModuleList",
               "torch.nn.modules.container.Sequential")

# Explicit allow-list: (module, name) -> the local, inert object the unpickler gets instead.
ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): record_persistent,
    ("torch.storage", "_load_from_bytes"): load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,  # protocol 3 (Python < 3.8's default) writes a set as set(list)
    **{tuple(q.rsplit(".", 1)): _module_record_class(q) for q in _CONTAINERS},
    **NUMPY_SCALAR_STANDINS,
}


class EDMUnpickler(pickle.Unpickler):
    """``find_class`` answers only from :data:`ALLOWED`; everything else is :class:`RefusedGlobal`."""

    def find_class(self, module, name):
        standin = ALLOWED.get((module, name))
        if standin is None:
            raise RefusedGlobal(f"refused global {module}.{name}")
        return standin

    def persistent_load(self, pid):
        raise RefusedGlobal("refused persistent id (an EDM network pickle has none)")


class BoundedReader:
    """A binary file wrapper whose reads never go past ``size`` bytes (``UnpicklingError`` instead)."""

    def __init__(self, fh, size: int):
        self.fh, self.left = fh, size

    def _take(self, n: int) -> int:
        if n > self.left:
            raise pickle.UnpicklingError(f"pickle data was truncated (needs {n} more bytes, {self.left} left)")
        self.left -= n
        return n

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(self._take(self.left if n is None or n < 0 else n))
        if len(data) < n:
            raise pickle.UnpicklingError("pickle data was truncated")
        return data

    def readinto(self, buffer) -> int:
        return self.fh.readinto(memoryview(buffer)[: self._take(len(buffer))])

    def readline(self) -> bytes:
        line = self.fh.readline(self.left)
        self.left -= len(line)
        return line


def load(fh, size: int):
    """Unpickle ``size`` bytes from the binary file ``fh`` with :class:`EDMUnpickler` (see the module docstring).

    Raises :class:`RefusedGlobal` for a global outside the allow-list, :class:`pickle.UnpicklingError`, EOFError
    or ValueError for damaged data.
    """
    return EDMUnpickler(BoundedReader(fh, size)).load()
