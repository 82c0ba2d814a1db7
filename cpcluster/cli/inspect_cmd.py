"""``cpcluster inspect``: what a certify run would load, without running any network.

The work is :func:`cpcluster.orchestrate.inspect.inspect_setup` (a plain function returning a JSON-able dict); the
Click command prints it.
"""
from __future__ import annotations

import json

import click

from cpcluster.cli.options import sigma_option, solver_steps_option, time_rule_option
from cpcluster.core.choices import DEVICES
from cpcluster.models.purifiers import PURIFIER_NAMES
from cpcluster.util.errors import InputError


@click.command("inspect")
@click.option("--denoiser", default="demo", show_default=True, help="Denoiser spec (diffusers:DIR, python:..., ...).")
@click.option("--classifier", default="demo", show_default=True, help="Classifier spec, transform options after '?'.")
@click.option("--dataset", default="demo", show_default=True, help="Dataset spec (cifar10:DIR, imagenet64:..., ...); "
              "'' to skip.")
@sigma_option(default=("0.25,0.5,1.0",), show_default=True)
@click.option("--purifier", type=click.Choice(PURIFIER_NAMES), default="consistency", show_default=True)
@time_rule_option
@solver_steps_option("--steps")
@click.option("--purifier-label", default="random", show_default=True,
              help="Labels a class-conditional purifier sees: random or fixed:K (never the true label).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--load-torchscript", is_flag=True,
              help="Load torchscript: specs (deserialising an archive runs the TorchScript code it holds).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(denoiser, classifier, dataset, sigmas, purifier, time_rule, steps, purifier_label, device,
                load_torchscript, as_json):
    """Show what certify would load: parameters, sha256, device, t_sigma per sigma, input transform, dataset.

    No network runs: no forward pass, no noise. Loading runs code only for python:MODULE:FACTORY specs (MODULE is
    imported and FACTORY called) and, with --load-torchscript, for torchscript: specs (the archive's own code runs
    while it is deserialised); other specs read data and weights only. Exit code 2 if a problem (class count,
    channels, label policy) is found.

    \b
    Example:
      cpcluster inspect --denoiser demo-random --classifier demo-random --dataset demo --sigma 0.25,0.5,1.0
      cpcluster inspect --denoiser diffusers:/ckpt/cd_imagenet64_lpips --purifier-label random \\
          --classifier 'timm:resnet50:/ckpt/r50.safetensors?resize=224&interp=bicubic&mean=imagenet' \\
          --dataset imagenet64:/data/Imagenet64_val --sigma 0.25 --time-rule exact
    """
    from cpcluster.orchestrate.inspect import format_report, inspect_setup

    report = inspect_setup(denoiser, classifier, dataset or None, sigmas, purifier, time_rule, steps,
                           purifier_label, device, load_torchscript)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else format_report(report))
    if report["problems"]:
        raise InputError(f"{len(report['problems'])} problem(s): {report['problems'][0]}")
