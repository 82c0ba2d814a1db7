"""Torch generators in the state of a noise batch (the scheme of :mod:`cpcluster.sharding.seeds`).

:class:`BatchGenerator` puts one ``torch.Generator`` into the state of batch ``(image, stream, j)`` of a run:

* on the CPU it sets the mt19937 generator's *whole* state with ``Generator.set_state`` (torch's ``manual_seed``
  keeps only 32 bits of a seed). The state is torch's ``CPUGeneratorImplState``, the one ``manual_seed`` makes with
  its 624 words replaced; :func:`check_cpu_layout` proves the byte layout on first use (a state built here from the
  words ``manual_seed(s)`` computes must draw what ``manual_seed(s)`` draws), so a torch that changed it fails
  loudly instead of drawing other noise;
* on CUDA it calls ``manual_seed`` with the batch's 64-bit seed, which the CUDA Philox generator keeps whole.

Setting a CPU state costs about 10 us, less than the SeedSequence seed it replaces.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from cpcluster.sharding.seeds import MT_WORDS, BatchStates

_WORDS_AT = 24  # byte offset of the 624 uint64 state words in CPUGeneratorImplState (after seed, left, seeded, next)
_layout_ok = False


def mt19937_init_words(seed: int) -> np.ndarray:
    """(624,) uint32 words mt19937's ``init_genrand(seed)`` makes from a 32-bit seed (what ``manual_seed`` does)."""
    words = np.empty(MT_WORDS, dtype=np.uint32)
    words[0] = seed & 0xFFFFFFFF
    for i in range(1, MT_WORDS):
        prev = int(words[i - 1])
        words[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
    return words


def cpu_state(words: np.ndarray) -> torch.Tensor:
    """A CPU generator state (uint8 tensor) whose mt19937 words are ``words`` (624,) uint32, freshly seeded."""
    state = torch.Generator().manual_seed(0).get_state().numpy().copy()
    state[_WORDS_AT:_WORDS_AT + 8 * MT_WORDS] = np.asarray(words, dtype=np.uint32).astype(np.uint64).view(np.uint8)
    return torch.from_numpy(state)


def check_cpu_layout() -> None:
    """Raise RuntimeError unless :func:`cpu_state` builds the state ``manual_seed`` builds (checked once)."""
    global _layout_ok
    if _layout_ok:
        return
    seed = 0x5EED1234
    ref, mine = torch.Generator().manual_seed(seed), torch.Generator()
    mine.set_state(cpu_state(mt19937_init_words(seed)))
    a, b = torch.empty(257).normal_(generator=ref), torch.empty(257).normal_(generator=mine)
    if not torch.equal(a, b) or not torch.equal(torch.randint(2**31, (64,), generator=ref),
                                                torch.randint(2**31, (64,), generator=mine)):
        raise RuntimeError(f"torch {torch.__version__} lays out its CPU generator state differently from what "
                           "cpcluster.core.noise expects; noise batches cannot be seeded (report this with the version)")
    _layout_ok = True


class BatchGenerator:
    """One ``torch.Generator`` on ``device`` that :meth:`seed` puts into the state of a noise batch of ``seed``."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"noise generators run on cpu or cuda, not {self.device.type}")
        self.states = BatchStates(seed)
        self.generator = torch.Generator(device=self.device)
        if self.device.type == "cpu":
            check_cpu_layout()
            self._state = cpu_state(np.zeros(MT_WORDS, dtype=np.uint32))
            self._words = self._state.numpy()[_WORDS_AT:_WORDS_AT + 8 * MT_WORDS].view(np.uint64)

    def seed(self, image: int, stream: int, j: int) -> torch.Generator:
        """The generator, in the state of batch ``j`` of (``image``, ``stream``)."""
        if self.device.type == "cpu":
            self._words[:] = self.states.mt19937_words(image, stream, j)
            self.generator.set_state(self._state)
        else:
            self.generator.manual_seed(self.states.cuda_seed(image, stream, j))
        return self.generator


def draw_noise(seed: int, image: int, stream: int, j: int, size: int, shape: Sequence[int],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of noise batch ``j`` of (``image``, ``stream``): (size, *shape) float32 on ``device``.

    The engine draws exactly this (into a slice of its buffer); multiply by sigma for pixel-space noise.
    """
    gen = BatchGenerator(seed, device).seed(image, stream, j)
    return torch.empty((size, *shape), dtype=torch.float32, device=device).normal_(generator=gen)
