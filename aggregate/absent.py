"""Images held only by shard files that are absent, named from the run's plan (DESIGN.md section 3).

A shard file that never arrived leaves no trace of its images in the files present. Every shard's config holds
what the plan needs (dataset size, subset, ``n0``, ``n``, ``block_size``, mode) and every shard's attributes its
index and the shard count, so the plan is rebuilt with :func:`cpcluster.sharding.plan.plan_from_config` -- the
function ``certify`` itself plans with -- and checked against the files present before any image is named.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cpcluster.core.shards import ShardData
from cpcluster.sharding.plan import plan_from_config
from cpcluster.util.errors import InputError


def absent_images(shards: Sequence[ShardData], missing_shards: Sequence[int]) -> tuple:
    """``(images, problem)`` for one group whose shards ``missing_shards`` are absent.

    ``images``: (A,) int64 sorted indices of the images the plan gives to the absent shards and no present file
    lists. ``problem``: None, or why the images cannot be named (the config lacks the plan's keys, or the plan
    rebuilt from it disagrees with the files present); then ``images`` is empty.
    """
    none = np.zeros(0, dtype=np.int64)
    if not missing_shards:
        return none, None
    ref = shards[0]
    try:
        plan = plan_from_config(ref.config, int(ref.shard["total"]))
    except (KeyError, TypeError, ValueError, AttributeError, InputError):
        return none, "its images cannot be named: the run config lacks the plan (dataset size, subset)"
    for s in shards:
        index = s.shard.get("index")
        planned = plan.shard_images(index) if isinstance(index, int) and 0 <= index < plan.num_shards else none
        if not np.isin(s.image_index, planned).all():
            return none, f"its images cannot be named: {s.path} lists images its shard's plan does not hold"
    held = np.unique(np.concatenate([plan.shard_images(k) for k in missing_shards]))
    listed = np.concatenate([s.image_index for s in shards])
    return np.setdiff1d(held, listed).astype(np.int64), None
