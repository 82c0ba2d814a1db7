"""Counter-based noise seeds (DESIGN.md section 3): the noise of a draw is a function of where it sits in the plan.

Every stream of every image is drawn in *noise batches* of ``draw_batch`` draws: batch ``j`` of stream ``s`` of
image ``i`` holds draws ``[j * draw_batch, (j + 1) * draw_batch)`` of that stream (the last batch of a stream may
be shorter) and is drawn from a generator seeded with :func:`batch_seed` ``(seed, i, s, j)``. An estimation block
is a whole number of noise batches (``block_size % draw_batch == 0``), so the noise of a draw depends only on
``(seed, i, s, j, draw_batch)``: never on the number of shards, on the shard that ran it, or on the forward batch
it was packed into. Selection (stream 0) and estimation (stream 1) use different spawn keys, hence independent
noise, as CERTIFY requires.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from cpcluster.errors import InputError

_MASK63 = (1 << 63) - 1


def batch_seed(seed: int, image: int, stream: int, batch: int) -> int:
    """A 63-bit seed for noise batch ``batch`` of (``image``, ``stream``), from ``numpy.random.SeedSequence``.

    ``SeedSequence(seed, spawn_key=(image, stream, batch))`` hashes the run seed and the three counters into
    statistically independent states (the same mechanism as ``SeedSequence.spawn``); distinct counters give
    independent streams.
    """
    state = np.random.SeedSequence(int(seed), spawn_key=(int(image), int(stream), int(batch))).generate_state(
        2, np.uint32)
    return ((int(state[1]) << 32) | int(state[0])) & _MASK63


def check_batching(block_size: int, draw_batch: int) -> None:
    """Raise :class:`InputError` unless an estimation block is a whole number of noise batches."""
    if draw_batch < 1:
        raise InputError(f"--draw-batch {draw_batch}: use at least 1")
    if block_size < 1:
        raise InputError(f"--block-size {block_size}: use at least 1")
    if block_size % draw_batch:
        raise InputError(f"--block-size {block_size} is not a multiple of --draw-batch {draw_batch}; a block must "
                         "be a whole number of noise batches (e.g. --block-size "
                         f"{max(draw_batch, block_size - block_size % draw_batch)})")


def unit_batches(stream: int, block: int, n_draws: int, block_size: int,
                 draw_batch: int) -> Iterator[tuple[int, int]]:
    """The noise batches ``(j, size)`` that make up one unit, in draw order.

    The selection unit (stream 0, block 0) starts at draw 0 of its stream; estimation block ``b`` starts at draw
    ``b * block_size``. Sizes are ``draw_batch`` except the last batch of the unit, which holds the remainder (only
    the last unit of a stream can have one).
    """
    start = block * block_size if stream else 0
    j0 = start // draw_batch
    full, rest = divmod(int(n_draws), draw_batch)
    for k in range(full):
        yield j0 + k, draw_batch
    if rest:
        yield j0 + full, rest
