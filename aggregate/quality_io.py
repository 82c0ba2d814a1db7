"""The quality shard file: one ``.npz`` per shard of a purification-quality run; numpy only (no torch, no pickle).

``<run_dir>/quality-{index:05d}-of-{total:05d}.npz``, written atomically by ``jobs/quality.py``, read by
``aggregate/quality.py``. Arrays, for the M images of the shard (in dataset index order):

| key | shape / dtype | meaning |
|---|---|---|
| ``image_index``, ``labels`` | (M,) int64 | dataset indices and true labels |
| ``features`` | (M, 2048) float32 | Inception pool3 features of the purified image (FID) |
| ``images`` | (M, C, H, W) float16 | the purified image, pixel space [0, 1] (transport distance) |
| ``lpips``, ``l2`` | (M,) float64 | LPIPS and Euclidean distance (pixel space) to the clean image |
| ``pred`` | (M,) int64 | the classifier's prediction on the purified image |
| ``config`` | () unicode | the run's configuration, JSON; ``config_hash`` its sha256 (as for certify shards) |
| ``shard`` | () unicode | JSON: index, total, host, device, seconds |

For the clean reference run (``purifier.kind == "clean"``) the "purified" image is the clean image itself.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from cpcluster.util.errors import InputError

SHARD_GLOB = "quality-*-of-*.npz"
ARRAYS = {"image_index": np.int64, "labels": np.int64, "features": np.float32, "images": np.float16,
          "lpips": np.float64, "l2": np.float64, "pred": np.int64}
MAX_SHARD_BYTES = 8 * 2**30


def shard_name(index: int, total: int) -> str:
    return f"quality-{index:05d}-of-{total:05d}.npz"


def shard_bytes(arrays: dict, config: dict, config_hash: str, shard: dict) -> bytes:
    """The ``.npz`` bytes of one shard (see the module docstring); ``arrays`` are cast to the table's dtypes."""
    buf = io.BytesIO()
    payload = {k: np.asarray(arrays[k], dtype=dtype) for k, dtype in ARRAYS.items()}
    np.savez(buf, **payload, config=np.array(json.dumps(config, sort_keys=True)), config_hash=np.array(config_hash),
             shard=np.array(json.dumps(shard, sort_keys=True)))
    return buf.getvalue()


@dataclass
class QualityShard:
    """One shard file, read and checked."""

    path: str
    config: dict
    config_hash: str
    shard: dict
    arrays: dict


def read_quality_shard(url: str) -> QualityShard:
    """Read ``url`` (any fsspec URL) without pickle; :class:`InputError` naming the file for anything malformed."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as fh:
            raw = fh.read(MAX_SHARD_BYTES + 1)
    except (OSError, ValueError) as e:
        raise InputError(f"{url}: cannot read ({e})") from None
    if len(raw) > MAX_SHARD_BYTES:
        raise InputError(f"{url}: larger than {MAX_SHARD_BYTES} bytes; not a quality shard")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        config, shard = json.loads(str(data["config"])), json.loads(str(data["shard"]))
        config_hash = str(data["config_hash"])
    except (ValueError, KeyError, OSError, EOFError) as e:  # not an npz, a pickled array, a missing key, bad JSON
        raise InputError(f"{url}: not a quality shard file ({type(e).__name__}: {str(e)[:100]})") from None
    arrays = {}
    for key, dtype in ARRAYS.items():
        if key not in data or data[key].dtype != dtype:
            raise InputError(f"{url}: array {key!r} missing or not {np.dtype(dtype).name}; not a quality shard file")
        arrays[key] = data[key]
    m = len(arrays["image_index"])
    if any(len(v) != m for v in arrays.values()) or arrays["features"].ndim != 2 or arrays["images"].ndim != 4:
        raise InputError(f"{url}: arrays of unequal length or wrong rank; the file is damaged")
    return QualityShard(url, config, config_hash, shard, arrays)
