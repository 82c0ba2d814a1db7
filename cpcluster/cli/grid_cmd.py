"""``cpcluster grid``: a PNG (and the raw arrays, .npz) of clean / noisy / purified rows for chosen images."""
from __future__ import annotations

import click

from cpcluster.cli.options import CONTEXT, solver_steps_option, time_rule_option
from cpcluster.core.choices import DEVICES
from cpcluster.core.config import parse_indices


@click.command("grid", context_settings=CONTEXT)
@click.option("--purifier", "purifiers", multiple=True, metavar="[NAME=]KIND[:DENOISER]",
              help="A purifier row, e.g. consistency:demo or ft=consistency:finetuned:runs/ft/final; repeat.")
@click.option("--sigma", type=float, required=True, help="Pixel-space noise level.")
@click.option("--indices", default="0-7", show_default=True, metavar="LIST", help="Dataset images, one per column.")
@click.option("--dataset", default="demo", show_default=True, metavar="SPEC")
@click.option("--classifier", default="demo", show_default=True, metavar="SPEC", help="Decides the frame colours.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (as in `cpcluster quality`).")
@time_rule_option
@click.option("--purifier-label", default="random", show_default=True,
              help="Labels a class-conditional purifier sees: random or fixed:K (never the true label).")
@solver_steps_option("--purifier-steps", dest="purifier_steps")
@click.option("--scale", type=click.IntRange(1, 32), default=4, show_default=True, help="Pixels per image pixel.")
@click.option("--device", type=click.Choice([d for d in DEVICES if d != "auto"]), default="cpu", show_default=True)
@click.option("--out", default="grid.png", show_default=True, metavar="FILE.png", help="The arrays go beside it.")
def grid(purifiers, sigma, indices, dataset, classifier, seed, time_rule, purifier_label, purifier_steps, scale,
         device, out):
    """Draw clean / noisy / purified images side by side, the same noise down each column, each tile framed green
    (the classifier is right) or red.

    \b
    Examples:
      cpcluster grid --purifier consistency:demo --purifier none --sigma 0.5 --indices 0-9 --out grid.png
      cpcluster grid --dataset cifar10:/data/cifar-10-batches-py --classifier "$CLF" --sigma 0.5 \\
          --purifier cd=consistency:diffusers:/ckpt/cd --purifier ft=consistency:finetuned:/runs/ft/final
    """
    from cpcluster.orchestrate.grid import draw_grid

    draw_grid(purifiers, sigma, parse_indices(indices), out, dataset, classifier, seed, time_rule, purifier_label,
              purifier_steps, device, scale, echo=click.echo)
