"""NVlabs/edm reference cases (``tests/data/edm``) and a writer of EDM network pickles in the persistence layout.

The files were made by ``scripts/dev/make_edm_reference.py`` from EDM's own code: per case a state_dict with EDM's
key names, the module tree that ``torch_utils.persistence`` pickles (classes, attributes, init args), and EDM's
forward on fixed inputs. :func:`write_edm_pickle` rebuilds a snapshot pickle from them, laid out as EDM's training
loop writes one (``pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=None, dataset_kwargs=...))``, protocol 4,
every persistent object as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``), but with a stand-in
``module_src`` that would only write a marker file if anything ever executed it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
import types

import numpy as np
import torch
from torch import nn

DATA = os.path.join(os.path.dirname(__file__), "data", "edm")
CASES = ("ddpmpp-cond", "adm-cond", "vp-skip", "ve-ncsnpp", "iddpm-adm")
TORCH_CLASSES = {"torch.nn.modules.container.ModuleDict": nn.ModuleDict}


def load_case(name: str) -> tuple[dict, dict, dict]:
    """``(record, state (float32, EDM key names), arrays (x, sigma, labels, out[, out_nolabel]))`` of a case."""
    from safetensors.torch import load_file

    with open(os.path.join(DATA, f"{name}.json")) as fh:
        record = json.load(fh)
    state = {k: v.float() for k, v in load_file(os.path.join(DATA, f"{name}.safetensors")).items()}
    with np.load(os.path.join(DATA, f"{name}.npz")) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return record, state, arrays


_SCALARS: dict = {}


def decode(value, key: str = ""):
    """Inverse of the reference script's ``encode``: numpy scalars, tuples, infinities back. Strings are interned,
    and numpy scalars of one argument name and value are one object, as in EDM's pickles (its blocks share the
    ``np.sqrt(0.5)`` they were built with)."""
    if isinstance(value, dict):
        if "__numpy__" in value:
            tag = (key, value["__numpy__"], value["value"])
            return _SCALARS.setdefault(tag, np.dtype(tag[1]).type(tag[2]))
        if "__float__" in value:
            return float(value["__float__"])
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        return {sys.intern(k): decode(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return sys.intern(value) if isinstance(value, str) else value


def _reconstruct_persistent_obj(meta):  # pickled by name only; never called
    raise AssertionError("stand-in: the tests never unpickle with EDM's persistence module")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class _Persistent:
    """Pickles like a ``torch_utils.persistence`` class: ``(_reconstruct_persistent_obj, (meta,))``."""

    _orig_class_name = "?"
    _orig_module_src = ""

    def __reduce__(self):
        fields = list(super().__reduce__())
        fields += [None] * max(3 - len(fields), 0)
        meta = dict(type="class", version=6, module_src=self._orig_module_src, class_name=self._orig_class_name,
                    state=fields[2])
        return (_reconstruct_persistent_obj, (meta,), None, *fields[3:])


def _persistent_class(name: str, module_src: str, base=nn.Module) -> type:
    return type(name, (_Persistent, base), {"_orig_class_name": name, "_orig_module_src": module_src})


def marker_source(marker: str) -> str:
    """A module_src that, if ever executed, writes ``marker``: the tests assert the file never appears."""
    return f"open({marker!r}, 'w').write('module_src was executed')\n"


def build_tree(record: dict, state: dict, module_src: str) -> nn.Module:
    """The ``ema`` module tree of ``record`` (persistent nodes pickling as EDM's), tensors from ``state``."""
    nodes: dict[str, nn.Module] = {}
    for entry in record["tree"]:  # named_modules order: parents first
        path = entry["path"]
        cls = (_persistent_class(entry["class"], module_src) if entry["persistent"]
               else TORCH_CLASSES[entry["class"]])
        node = cls.__new__(cls)
        nn.Module.__init__(node)
        node.training = entry["training"]
        prefix = path + "." if path else ""
        for name, present in entry["parameters"]:
            node._parameters[name] = nn.Parameter(state[prefix + name].clone(), requires_grad=False) if present \
                else None
        for name, present in entry["buffers"]:
            node._buffers[name] = state[prefix + name].clone() if present else None
        node._non_persistent_buffers_set.update(entry["non_persistent_buffers"])
        for key, value in entry["attrs"]:
            node.__dict__[sys.intern(key)] = decode(value, key)
        if entry["persistent"]:
            node.__dict__["_init_args"] = decode(entry["init_args"])
            node.__dict__["_init_kwargs"] = decode(entry["init_kwargs"])
        nodes[path] = node
        if path:
            parent, _, name = path.rpartition(".")
            nodes[parent]._modules[name] = node
    return nodes[""]


@contextlib.contextmanager
def _persistence_module_name():
    """Let pickle name the stand-in as ``torch_utils.persistence._reconstruct_persistent_obj`` while dumping."""
    names = ("torch_utils", "torch_utils.persistence")
    saved = {n: sys.modules.get(n) for n in names}
    package, module = types.ModuleType(names[0]), types.ModuleType(names[1])
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    sys.modules.update(zip(names, (package, module)))
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def snapshot(name: str, module_src: str = "# stand-in\n") -> dict:
    """The dict EDM's training loop pickles, for case ``name``."""
    record, state, _ = load_case(name)
    loss = _persistent_class(record["loss_fn"]["class"], module_src, object)()
    loss.__dict__.update({k: decode(v, k) for k, v in record["loss_fn"]["attrs"]})
    loss.__dict__.update(_init_args=decode(record["loss_fn"]["init_args"]),
                         _init_kwargs=decode(record["loss_fn"]["init_kwargs"]))
    return dict(ema=build_tree(record, state, module_src), loss_fn=loss, augment_pipe=None,
                dataset_kwargs=decode(record["dataset_kwargs"]))


def dump_edm_pickle(data, path: str | None = None, protocol: int = 4) -> bytes:
    """Pickle ``data`` (built with :func:`snapshot`) as EDM does (Python 3.8-3.13's default protocol 4); write it
    to ``path`` when given."""
    with _persistence_module_name():
        raw = pickle.dumps(data, protocol=protocol)
    if path:
        with open(path, "wb") as fh:
            fh.write(raw)
    return raw


def write_edm_pickle(path: str, name: str, module_src: str = "# stand-in\n") -> str:
    """Write case ``name`` as an EDM snapshot pickle to ``path``; returns ``path``."""
    dump_edm_pickle(snapshot(name, module_src), path)
    return path


def pickle_structure(raw: bytes) -> list:
    """The opcode stream of a pickle with memo references resolved to what they stand for, multi-line strings
    (module_src) replaced by a placeholder and embedded storages by their dtype and data hash: two pickles of the
    same objects give the same list even when their memo numbering or their string sharing differ."""
    import hashlib
    import pickletools

    memo, out, last = {}, [], None
    for op, arg, _ in pickletools.genops(raw):
        name = op.name
        if name == "FRAME":
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            token = memo[arg]
        elif "UNICODE" in name:
            token = ("str", "<source text>" if "\n" in arg else arg)
        elif name == "SHORT_BINBYTES":  # numpy scalars
            token = ("bytes", arg.hex())
        elif "BYTES" in name:  # an embedded storage: its dtype and data (its key is a memory address)
            storage = torch.load(io.BytesIO(arg), weights_only=True)
            token = ("storage", str(storage.dtype), hashlib.sha256(bytes(storage._untyped_storage)).hexdigest()[:16])
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "INT"):
            token = ("int", arg)
        else:
            token = (name, arg)
        out.append(token)
        last = token
    return out
