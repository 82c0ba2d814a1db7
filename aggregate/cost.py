"""Cost accounting: device time per table row, draws per second, and certified accuracy against cost per image.

Every certify shard records, per unit, the device-seconds spent counting it (``unit_seconds``, see
:mod:`cpcluster.core.shard_extras`), and in its ``shard`` attribute the device type and the network evaluations per
draw (``cost``: purifier NFE + one classifier forward). A row's cost is the sum over the units it uses (identical
duplicate units counted once), so cost figures add up across shards: a run cut into any number of shards
reports the sum of its shards' device time. Rows whose files lack the timing (older shards, synthetic files)
have no cost. The time measured is the device's wall time while counting (model loading and queueing excluded);
it depends on the device and its load, unlike every other figure of the aggregation.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cpcluster.aggregate import stats


@dataclass(frozen=True)
class Cost:
    """What one group's counting cost (NaN seconds: unknown)."""

    device_types: tuple  # distinct device types of its files ("cpu", "cuda", "mixed")
    device_seconds: float  # sum over the units used; NaN when a unit has no timing
    draws: int  # draws counted in the units used
    images: int  # images the group lists
    nfe_per_draw: dict | None  # {"purifier": k, "classifier": 1} when every file agrees, else None

    @property
    def known(self) -> bool:
        return math.isfinite(self.device_seconds)

    def to_dict(self) -> dict:
        """JSON form for ``summary.json`` (None for unknown figures)."""
        known = self.known and self.device_seconds > 0
        return {"device_types": list(self.device_types), "draws": self.draws, "images": self.images,
                "device_seconds": self.device_seconds if self.known else None,
                "device_hours": self.device_seconds / 3600 if self.known else None,
                "draws_per_s": self.draws / self.device_seconds if known else None,
                "device_seconds_per_image": self.device_seconds / self.images if self.known and self.images else None,
                "nfe_per_draw": self.nfe_per_draw}


def group_cost(shards: Sequence, kept: Sequence[np.ndarray], images: int) -> Cost:
    """The :class:`Cost` of a group: ``kept[i]`` (U_i,) bool marks the units of ``shards[i]`` the group uses."""
    seconds, draws, types, nfe = 0.0, 0, set(), []
    for s, keep in zip(shards, kept):
        draws += int(s.units[keep, 3].sum())
        if s.seconds is None:
            seconds = float("nan")
        else:
            seconds += float(s.seconds[keep].sum())  # NaN rows make the sum NaN: unknown
        cost = s.shard.get("cost") if isinstance(s.shard.get("cost"), dict) else {}
        types.add(str(cost.get("device_type", "unknown")))
        nfe.append(cost.get("nfe_per_draw"))
    agree = nfe[0] if nfe and all(v == nfe[0] for v in nfe) and isinstance(nfe[0], dict) else None
    return Cost(device_types=tuple(sorted(types)), device_seconds=seconds, draws=draws, images=int(images),
                nfe_per_draw=agree)


def cost_table(results: Sequence) -> str:
    """Markdown table of every row's cost ("" when no row has timing): device, device-hours, draws, draws/s,
    network evaluations per draw, device-seconds per image."""
    rows = [r for r in results if r.group.cost.known]
    if not rows:
        return ""
    out = ["| Method | sigma | device | device-hours | draws | draws/s | NFE / draw | device-s / image |",
           "|:--|:--|:--|--:|--:|--:|--:|--:|"]
    for r in results:
        c = r.group.cost.to_dict()
        nfe = c["nfe_per_draw"]
        cells = [r.group.plan.method, f"{r.group.plan.sigma:g}", "+".join(c["device_types"]),
                 _fmt(c["device_hours"], "{:.4g}"), f"{c['draws']:,}", _fmt(c["draws_per_s"], "{:,.0f}"),
                 f"{nfe['purifier']} + {nfe['classifier']}" if nfe else "-",
                 _fmt(c["device_seconds_per_image"], "{:.3g}")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def cost_csv(results: Sequence) -> bytes:
    """``cost.csv``: one line per row, the figures of :meth:`Cost.to_dict` (empty cells where unknown)."""
    lines = ["method,sigma,mode,device_types,device_hours,draws,draws_per_s,nfe_purifier,nfe_classifier,"
             "device_seconds_per_image"]
    for r in results:
        c = r.group.cost.to_dict()
        nfe = c["nfe_per_draw"] or {}
        method = r.group.plan.method
        lines.append(",".join([f'"{method}"' if "," in method else method, f"{r.group.plan.sigma:g}",
                               r.group.plan.mode, "+".join(c["device_types"]), _fmt(c["device_hours"], "{!r}", ""),
                               str(c["draws"]), _fmt(c["draws_per_s"], "{!r}", ""), str(nfe.get("purifier", "")),
                               str(nfe.get("classifier", "")), _fmt(c["device_seconds_per_image"], "{!r}", "")]))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _fmt(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else fmt.format(value)


def cost_png(results: Sequence, radius: float) -> bytes | None:
    """PNG of certified accuracy at ``radius`` against device-seconds per image, one point per certify row
    (colour per method, labelled with sigma, marker per device type): the Pareto picture. None when no row has
    timing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in results if r.group.plan.mode == "certify" and r.group.cost.known and len(r.idx)]
    if not rows:
        return None
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods = sorted({r.group.plan.method for r in rows})
    markers = {t: m for t, m in zip(sorted({"+".join(r.group.cost.device_types) for r in rows}), "os^Dv")}
    for k, method in enumerate(methods):
        mine = sorted((r for r in rows if r.group.plan.method == method), key=lambda r: r.group.plan.sigma)
        for r in mine:
            x = r.group.cost.device_seconds / max(r.group.cost.images, 1)
            y = float(stats.certified_accuracy(r.predict, r.label, r.radius, [radius])[0])
            device = "+".join(r.group.cost.device_types)
            ax.scatter([x], [y], color=f"C{k}", marker=markers[device],
                       label=method if r is mine[0] else None)
            ax.annotate(f"σ={r.group.plan.sigma:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("device-seconds per image (" + ", ".join(f"{m} {t}" for t, m in markers.items()) + ")")
    ax.set_ylabel(f"certified accuracy at radius {radius:g}")
    ax.set_ylim(0, 1)
    ax.set_title("certified accuracy against cost per image, one point per row", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
