"""``cpcluster quality-report`` as a function: quality shards in, one table and one plot per dataset out. No torch.

Outputs in ``out``: ``quality-<dataset>.md`` (the table) and ``quality-<dataset>.png`` (FID, transport distance,
LPIPS and accuracy against sigma, one line per method) for every dataset among the inputs, and ``quality.json``
(every row with full precision, the Inception weights used and the definitions' reference). Everything is computed
and rendered before anything is written; each file is written atomically.
"""
from __future__ import annotations

import io
import json
import re

from cpcluster.aggregate.quality import DEFAULT_TRANSPORT_IMAGES, quality_tables

COLUMNS = ("Method", "sigma", "images", "FID", "W2", "LPIPS", "L2", "accuracy (%)")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-") or "dataset"


def table_md(rows: list[dict]) -> str:
    """The quality table in Markdown: one row per (method, sigma), the clean reference first."""
    cells = [list(COLUMNS)]
    for r in rows:
        sigma = "-" if r["sigma"] is None else f"{r['sigma']:g}"
        cells.append([r["method"], sigma, str(r["images"]), f"{max(r['fid'], 0.0):.3f}", f"{r['transport_w2']:.3f}",
                      f"{r['lpips']:.4f}", f"{r['l2']:.3f}", f"{100 * r['accuracy']:.1f}"])
    width = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    line = lambda c: "| " + " | ".join(x.ljust(w) if i < 2 else x.rjust(w)  # noqa: E731
                                       for i, (x, w) in enumerate(zip(c, width))) + " |"
    rule = "|" + "|".join((":" + "-" * (w + 1)) if i < 2 else ("-" * (w + 1) + ":") for i, w in enumerate(width)) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])]) + "\n"


def plot_png(title: str, rows: list[dict]) -> bytes:
    """FID, W2, LPIPS and accuracy against sigma, one line per method (clean accuracy dashed), as PNG bytes."""
    from matplotlib.figure import Figure  # no pyplot: no backend selection, no global state

    panels = (("fid", "FID to clean images"), ("transport_w2", "W2 transport to clean images"),
              ("lpips", "LPIPS to the clean image"), ("accuracy", "classifier accuracy"))
    fig = Figure(figsize=(16, 3.6))
    axes = fig.subplots(1, len(panels), gridspec_kw={"left": 0.05, "right": 0.99, "bottom": 0.28, "top": 0.86,
                                                     "wspace": 0.3})
    methods = sorted({r["method"] for r in rows if r["method"] != "clean"})
    clean = [r for r in rows if r["method"] == "clean"]
    for ax, (key, label) in zip(axes, panels):
        for m in methods:
            pts = sorted((r["sigma"], r[key]) for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=m)
        if key == "accuracy" and clean:
            ax.axhline(clean[0]["accuracy"], ls="--", color="grey", label="clean images")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("sigma (pixel space)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(2.4, -0.2), ncol=3, frameon=False)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def build_report(paths, transport_images: int = DEFAULT_TRANSPORT_IMAGES, plot: bool = True):
    """``(printed text, {file name: bytes})`` for the quality runs in ``paths`` (InputError before any output)."""
    tables = quality_tables(paths, transport_images)
    outputs, text, summary = {}, [], {"datasets": [], "transport_images": transport_images,
                                      "definitions": "aggregate/quality.py (FID, W2 transport, LPIPS, L2, accuracy)"}
    for key, table in sorted(tables.items()):
        name = slug(table["dataset"].get("name") or key)
        md = table_md(table["rows"])
        outputs[f"quality-{name}.md"] = md.encode()
        if plot:
            outputs[f"quality-{name}.png"] = plot_png(f"purification quality: {key}", table["rows"])
        text += [f"Purification quality on {key}:", "", md]
        summary["datasets"].append({"key": key, "dataset": table["dataset"], "rows": table["rows"]})
    outputs["quality.json"] = (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode()
    return "\n".join(text), outputs


def write_report(paths, out: str, transport_images: int = DEFAULT_TRANSPORT_IMAGES, plot: bool = True):
    """Build the report, then write its files into ``out``; returns ``(printed text, written URLs)``."""
    from cpcluster.util.fileio import join_url, write_bytes_atomic

    text, outputs = build_report(paths, transport_images, plot)
    written = []
    for name in sorted(outputs):
        write_bytes_atomic(join_url(out, name), outputs[name])
        written.append(join_url(out, name))
    return text, written
