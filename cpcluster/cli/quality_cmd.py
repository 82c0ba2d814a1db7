"""``cpcluster quality`` (sharded jobs, :mod:`cpcluster.orchestrate.quality`) and ``cpcluster quality-report``
(aggregation, ``aggregate/quality_report.py``): purification quality.
"""
from __future__ import annotations

import os

import click

from cpcluster.cli.options import CONTEXT, shard_submit_options, sigma_option, solver_steps_option, time_rule_option
from cpcluster.core.choices import DEVICES, LPIPS_NETS
from cpcluster.core.config import parse_indices


@click.command("quality", context_settings=CONTEXT)
@click.option("--purifier", "purifiers", multiple=True, metavar="[NAME=]KIND[:DENOISER]",
              help="A purifier to measure, e.g. consistency:demo or onestep-ddpm:diffusers:/ckpt/ddpm or none; "
                   "repeat for several.")
@sigma_option()
@click.option("--dataset", default="demo", show_default=True, metavar="SPEC")
@click.option("--classifier", default="demo", show_default=True, metavar="SPEC", help="For the accuracy column.")
@click.option("--skip", type=int, default=1, show_default=True, help="Every K-th image.")
@click.option("--max-images", type=int, default=None)
@click.option("--indices", default=None, metavar="LIST", help="Image indices, e.g. 0,5,10-19.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (the same noise for every purifier).")
@click.option("--shards", "num_shards", type=int, default=1, show_default=True, help="Shard jobs per run.")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per forward.")
@time_rule_option
@click.option("--purifier-label", default="random", show_default=True,
              help="Labels a class-conditional purifier sees: random or fixed:K (never the true label).")
@solver_steps_option("--purifier-steps", dest="purifier_steps")
@click.option("--lpips-net", type=click.Choice(LPIPS_NETS), default="vgg", show_default=True)
@click.option("--lpips-resize", type=int, default=224, show_default=True, help="Upsampling before LPIPS (0: none).")
@click.option("--lpips-random-backbone", is_flag=True, help="Random LPIPS trunk: tests and demos ONLY.")
@click.option("--inception-weights", default=None, metavar="FILE",
              help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth [default: in $TORCH_HOME/hub/checkpoints].")
@click.option("--inception-random-weights", is_flag=True, help="Random-weight Inception: tests and demos ONLY.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--out", default="results/quality", show_default=True, metavar="DIR")
@shard_submit_options
@click.option("--overwrite", is_flag=True, help="Replace run folders holding another configuration.")
def quality(purifiers, sigmas, out, indices, executor, workers, slurm, overwrite, **fields):
    """Measure purification quality: FID, transport distance, LPIPS and L2 to the clean image, accuracy.

    One run per --purifier and --sigma, plus the clean reference run, in <out>/<name>/quality-*.npz; every
    purifier sees the same noisy images. Then `cpcluster quality-report <out>/*` prints the table.

    \b
    Examples:
      cpcluster quality --purifier consistency:demo --purifier none --sigma 0.5 --max-images 32 \\
          --lpips-random-backbone --inception-random-weights --executor local --out /tmp/quality
      cpcluster quality --dataset cifar10:/data/cifar-10-batches-py --skip 20 --classifier "$CLF" \\
          --purifier cd=consistency:diffusers:/ckpt/cd --purifier ft=consistency:finetuned:/runs/ft/final \\
          --sigma 0.25 --sigma 0.5 --sigma 1.0 --shards 10 --executor slurm --out /shared/quality
    """
    from cpcluster.orchestrate.quality import build_configs, preflight, run_quality

    configs = build_configs(purifiers, sigmas, out, indices=parse_indices(indices), **fields)
    preflight(configs)
    run_quality(configs, executor, slurm, workers=workers, overwrite=overwrite, echo=click.echo)


@click.command("quality-report", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", default=None, metavar="DIR", help="Output folder [default: <first input's parent>/report].")
@click.option("--transport-images", type=int, default=1000, show_default=True,
              help="Images per set for the W2 transport distance (exact, O(K^3)).")
@click.option("--plot/--no-plot", default=True, show_default=True)
def quality_report(paths, out, transport_images, plot):
    """One table and one plot per dataset from `cpcluster quality` runs: FID, W2, LPIPS, L2, accuracy.

    \b
    Example:
      cpcluster quality-report /tmp/quality/* --out /tmp/quality-report
    """
    from cpcluster.aggregate.quality_report import write_report

    out = out or os.path.join(os.path.dirname(os.path.abspath(paths[0].rstrip("/"))), "report")
    text, written = write_report(paths, out, transport_images, plot)
    click.echo(text, nl=False)
    click.echo(f"wrote {len(written)} files to {out}", err=True)
