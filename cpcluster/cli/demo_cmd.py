"""``cpcluster demo``: thin Click wrapper around :func:`cpcluster.orchestrate.demo.run_demo` (``make demo``)."""
from __future__ import annotations

import os

import click


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--out", default="demo-out", show_default=True, metavar="DIR",
              help="Folder for the fine-tuning run, the shards and the aggregate outputs.")
@click.option("--quick", is_flag=True, help="A tiny run (3 images, 100 draws, 4 fine-tuning steps): a smoke test.")
@click.option("--workers", type=int, default=None, help="Shard processes at once [default: one per CPU core, <= 8].")
@click.option("--overwrite", is_flag=True, help="Delete earlier demo results in --out first and start over.")
def demo(out, quick, workers, overwrite):
    """Run the Consistency Purification story on this machine: fine-tune, certify, aggregate, measure, draw.

    Fine-tunes the shipped demo denoiser with LPIPS (a RANDOM AlexNet trunk: no weights are downloaded) and the
    demo classifier behind the purifier before and after that (CLS-FT, both), certifies the built-in test digits
    at sigma 0.25, 0.5 and 1.0 with no purifier, the denoiser before and after fine-tuning, and the fine-tuned
    classifiers at sigma 1.0 (several shards each, local executor), prints the certified-accuracy table, then
    the purification-quality table (a RANDOM Inception network) and draws a grid. About 5 minutes on 2 CPU cores;
    a rerun reuses finished work.

    \b
    Examples:
      cpcluster demo
      cpcluster demo --quick --out /tmp/demo
    """
    from cpcluster.orchestrate.demo import run_demo, story_lines
    from cpcluster.orchestrate.demo_plan import PRESETS

    plan = PRESETS["quick" if quick else "full"]

    def warn(text):
        click.secho(text, fg="red", bold=True, err=True)

    result = run_demo(plan, out, echo=click.echo, warn=warn, workers=workers, overwrite=overwrite)
    agg = result.aggregate
    for w in agg.warnings:
        click.echo(f"Warning: {w}", err=True)
    click.echo(f"\nCertified accuracy (%) at L2 radius r, alpha {plan.alpha:g}, n0 {plan.n0}, n {plan.n}:\n")
    click.echo(agg.table, nl=False)
    click.echo("")
    for line in story_lines(result, plan):
        click.echo(line)
    names = {os.path.basename(w) for w in agg.written}
    cost = ", cost.png: certified accuracy against device-seconds per image" if "cost.png" in names else ""
    click.echo(f"\nwrote {len(agg.written)} files to {agg.out} (certified_accuracy.png, summary.json, table.md, "
               f"TSVs{cost})")
    click.echo(f"\n{result.quality}", nl=False)
    click.echo(f"wrote {result.root}/quality/report (a table and a plot per dataset) and {result.grid} (+ .npz)")
    s = result.seconds
    click.echo(f"wall time {s['total']:.0f} s (fine-tuning {s['finetune']:.0f} s, certification {s['certify']:.0f} s, "
               f"aggregation {s['aggregate']:.0f} s, quality and grid {s['quality']:.0f} s)")
    warn("LPIPS and the Inception network ran with random weights: these numbers illustrate the pipeline, not the "
         "paper's method (the FID column is a Frechet distance between random features).")
