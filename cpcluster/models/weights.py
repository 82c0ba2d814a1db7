"""Safe weight files: safetensors, or ``torch.load(weights_only=True)``; never a plain unpickle. Any fsspec URL."""
from __future__ import annotations

import hashlib

import torch

from cpcluster.util.errors import InputError
from cpcluster.util.fileio import MAX_JSON_BYTES, open_regular, read_json, read_regular


def read_bytes(url: str, what: str) -> bytes:
    """The bytes of the regular file ``url`` (:func:`cpcluster.util.fileio.read_regular`: no FIFO or device)."""
    return read_regular(url, what)


def sha256_bytes(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def sha256_file(url: str, what: str, chunk: int = 2**24) -> str:
    """sha256 of a file read in chunks (a multi-GB checkpoint is not held in memory for it)."""
    digest = hashlib.sha256()
    with open_regular(url, what) as fh:
        try:
            while block := fh.read(chunk):
                digest.update(block)
        except OSError as e:
            raise InputError(f"{what} {url}: cannot read ({e.strerror or e})") from None
    return digest.hexdigest()


def read_json_object(url: str, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in ``url`` (metadata, configs): at most ``max_bytes``, UTF-8, an object at the top level.

    Anything else (too large, not JSON, too deeply nested, a list) is one :class:`InputError` naming the file.
    """
    return read_json(url, what, dict, max_bytes)


def load_state_dict(url: str, what: str = "checkpoint") -> tuple[dict, str]:
    """``(state_dict, sha256)`` of a ``.safetensors`` file or a torch file loadable with ``weights_only=True``.

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped. Anything else (a pickle that
    needs arbitrary globals, a damaged file) is refused with an :class:`InputError` naming the file.
    """
    raw = read_bytes(url, what)
    digest = sha256_bytes(raw)
    if url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(raw), digest
        except Exception as e:  # safetensors raises its own error types
            raise InputError(f"{what} {url}: not a valid safetensors file ({type(e).__name__})") from None
    import io

    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{what} {url}: cannot be loaded with weights_only=True ({type(e).__name__}); "
                         "save a plain state_dict or a .safetensors file") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{what} {url}: does not hold a state_dict of tensors")
    return obj, digest


def load_sharded_state_dict(index_url: str, what: str = "checkpoint") -> tuple[dict, str]:
    """``(state_dict, sha256)`` of weights split over several files by a ``*.index.json`` (``save_pretrained`` with
    ``max_shard_size``): its ``weight_map`` maps each tensor name to a file in the index's folder.

    The sha256 is that of the lines ``<file name>:<sha256 of the file>``, one per file in name order, so it changes
    whenever any shard does. Every file is read with :func:`load_state_dict`; a tensor the map lists but no file
    holds, or a file name that leaves the folder, is an :class:`InputError` naming the index.
    """
    weight_map = read_json_object(index_url, what).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and v and "/" not in v and "\\" not in v and v not in (".", "..")
            for v in weight_map.values()):
        raise InputError(f"{what} {index_url}: weight_map must map tensor names to file names in the same folder")
    folder = index_url.rsplit("/", 1)[0]
    state, digest = {}, hashlib.sha256()
    for name in sorted(set(weight_map.values())):
        part, part_digest = load_state_dict(f"{folder}/{name}", what)
        digest.update(f"{name}:{part_digest}\n".encode())
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise InputError(f"{what} {index_url}: {len(missing)} tensor(s) of its weight_map are in none of its files "
                         f"(first: {missing[0]})")
    return state, digest.hexdigest()


def apply_state_dict(module: torch.nn.Module, state: dict, url: str, what: str = "checkpoint") -> None:
    """Load ``state`` strictly; a mismatch is an :class:`InputError` naming the file and the first bad keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise InputError(f"{what} {url}: weights do not fit the architecture ({' '.join(first)[:300]})") from None
