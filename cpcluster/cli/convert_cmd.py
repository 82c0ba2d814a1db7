"""``cpcluster convert``: a released checkpoint -> a cpcluster network folder (``--denoiser net:OUT``)."""
from __future__ import annotations

import json

import click


@click.command("convert", context_settings={"max_content_width": 110})
@click.argument("kind")
@click.argument("source", required=False)
@click.argument("out", required=False)
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Format option (architecture preset, overrides); repeat. `cpcluster convert --list` shows them.")
@click.option("--overwrite", is_flag=True, help="Replace a network folder already in OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert(kind, source, out, set_items, overwrite, as_json):
    """Convert SOURCE, a checkpoint in the released format KIND, into the network folder OUT.

    This is the one step that reads the foreign format; certify and finetune then load `net:OUT` (safetensors +
    JSON) and never do. It prints what it read and wrote (sha256 of both) and refuses a file whose tensors do not
    fit the architecture, naming the first mismatching tensor. KIND `list` prints the formats and their options.

    \b
    Examples:
      cpcluster convert list
      cpcluster convert flax-ncsnpp /ckpt/cd-lpips/checkpoints/checkpoint_80 /ckpt/cd_cifar10_lpips
      cpcluster certify --denoiser net:/ckpt/cd_cifar10_lpips ...
    """
    from cpcluster.convert import CONVERTERS, converter, run_conversion

    if kind == "list":
        for name in sorted(CONVERTERS):
            module = converter(name)
            click.echo(f"{name}: {module.DESCRIPTION}")
            for key, text in module.OPTIONS.items():
                click.echo(f"    --set {key}=...  {text}")
        return
    if not source or not out:
        raise click.UsageError("give KIND SOURCE OUT, e.g. cpcluster convert edm-pickle network.pkl /ckpt/edm")
    report = run_conversion(kind, source, out, set_items, overwrite)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    click.echo(f"read   {report['source']}  sha256 {report['source_sha256']}")
    click.echo(f"wrote  {report['weights']}  sha256 {report['weights_sha256']}")
    click.echo(f"       {report['architecture']}: {report['tensors']} tensors, {report['parameters']:,} parameters; "
               f"kind {report['meta'].get('kind')}, " + ", ".join(f"{k}={v}" for k, v in report["meta"].items()
                                                                   if k not in ("kind", "betas")))
    for note in report["notes"]:
        click.echo(f"note:  {note}")
    click.echo(f"use it as: --denoiser {report['spec']}")
