"""Checkpoints and logs of a fine-tuning run, through fsspec (local folder or URL), written by rank 0 only.

Layout under ``<out>``::

    finetune.json                  the run's config, run_dict and run_hash (checked before resubmitting)
    checkpoints/step-00001000.pt   torch.save of plain dicts/tensors, read back with weights_only=True
    metrics.jsonl                  one JSON record per line (train and eval), rewritten atomically
    curves.png                     the training and evaluation curves (:func:`plot_curves`)
    final/                         a network folder: model.safetensors + cpcluster.json (models/finetuned.py)

A checkpoint holds ``step`` (optimizer steps done), ``run`` and ``run_hash`` (``FinetuneConfig.run_dict()``),
``net`` (raw weights), ``ema`` (or None), ``optimizer``, ``log`` (every metrics record up to ``step``) and
``attempt`` (how many times the run has started). Each file is written to a temporary name and renamed, so a
process killed at any moment leaves the previous checkpoints intact; resuming takes the newest file that loads.
The log travels inside the checkpoint, so after a crash the records of the lost steps are dropped with them and
``metrics.jsonl`` never lists a step twice.
"""
from __future__ import annotations

import io
import json
import re
import warnings

import fsspec

from cpcluster.util.errors import InputError
from cpcluster.util.fileio import (config_hash, filesystem, join_url, parse_json, read_json, read_regular,
                                   write_bytes_atomic)

FORMAT = "cpcluster-finetune-checkpoint"
RUN_RECORD = "finetune.json"
_NAME = re.compile(r"step-(\d{8})\.pt$")


def checkpoint_url(out: str, step: int) -> str:
    return join_url(out, "checkpoints", f"step-{step:08d}.pt")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """``[(step, url), ...]`` of the checkpoints under ``out``, newest first."""
    fs, path = fsspec.core.url_to_fs(join_url(out, "checkpoints"))
    if not fs.exists(path):
        return []
    found = []
    for name in fs.ls(path, detail=False):
        m = _NAME.search(name)
        if m:
            found.append((int(m.group(1)), join_url(out, "checkpoints", m.group(0))))
    return sorted(found, reverse=True)


def save_checkpoint(out: str, payload: dict, keep: int) -> str:
    """Write ``payload`` (see module doc) as ``checkpoints/step-<step>.pt`` atomically; keep the newest ``keep``."""
    import torch

    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    url = checkpoint_url(out, int(payload["step"]))
    write_bytes_atomic(url, buf.getvalue())
    for _, old in list_checkpoints(out)[keep:]:
        fs, path = fsspec.core.url_to_fs(old)
        fs.rm(path)
    return url


def remove_temporaries(out: str) -> int:
    """Delete ``*.tmp`` files a killed writer left in ``checkpoints/`` (call on rank 0 before training)."""
    fs, path = fsspec.core.url_to_fs(join_url(out, "checkpoints"))
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.ls(path, detail=False) if p.endswith(".tmp")]
    for p in stale:
        fs.rm(p)
    return len(stale)


def _differing(a: dict, b: dict) -> str:
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def write_run_record(out: str, config: dict, run: dict) -> None:
    """Write ``finetune.json`` (config, run dict, run hash) atomically."""
    record = {"config": config, "run": run, "run_hash": config_hash(run)}
    write_bytes_atomic(join_url(out, RUN_RECORD), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def check_run_record(out: str, run: dict) -> None:
    """:class:`InputError` when ``out`` already holds a run whose ``run`` dict differs (cheap: reads JSON only)."""
    url = join_url(out, RUN_RECORD)
    fs, path = filesystem(url, "--out")
    if not fs.exists(path):
        return
    old = read_json(url, "fine-tuning record")
    if old.get("run_hash") != config_hash(run):
        recorded = old["run"] if isinstance(old.get("run"), dict) else {}
        raise InputError(f"--out {out} holds a fine-tuning run with another configuration (differs in: "
                         f"{_differing(run, recorded)}); use a new --out or the same settings to resume it")


def load_latest(out: str, run: dict) -> dict | None:
    """The newest checkpoint under ``out`` that loads (None if there is none), checked against ``run``.

    A file that does not load (damaged by something outside this code) is skipped with a warning. A checkpoint of
    a different run configuration is an :class:`InputError` naming the fields that differ.
    """
    import torch

    for step, url in list_checkpoints(out):
        try:
            state = torch.load(io.BytesIO(read_regular(url)), map_location="cpu", weights_only=True)
            if state.get("format") != FORMAT:
                raise ValueError("not a fine-tuning checkpoint")
        except Exception as e:  # torch raises several types for damaged files
            warnings.warn(f"skipping unreadable checkpoint {url}: {type(e).__name__}: {e}")
            continue
        if state["run_hash"] != config_hash(run):
            raise InputError(f"--out {out} holds a fine-tuning run with another configuration (differs in: "
                             f"{_differing(run, state['run'])}); use a new --out or the same settings to resume it")
        return state
    return None


def write_metrics(out: str, records: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` atomically with ``records`` (one JSON object per line)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_bytes_atomic(join_url(out, "metrics.jsonl"), text.encode())


def read_metrics(out: str) -> list[dict]:
    """The records of ``metrics.jsonl`` (empty if absent)."""
    url = join_url(out, "metrics.jsonl")
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return [parse_json(line, f"{url}: line {n}") for n, line in enumerate(read_regular(url).splitlines(), 1)
            if line.strip()]


def plot_curves(records: list[dict], url: str) -> None:
    """Training loss and per-sigma eval LPIPS / L2 / accuracy against step, as one PNG written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no backend selection, no global state

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    panels = [("loss", "training loss (global batch)"), ("lpips", "held-out LPIPS(purified, clean)"),
              ("l2", "held-out L2(purified, clean), pixel space"), ("acc", "held-out accuracy of classifier(purified)")]
    panels = [p for p in panels if p[0] == "loss" or any(r.get(p[0]) is not None for r in evals)]
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"left": 0.06, "right": 0.98, "bottom": 0.15,
                                                                    "top": 0.9, "wspace": 0.28})[0]
    for ax, (key, title) in zip(axes, panels):
        if key == "loss":
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
        else:
            for sigma in sorted({r["sigma"] for r in evals}):
                rows = [r for r in evals if r["sigma"] == sigma and r.get(key) is not None]
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=f"sigma={sigma:g}")
            if evals:
                ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes_atomic(url, buf.getvalue())
