"""Synthetic certify shards for tests: a run config, its planned units, simulated counts, files split any way.

Typical use::

    cfg = make_config(sigma=0.5, n0=16, n=64, block_size=32, num_classes=4)
    units = plan_units(cfg, images=range(20))                       # (U, 4) in (image, stream, block) order
    probs = class_probs(num_images=20, num_classes=4, seed=0)        # (20, 4), one distribution per image
    counts = simulate_counts(units, probs, seed=1)                   # (U, 4) multinomial counts
    paths = write_split(tmp_path, cfg, units, counts, labels, num_files=4, seed=2)

Files are written with :class:`cpcluster.core.shard_writer.ShardWriter` (the real writer: journal, then atomic finish), or
with ``encode_shard`` directly when ``fast=True`` or ``complete=False`` (large benchmarks, unfinished files).
Images are numbered ``0..M-1`` here so ``probs[image]`` and ``labels[image]`` index by image.
"""
from __future__ import annotations

import os

import numpy as np

from cpcluster.core.shard_writer import ShardWriter
from cpcluster.core.shards import encode_shard, shard_name
from cpcluster.util.fileio import write_bytes_atomic


def make_config(sigma: float = 0.5, *, n0: int = 16, n: int = 64, block_size: int = 32, num_classes: int = 4,
                mode: str = "certify", purifier: str = "consistency", denoiser: str | None = "demo-random",
                seed: int = 0, **extra) -> dict:
    """A config with the keys certify writes (DESIGN.md §4); ``extra`` adds or overrides keys."""
    cfg = {"sigma": sigma, "n0": n0, "n": n, "block_size": block_size, "draw_batch": min(block_size, 32),
           "seed": seed, "num_classes": num_classes, "mode": mode,
           "dataset": {"id": "demo", "fingerprint": "synthetic"},
           "purifier": {"kind": purifier, "time_rule": "nearest"},
           "denoiser": None if denoiser is None or purifier == "none" else {"spec": denoiser, "sha256": "0" * 64},
           "classifier": {"spec": "demo-random", "sha256": "1" * 64}, "dtype": "float32", "noise": "counter-v2",
           "code_version": "test"}
    cfg.update(extra)
    return cfg


def plan_units(config: dict, images) -> np.ndarray:
    """(U, 4) int64 rows ``[image, stream, block, n_draws]`` the config plans, in (image, stream, block) order."""
    n, bs = config["n"], config["block_size"]
    blocks = [(1, b, min(bs, n - b * bs)) for b in range(-(-n // bs))]
    per_image = ([(0, 0, config["n0"])] if config.get("mode", "certify") == "certify" else []) + blocks
    return np.array([(i, s, b, d) for i in images for s, b, d in per_image], dtype=np.int64).reshape(-1, 4)


def class_probs(num_images: int, num_classes: int, seed: int, top: tuple = (0.3, 0.999)) -> np.ndarray:
    """(M, C) class distributions: a random top class with probability U(top), the rest spread at random."""
    rng = np.random.default_rng(seed)
    p_top = rng.uniform(*top, size=num_images)
    rest = rng.dirichlet(np.ones(num_classes - 1), size=num_images) * (1 - p_top)[:, None]
    cls = rng.integers(0, num_classes, size=num_images)
    probs = np.empty((num_images, num_classes))
    for i in range(num_images):
        probs[i] = np.insert(rest[i], cls[i], p_top[i])
    return probs


def simulate_counts(units: np.ndarray, probs: np.ndarray, seed: int) -> np.ndarray:
    """(U, C) int64 multinomial counts of each unit's ``n_draws`` from ``probs[image]``."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(units[:, 3], probs[units[:, 0]]).astype(np.int64)


def write_shard(url: str, config: dict, units: np.ndarray, counts: np.ndarray, labels, *, index: int = 0,
                total: int = 1, image_order=None, complete: bool = True, fast: bool = False) -> str:
    """Write one shard holding ``units``/``counts`` (appended in the given row order); returns ``url``.

    ``labels[image]`` gives each touched image's label; ``image_order`` permutes the file's image list.
    """
    images = np.unique(units[:, 0]) if len(units) else np.zeros(0, dtype=np.int64)
    if image_order is not None:
        images = images[image_order]
    lab = np.asarray(labels, dtype=np.int64)[images] if len(images) else images
    info = {"index": index, "total": total, "host": "synthetic"}
    if fast or not complete:
        write_bytes_atomic(url, encode_shard(config, info, units, counts, images, lab, complete=complete))
        return url
    w = ShardWriter(url, config=config, shard_info=info, image_index=images, labels=lab,
                    num_classes=config["num_classes"])
    for u, c in zip(units, counts):
        w.append(tuple(u), c)
    w.finish({"end_time": 0.0})
    return url


def write_split(folder, config: dict, units: np.ndarray, counts: np.ndarray, labels, num_files: int, *,
                seed: int | None = None, contiguous: bool = True, fast: bool = False) -> list:
    """Split the units over ``num_files`` shard files in ``folder`` and write them; returns the paths.

    ``contiguous``: cut the unit list into balanced contiguous ranges (the sharding plan's layout); otherwise give
    each unit a random file (every file gets at least one). ``seed`` (not None) shuffles the rows inside each file,
    each file's image list, and the returned path order.
    """
    rng = np.random.default_rng(seed)
    u = len(units)
    if contiguous:
        owner = np.repeat(np.arange(num_files), np.diff(np.linspace(0, u, num_files + 1).round().astype(int)))
    else:
        owner = np.concatenate([np.arange(num_files), rng.integers(0, num_files, size=u - num_files)])
        owner = rng.permutation(owner)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for f in range(num_files):
        rows = np.flatnonzero(owner == f)
        if seed is not None:
            rows = rng.permutation(rows)
        nimg = len(np.unique(units[rows, 0]))
        order = rng.permutation(nimg) if seed is not None else None
        paths.append(write_shard(os.path.join(str(folder), shard_name(f, num_files)), config, units[rows],
                                 counts[rows], labels, index=f, total=num_files, image_order=order, fast=fast))
    if seed is not None:
        paths = [paths[i] for i in rng.permutation(len(paths))]
    return paths
