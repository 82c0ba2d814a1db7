"""The Monte Carlo counting engine: seeded noise -> purify -> classify -> per-unit class counts, on one device.

For each unit ``[image, stream, block, n_draws]`` (see :mod:`cpcluster.sharding.plan`) the engine draws the unit's
noise batches on the device, each from a generator in the state of batch ``(seed, image, stream, j)``
(:mod:`cpcluster.core.noise`, :mod:`cpcluster.sharding.seeds`), adds them to the clean image, runs the
base classifier ``f(x + delta) = clf(D(x + delta))`` and counts ``argmax`` labels with ``torch.bincount`` on the
device. Only finished units' counts (C int64 values each) go to the host, through ``on_unit``.

Throughput (DESIGN.md section 6). Noise batches of several units and images are packed into one forward of up to
``batch`` draws; images stay on the device; the counts of a forward are copied to the host asynchronously and read
one forward later, so on a GPU the host never waits for a forward in flight.

Reproducibility. The noise of a draw depends only on ``(seed, image, stream, j, draw_batch)`` and the RNG device
type. The last forward of a run is padded to ``batch`` rows, so every forward has the same shape and a draw's
logits do not depend on which shard ran it or where the shard boundaries fell (checked on CPU: a row's output is
the same whatever the other rows of a same-sized batch hold). A purifier that consumes the generator (e.g. random
class labels) is instead called once per noise batch with that batch's generator, right after its noise: its
randomness is then also a function of ``(seed, image, stream, j)``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from cpcluster.core.choices import DTYPES, check_choice
from cpcluster.core.noise import BatchGenerator, draw_noise  # noqa: F401 (draw_noise: what the engine draws)
from cpcluster.sharding.seeds import check_forward_batch, unit_batches

AUTOCAST = {name: None if name == "float32" else getattr(torch, name) for name in DTYPES}  # --dtype -> autocast


def needs_generator(model: Callable, probe: torch.Tensor) -> bool:
    """Whether ``model(x, generator)`` draws from ``generator``.

    A purifier may declare it with a ``uses_generator`` attribute (on the model or its ``purifier``); otherwise
    one forward of ``probe`` (1, C, H, W) tells whether the generator state moved.
    """
    for obj in (model, getattr(model, "purifier", None)):
        declared = getattr(obj, "uses_generator", None)
        if isinstance(declared, bool):
            return declared
    gen = torch.Generator(device=probe.device).manual_seed(0)
    before = gen.get_state()
    with torch.inference_mode():
        model(probe, gen)
    return not torch.equal(before, gen.get_state())


@dataclass
class EngineStats:
    """What a :meth:`CountingEngine.run` did: draws counted, forwards run, units finished, wall seconds."""

    draws: int = 0
    forwards: int = 0
    units: int = 0
    seconds: float = 0.0

    @property
    def draws_per_s(self) -> float:
        return self.draws / self.seconds if self.seconds > 0 else 0.0


class CountingEngine:
    """Counts the base classifier's labels under seeded Gaussian noise, unit by unit.

    Parameters
    ----------
    model : ``model(x_noisy, generator=None) -> logits``; x_noisy (B, C, H, W) pixel space ``x + delta``
        (not clamped), logits (B, num_classes). Normally a :class:`cpcluster.models.purifier_base.SmoothedBase`.
    images : (M, C, H, W) float32 pixel-space [0, 1] clean images, already on the device the engine runs on.
    image_ids : (M,) dataset indices of ``images`` (the ``image`` of a unit names a row through this).
    sigma : pixel-space noise standard deviation.
    seed, block_size, draw_batch : the run's seed and batching (see :mod:`cpcluster.sharding.seeds`).
    batch : draws per forward (>= draw_batch); whole noise batches are packed up to this size.
    num_classes : C.
    dtype : ``"float32"`` or an autocast dtype (``"bfloat16"``, ``"float16"``) for the forward.
    per_batch_generator : call the model once per noise batch with its generator; ``None`` asks
        :func:`needs_generator`.
    """

    def __init__(self, model: Callable, images: torch.Tensor, image_ids: Sequence[int], *, sigma: float,
                 seed: int, block_size: int, draw_batch: int, batch: int, num_classes: int,
                 dtype: str = "float32", per_batch_generator: bool | None = None):
        check_forward_batch(batch, draw_batch)
        check_choice("--dtype", dtype, DTYPES)
        self.model = model
        self.images = images.to(torch.float32)
        self.device = images.device
        self.row = {int(i): r for r, i in enumerate(np.asarray(image_ids, dtype=np.int64).reshape(-1))}
        self.sigma, self.seed = float(sigma), int(seed)
        self.block_size, self.draw_batch, self.batch = int(block_size), int(draw_batch), int(batch)
        self.num_classes = int(num_classes)
        self.autocast = AUTOCAST[dtype]
        if per_batch_generator is None:
            per_batch_generator = needs_generator(model, self.images[:1])
        self.per_batch_generator = per_batch_generator
        self._batch_gen = BatchGenerator(self.seed, self.device)
        self._gen = self._batch_gen.generator
        self._buf = torch.empty((self.batch, *self.images.shape[1:]), dtype=torch.float32, device=self.device)
        self._layouts: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------ run
    def run(self, units: np.ndarray, on_unit: Callable[[np.ndarray, np.ndarray], None],
            on_progress: Callable[[EngineStats], None] | None = None) -> EngineStats:
        """Count every unit of ``units`` (u, 4) and call ``on_unit(unit_row (4,), counts (C,) int64)`` in order.

        ``on_unit`` runs as soon as a unit's counts reach the host (at most one forward later than its last
        draw), so a caller that records it durably loses at most the forwards in flight when killed.
        ``on_progress(stats)`` runs after every forward.
        """
        units = np.asarray(units, dtype=np.int64).reshape(-1, 4)
        stats = EngineStats()
        t0 = time.perf_counter()
        self._acc, self._pending = {}, None
        call = _Callbacks(units, on_unit, on_progress, stats, t0)
        group: list[tuple] = []
        filled = 0
        with torch.inference_mode():
            for pos, (image, stream, block, n_draws) in enumerate(units):
                if int(image) not in self.row:
                    raise ValueError(f"unit image {int(image)} is not among the engine's images")
                batches = list(unit_batches(int(stream), int(block), int(n_draws), self.block_size, self.draw_batch))
                for k, (j, size) in enumerate(batches):
                    if filled + size > self.batch:
                        self._forward(group, call)
                        group, filled = [], 0
                    group.append((pos, int(image), int(stream), j, size, k == len(batches) - 1))
                    filled += size
            if group:
                self._forward(group, call)
            if self._pending is not None:
                self._deliver(self._pending, call)
                self._pending = None
        stats.seconds = time.perf_counter() - t0
        return stats

    def _noise_into(self, seg: torch.Tensor, image: int, stream: int, j: int) -> None:
        """``seg`` (size, C, H, W) <- x_image + sigma * noise of batch j, in place (pixel space, not clamped)."""
        self._batch_gen.seed(image, stream, j)
        seg.normal_(generator=self._gen).mul_(self.sigma).add_(self.images[self.row[image]])

    def _forward(self, group: list[tuple], call: "_Callbacks") -> None:
        n = sum(item[4] for item in group)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if self.per_batch_generator:
                parts, a = [], 0
                for _, image, stream, j, size, _ in group:
                    seg = self._buf[a:a + size]
                    self._noise_into(seg, image, stream, j)
                    parts.append(self.model(seg, self._gen))
                    a += size
                logits = torch.cat(parts)
            else:
                a = 0
                for _, image, stream, j, size, _ in group:
                    self._noise_into(self._buf[a:a + size], image, stream, j)
                    a += size
                if n < self.batch:
                    self._buf[n:].zero_()  # pad: every forward has the same shape (see module docstring)
                logits = self.model(self._buf)[:n]
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected (B, "
                             f"{self.num_classes}): the classifier and the dataset disagree on the classes")
        pred = logits.argmax(dim=1)
        # consecutive noise batches of one unit form one slot; count (slot, class) pairs in one bincount
        slots, sizes = [], []
        for pos, _, _, _, size, _ in group:
            if slots and slots[-1] == pos:
                sizes[-1] += size
            else:
                slots.append(pos)
                sizes.append(size)
        counts = torch.bincount(self._slot_ids(tuple(sizes)) * self.num_classes + pred,
                                minlength=len(slots) * self.num_classes).view(len(slots), self.num_classes)
        for s, pos in enumerate(slots):
            self._acc[pos] = self._acc[pos] + counts[s] if pos in self._acc else counts[s]
        done = [item[0] for item in group if item[5]]
        call.stats.draws += n
        call.stats.forwards += 1
        previous, self._pending = self._pending, None
        if done:
            dev = torch.stack([self._acc.pop(pos) for pos in done])
            host = torch.empty(dev.shape, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            host.copy_(dev, non_blocking=True)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            self._pending = (done, host, event)
        if previous is not None:
            self._deliver(previous, call)
        if call.on_progress is not None:
            call.stats.seconds = time.perf_counter() - call.t0
            call.on_progress(call.stats)

    def _deliver(self, pending, call: "_Callbacks") -> None:
        done, host, event = pending
        if event is not None:
            event.synchronize()
        for pos, row in zip(done, host.numpy()):
            call.on_unit(call.units[pos].copy(), row.copy())
            call.stats.units += 1

    def _slot_ids(self, sizes: tuple) -> torch.Tensor:
        """(sum(sizes),) int64 slot index of every row on the device, cached per layout."""
        ids = self._layouts.get(sizes)
        if ids is None:
            ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(self.device)
            if len(self._layouts) < 256:
                self._layouts[sizes] = ids
        return ids


@dataclass
class _Callbacks:
    units: np.ndarray
    on_unit: Callable
    on_progress: Callable | None
    stats: EngineStats
    t0: float


def measure_rate(model: Callable, images: torch.Tensor, sigma: float, batch: int, repeats: int = 2) -> float:
    """Draws per second of ``model`` on ``images``' device: ``repeats`` timed forwards of ``batch`` noisy copies.

    A rough figure for planning (``--dry-run``), after one untimed warm-up forward; not a benchmark.
    """
    x = images[:1].expand(batch, *images.shape[1:]) + sigma * torch.randn(batch, *images.shape[1:],
                                                                          device=images.device)
    with torch.inference_mode():
        model(x)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x).argmax(1).cpu()
        return repeats * batch / max(time.perf_counter() - t0, 1e-9)
