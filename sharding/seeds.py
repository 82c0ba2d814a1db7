"""Counter-based noise states (DESIGN.md section 3): the noise of a draw is a function of where it sits in the plan.

Every stream of every image is drawn in *noise batches* of ``draw_batch`` draws: batch ``j`` of stream ``s`` of
image ``i`` holds draws ``[j * draw_batch, (j + 1) * draw_batch)`` of that stream (the last batch of a stream may
be shorter). An estimation block is a whole number of noise batches (``block_size % draw_batch == 0``), so the
noise of a draw depends only on ``(seed, i, s, j, draw_batch)``: never on the number of shards, on the shard that
ran it, or on the forward batch it was packed into.

Noise scheme :data:`NOISE_SCHEME` (recorded in every shard config as ``noise``). The run seed gives a 128-bit key
``K = SeedSequence(seed).generate_state(2, uint64)``; batch ``(i, s, j)`` gets a generator state that is an
injective function of the counter ``(i, s, j)`` under ``K``, so two batches of one run never share a state:

* **CPU** (torch's mt19937, whose ``manual_seed`` keeps only 32 bits of a seed, so 63-bit seeds of different
  batches collided): the full 19937-bit state is set. Word 0 is ``0x80000000`` (only its top bit is state), words
  1..623 are the raw output of Philox4x64-10 (numpy) under key ``K`` from counter ``(1, j, s, i)`` on. Philox is a
  bijection of its 256-bit counter for a fixed key, so words 1..8 -- the block of counter ``(1, j, s, i)`` --
  differ for every two batches, and so do the states.
* **CUDA** (torch's Philox, which keeps a whole 64-bit seed): the seed is a keyed bijection of
  ``i * 2**26 + s * 2**25 + j`` (:func:`cuda_seed`), distinct for every two batches of a run.

Selection (stream 0) and estimation (stream 1) have different counters, hence independent noise, as CERTIFY
requires. Counters are bounded: image indices below :data:`MAX_IMAGE`, batch indices below :data:`MAX_BATCH`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from cpcluster.util.errors import InputError

NOISE_SCHEME = "counter-v2"  # bump when the noise of a (seed, image, stream, batch) changes
MAX_IMAGE = 2**38
MAX_BATCH = 2**25
MT_WORDS = 624
_MASK64 = (1 << 64) - 1


def noise_key(seed: int) -> np.ndarray:
    """The run's 128-bit noise key: (2,) uint64 from ``numpy.random.SeedSequence(seed)``."""
    return np.random.SeedSequence(int(seed)).generate_state(2, np.uint64)


def _check_counter(image: int, stream: int, batch: int) -> None:
    if not (0 <= image < MAX_IMAGE and stream in (0, 1) and 0 <= batch < MAX_BATCH):
        raise ValueError(f"noise counter (image {image}, stream {stream}, batch {batch}) outside image < 2**38, "
                         "stream 0/1, batch < 2**25")


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection of [0, 2**64) (xor-shifts and odd multipliers are invertible)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class BatchStates:
    """Generator states of the noise batches of one run seed (module docstring); reuses one Philox generator."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.key = noise_key(self.seed)
        self._k0, self._k1 = int(self.key[0]), int(self.key[1])
        self._philox = np.random.Philox(key=self.key)
        self._empty = np.zeros(4, dtype=np.uint64)

    def mt19937_words(self, image: int, stream: int, batch: int) -> np.ndarray:
        """(624,) uint32 mt19937 state of batch ``(image, stream, batch)``: the CPU generator's whole state."""
        _check_counter(image, stream, batch)
        self._philox.state = {"bit_generator": "Philox", "buffer": self._empty, "buffer_pos": 4, "has_uint32": 0,
                              "uinteger": 0, "state": {"counter": np.array([0, batch, stream, image], np.uint64),
                                                       "key": self.key}}
        words = np.empty(MT_WORDS, dtype=np.uint32)
        words[0] = 0x80000000
        words[1:] = self._philox.random_raw(MT_WORDS // 2).view(np.uint32)[:MT_WORDS - 1]
        return words

    def cuda_seed(self, image: int, stream: int, batch: int) -> int:
        """64-bit Philox seed of batch ``(image, stream, batch)`` for a CUDA generator: a keyed bijection."""
        _check_counter(image, stream, batch)
        packed = (image << 26) | (stream << 25) | batch
        return _mix64(_mix64(packed ^ self._k0) ^ self._k1)


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


def check_forward_batch(batch: int, draw_batch: int) -> None:
    """Raise :class:`InputError` unless a forward of ``batch`` draws holds at least one whole noise batch."""
    if batch < draw_batch:
        raise InputError(f"--batch {batch} is smaller than --draw-batch {draw_batch}; a forward must hold at least "
                         "one whole noise batch")


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
