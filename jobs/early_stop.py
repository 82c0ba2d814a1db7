"""Counting one shard with early stopping (``certify --early-stop MAX_ALPHA``), in rounds.

A shard of an early-stopping run holds whole images (the plan's interleaved layout). Each round asks
:func:`cpcluster.aggregate.skipping.image_step` what every image needs next -- its selection unit, or the
estimation blocks that are safe to count before the next decision -- and counts them in one engine run (noise
batches of many images packed into full forwards; what does not fill a whole forward waits for the next round). Images whose
selection picks a wrong class, or whose abstention becomes certain, get no further units; what they skip is
returned for the shard file's ``skipped`` dataset.

Every decision is a function of the image's own recorded counts, read back from the journal before each round, so
a killed shard resumes with exactly the decisions an uninterrupted one makes, and any number of shards gives the
same units, counts and skips.
"""
from __future__ import annotations

import numpy as np

from cpcluster.aggregate.skipping import image_step
from cpcluster.sharding.plan import ESTIMATION, SELECTION
from cpcluster.sharding.seeds import unit_batches


def _state(writer) -> tuple:
    """``({image: selection counts}, {image: {block: counts}})`` of the units recorded so far."""
    units, counts = writer.recorded
    selection, blocks = {}, {}
    for (image, stream, block, _), row in zip(units.tolist(), counts):
        if stream == SELECTION:
            selection[image] = row
        else:
            blocks.setdefault(image, {})[block] = row
    return selection, blocks


def next_round(units: np.ndarray, labels: dict, writer, n: int, max_alpha: float) -> tuple:
    """``(units to count now (u, 4), skipped rows (S, 5))`` from the recorded state; skipped only for images that
    are finished. ``units``: the shard's planned units, whole images in plan order."""
    selection, blocks = _state(writer)
    todo, skipped = [], []
    for image in dict.fromkeys(units[:, 0].tolist()):
        mine = units[units[:, 0] == image]
        sel = mine[mine[:, 1] == SELECTION]
        est = mine[mine[:, 1] == ESTIMATION]
        draws = est[np.argsort(est[:, 2]), 3].tolist()
        step = image_step(selection.get(image), labels[image], draws, blocks.get(image, {}), n, max_alpha)
        if step.selection:
            todo += sel.tolist()
        todo += [[image, ESTIMATION, b, draws[b]] for b in step.run]
        skipped += [[image, ESTIMATION, b, draws[b], reason] for b, reason in step.skipped]
    return np.asarray(todo, dtype=np.int64).reshape(-1, 4), np.asarray(skipped, dtype=np.int64).reshape(-1, 5)


def full_forwards_prefix(todo: np.ndarray, block_size: int, draw_batch: int, batch: int) -> int:
    """How many leading units of ``todo`` end exactly on a full forward when the engine packs their noise batches
    (greedily, ``batch`` draws per forward); 0 when no prefix does."""
    filled, best = 0, 0
    for k, (_, stream, block, n_draws) in enumerate(todo.tolist()):
        for _, size in unit_batches(stream, block, n_draws, block_size, draw_batch):
            filled = size if filled + size > batch else filled + size
        if filled == batch:
            best = k + 1
    return best


def count_in_rounds(counter, units: np.ndarray, labels: dict, writer, n: int, max_alpha: float) -> np.ndarray:
    """Count the shard's units round by round with ``counter.count(units)``; return the (S, 5) skipped rows.

    The engine pads the last forward of every run to its fixed shape, so a round counts only the units that fill
    whole forwards and leaves the rest to the next round, which recomputes them with new work of other images:
    only a round whose units fill no forward at all is padded (in practice the last one or two of a shard).
    Deferring a unit changes no decision, because every decision depends on the image's own counts only."""
    cfg = counter.run.config
    while True:
        todo, skipped = next_round(units, labels, writer, n, max_alpha)
        if not len(todo):
            return skipped
        k = full_forwards_prefix(todo, cfg.block_size, cfg.draw_batch, cfg.batch)
        counter.count(todo[:k] if k else todo)


# ------------------------------------------------------------------------------------------------------ dry run
def recorded_selection(run) -> dict:
    """``{image: (C,) selection counts}`` recorded so far in ``run``'s directory (finished shards and journals)."""
    from cpcluster.core.journal import journal_path, read_journal
    from cpcluster.core.shards import read_shard
    from cpcluster.util.fileio import exists

    out = {}
    for k in range(run.plan.num_shards):
        url = run.shard_url(k)
        if exists(url):
            shard = read_shard(url)
            units, counts = (shard.units, shard.counts) if shard.config_hash == run.config_hash else ((), ())
        else:
            state = read_journal(journal_path(url, None))
            ok = state is not None and state.header.get("config_hash") == run.config_hash
            units, counts = (state.units, state.counts) if ok else ((), ())
        out.update({int(u[0]): c for u, c in zip(units, counts) if u[1] == SELECTION})
    return out


def estimate_saving(run) -> str:
    """One line: the estimation draws early stopping will save, from the selection counts recorded so far.

    Images whose selection picks a wrong class save all their estimation draws. For the others the selection
    frequency ``p = counts[c_A] / n0`` stands in for the hit rate: the image is assumed cut before the first block
    at which ``abstain_certain(p m, m, n)`` holds. Scaled from the images with selection counts to the run."""
    from cpcluster.aggregate.skipping import abstain_certain

    selection = recorded_selection(run)
    if not selection:
        return ("early stopping: the saving cannot be estimated yet, no selection counts are recorded in this run; "
                "a --dry-run once its first shards have counted their selection draws estimates it from them")
    cfg = run.config
    labels = dict(zip(run.image_ids.tolist(), run.labels.tolist()))
    m = np.arange(0, cfg.n, cfg.block_size)  # estimation draws before each block
    wrong, saved = 0, 0.0
    for image, counts in selection.items():
        c_a = int(np.argmax(counts))
        if c_a != labels[image]:
            wrong, saved = wrong + 1, saved + cfg.n
            continue
        p = counts[c_a] / max(int(counts.sum()), 1)
        stop = np.flatnonzero(abstain_certain(np.floor(p * m), m, cfg.n, cfg.early_stop))
        saved += cfg.n - m[stop[0]] if len(stop) else 0
    planned = len(run.image_ids) * (cfg.n0 + cfg.n)
    share = saved / len(selection) * len(run.image_ids) / planned
    return (f"early stopping: {wrong} of the {len(selection)} images with selection counts pick a wrong class; "
            f"estimated saving {100 * share:.0f}% of the {planned:,} planned draws (wrong class, and abstention "
            f"certain at the selection frequency)")
