"""``cpcluster aggregate``: thin Click wrapper around :func:`cpcluster.aggregate.pipeline.run_aggregate`.

Options arrive as text and are parsed here so every bad value is refused with one ``Error:`` line (exit 2)
instead of Click's multi-line usage message. Imports no torch.
"""
from __future__ import annotations

import math

import click

from cpcluster.core.choices import AGGREGATE_FORMATS
from cpcluster.core.config import DEFAULT_RADII, AggregateOptions
from cpcluster.util.errors import InputError


def parse_alpha(text: str) -> float:
    """``--alpha`` text -> float in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--alpha {text!r}: not a number; give a level in (0, 1), e.g. --alpha 0.001") from None
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise InputError(f"--alpha {text}: must lie strictly between 0 and 1, e.g. 0.001")
    return value


def parse_radii(text: str) -> tuple:
    """``--radii`` text ``"0,0.25,0.5"`` -> tuple of floats (checked further by :class:`AggregateOptions`)."""
    items = [t.strip() for t in text.split(",")]
    try:
        if not all(items):
            raise ValueError
        return tuple(float(t) for t in items)
    except ValueError:
        raise InputError(f"--radii {text!r}: give comma-separated numbers, e.g. --radii 0,0.25,0.5,0.75,1.0") \
            from None


def parse_radius(text: str | None) -> float | None:
    """``--cost-radius`` text -> float (checked further by :class:`AggregateOptions`); None stays None."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--cost-radius {text!r}: not a number; give a radius, e.g. --cost-radius 0.5") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("paths", nargs=-1, required=True)
@click.option("--alpha", default="0.001", show_default=True, metavar="FLOAT",
              help="Error probability of each certificate (one-sided Clopper-Pearson) or PREDICT test.")
@click.option("--radii", default=",".join(f"{r:g}" for r in DEFAULT_RADII), show_default=True, metavar="R1,R2,...",
              help="Comma-separated L2 radii (pixel space [0,1]) for the table columns, increasing.")
@click.option("--out", default=None, metavar="DIR",
              help="Output folder or fsspec URL. Default: <deepest folder holding every input>/aggregate.")
@click.option("--allow-partial", is_flag=True,
              help="Certify images with missing units using the draws present (n per image in the TSV) "
                   "instead of excluding them.")
@click.option("--format", "fmt", type=click.Choice(AGGREGATE_FORMATS), default="md", show_default=True,
              help="Table printed to the terminal; latex/csv are also written beside table.md.")
@click.option("--plot/--no-plot", default=True, show_default=True,
              help="Write certified_accuracy.png (and cost.png when the shards recorded their device time).")
@click.option("--cost-radius", default=None, metavar="R",
              help="Radius of cost.png: certified accuracy at R against device-seconds per image, one point per "
                   "row. Default: the middle entry of --radii.")
def aggregate(paths, alpha, radii, out, allow_partial, fmt, plot, cost_radius):
    """Merge certify shard files and compute certified radii, accuracy tables and curves.

    PATHS are shard files, globs (quoted or expanded by the shell), run folders or fsspec URLs. Files are grouped
    by (method, sigma); inside a group all files must come from one run configuration. Writes one Cohen-style TSV
    per group, summary.json, table.md and certified_accuracy.png, and prints the table (certified accuracy in %,
    rows per sigma and the best over sigma). When the shards recorded their device time, also the cost of every
    row (device-hours, draws/s, network evaluations per draw; cost.csv, appended to table.md) and cost.png.

    \b
    Examples:
      cpcluster aggregate results/*.h5
      cpcluster aggregate results/run-s0.25 results/run-s0.5 --out results/table --radii 0,0.5,1.0
      cpcluster aggregate 'results/*/shard-*.h5' --alpha 0.001 --allow-partial --format latex
    """
    from cpcluster.aggregate.pipeline import run_aggregate

    opts = AggregateOptions(paths=tuple(paths), alpha=parse_alpha(alpha), radii=parse_radii(radii), out=out,
                            allow_partial=allow_partial, format=fmt, plot=plot,
                            cost_radius=parse_radius(cost_radius))
    result = run_aggregate(opts)
    for w in result.warnings:
        click.echo(f"Warning: {w}", err=True)
    click.echo(result.table, nl=False)
    click.echo(f"Wrote {len(result.written)} files to {result.out}", err=True)
