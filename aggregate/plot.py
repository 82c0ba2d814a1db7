"""PNG of certified accuracy vs radius, one panel per method, one curve per sigma (like the paper's figure).

matplotlib is imported inside :func:`plot_png` and drives the Agg canvas directly (no pyplot, no global backend
selection), so importing this module has no side effects.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

from cpcluster.aggregate import stats
from cpcluster.aggregate.evaluate import Envelope, GroupResult


def curve(result: GroupResult, grid: np.ndarray) -> np.ndarray:
    """Certified accuracy of ``result`` at every radius of ``grid`` (pixel-space L2)."""
    return stats.certified_accuracy(result.predict, result.label, result.radius, grid)


BEST_LABEL = "best over σ: per-radius max\nover different smoothed classifiers"


def plot_png(results: Sequence[GroupResult], envs: Sequence[Envelope], radii: Sequence[float],
             points: int = 400) -> bytes | None:
    """PNG bytes of :func:`figure`, or ``None`` when no group is in certify mode with at least one image."""
    fig = figure(results, envs, radii, points)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def figure(results: Sequence[GroupResult], envs: Sequence[Envelope], radii: Sequence[float], points: int = 400):
    """The matplotlib Figure (Agg canvas), or ``None`` when no group is in certify mode with at least one image."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    certify = [r for r in results if r.group.plan.mode == "certify" and len(r.idx)]
    if not certify:
        return None
    methods = sorted({r.group.plan.method for r in certify})
    top = max([float(r.radius.max()) for r in certify] + [max(radii, default=0.0), 1e-3])
    grid = np.linspace(0.0, top * 1.05, points)
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = Figure(figsize=(5.0 * cols, 3.8 * rows), dpi=100)
    FigureCanvasAgg(fig)
    env = {e.method: e for e in envs}
    for k, method in enumerate(methods):
        ax = fig.add_subplot(rows, cols, k + 1)
        for r in sorted((r for r in certify if r.group.plan.method == method), key=lambda r: r.group.plan.sigma):
            ax.plot(grid, curve(r, grid), drawstyle="steps-post", label=f"σ = {r.group.plan.sigma:g}")
        if method in env and len(env[method].sigmas) > 1:
            best = np.max([curve(r, grid) for r in certify if r.group.plan.method == method], axis=0)
            ax.plot(grid, best, "k--", lw=1, drawstyle="steps-post", label=BEST_LABEL)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("radius (L2, pixel space [0,1])")
        ax.set_ylabel("certified accuracy")
        ax.set_xlim(0, grid[-1])
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
