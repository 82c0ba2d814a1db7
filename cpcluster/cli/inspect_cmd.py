"""``cpcluster inspect``: what a certify run would load, without running any network.

The work is :func:`inspect_setup` (a plain function returning a JSON-able dict); the Click command prints it.
No network runs (no forward pass, no noise). What loading itself runs: a ``python:MODULE:FACTORY`` spec imports
MODULE and calls FACTORY (code the user named on the command line); a ``torchscript:`` archive runs the TorchScript
code it holds (its ``__setstate__`` methods) while it is deserialised, so inspect loads one only when asked to with
``--load-torchscript``. Every other spec kind reads data and weights only.
"""
from __future__ import annotations

import json

import click

from cpcluster.util.errors import InputError

PURIFIER_NAMES = ("consistency", "onestep-ddpm", "onestep-edm", "pf-ode", "none")


def _parameters(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _device(choice: str) -> dict:
    import torch

    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return {"type": "cpu", "threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible here (use --device auto or cpu)")
    return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}


def _refuse_torchscript(option: str, spec: str | None, allowed: bool) -> None:
    if not allowed and isinstance(spec, str) and spec.partition(":")[0] == "torchscript":
        raise InputError(f"{option} {spec}: deserialising a TorchScript archive runs the code it holds (its "
                         "__setstate__ methods); inspect loads it only with --load-torchscript")


def inspect_setup(denoiser: str | None, classifier: str, dataset: str | None, sigmas, purifier: str = "consistency",
                  time_rule: str = "nearest", steps: int | None = None, label_policy: str = "random",
                  device: str = "auto", load_torchscript: bool = False) -> dict:
    """Load the specs (on the CPU, no forward pass) and describe them.

    ``torchscript:`` specs are refused unless ``load_torchscript`` (loading one runs the archive's code).

    Returns ``{"device", "denoiser", "purifier": {"name", "per_sigma": [{"sigma", ...describe()}]}, "classifier",
    "dataset", "problems"}``; ``problems`` lists mismatches (classes, channels, label policy) a run would hit.
    """
    from cpcluster.models.purifiers import LabelPolicy, build_purifier
    from cpcluster.models.specs import load_classifier, load_dataset, load_denoiser

    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not 0 < s < float("inf") for s in sigmas):
        raise InputError(f"--sigma must be given, positive and finite, got {sigmas}")
    _refuse_torchscript("--denoiser", denoiser if purifier != "none" else None, load_torchscript)
    _refuse_torchscript("--classifier", classifier, load_torchscript)
    report: dict = {"device": _device(device), "problems": []}
    problems = report["problems"]
    den = None
    if purifier != "none":
        if not denoiser:
            raise InputError(f"--purifier {purifier} needs a --denoiser")
        den = load_denoiser(denoiser)
        report["denoiser"] = {**den.describe(), "parameters": _parameters(den.module)}
    else:
        report["denoiser"] = None
    policy = LabelPolicy(label_policy)
    options = {"time_rule": time_rule, "label_policy": policy}
    if steps is not None:
        options["steps"] = steps
    per_sigma = [{"sigma": s, **build_purifier(purifier, den, s, **options).describe()} for s in sigmas]
    report["purifier"] = {"name": purifier, "per_sigma": per_sigma}
    if den is not None and den.meta.get("num_classes"):
        try:
            policy.labels(1, den.meta["num_classes"], "cpu")
        except InputError as e:
            problems.append(str(e))
        report["purifier"]["label_policy"] = (
            f"{policy.text}: the class-conditional denoiser ({den.meta['num_classes']} classes) sees "
            + ("uniformly random labels drawn from the noise seed" if policy.text == "random" else
               f"class {policy.text.partition(':')[2]} for every image") + ", never the true label")
    clf = load_classifier(classifier)
    report["classifier"] = {**clf.describe(), "parameters": _parameters(clf.module)}
    if dataset:
        data = load_dataset(dataset)
        report["dataset"] = data.describe()
        if data.num_classes != clf.num_classes:
            problems.append(f"dataset has {data.num_classes} classes but the classifier outputs {clf.num_classes}")
        channels = den.meta.get("in_channels") if den is not None else None
        if channels and data.shape and channels != data.shape[0]:
            problems.append(f"dataset images have {data.shape[0]} channels but the denoiser takes {channels}")
        size = clf.size_problem(data.shape[1:])
        if size:
            problems.append(size)
    else:
        report["dataset"] = None
    return report


def _lines(value, indent: int = 2) -> list[str]:
    pad = " " * indent
    out = []
    for key, item in value.items():
        if isinstance(item, dict):
            out.append(f"{pad}{key}:")
            out.extend(_lines(item, indent + 2))
        elif isinstance(item, float):
            out.append(f"{pad}{key}: {item:.6g}")
        elif isinstance(item, list) and item and all(isinstance(v, float) for v in item):
            out.append(f"{pad}{key}: [{', '.join(f'{v:.6g}' for v in item)}]")
        else:
            out.append(f"{pad}{key}: {item}")
    return out


def format_report(report: dict) -> str:
    """Human-readable text of :func:`inspect_setup`'s dict."""
    lines = ["device:", *_lines(report["device"])]
    for section in ("denoiser", "classifier", "dataset"):
        value = report.get(section)
        lines += [f"{section}: none"] if value is None else [f"{section}:", *_lines(value)]
    pur = report["purifier"]
    lines.append(f"purifier: {pur['name']}")
    if pur.get("label_policy"):
        lines.append(f"  label_policy: {pur['label_policy']}")
    for row in pur["per_sigma"]:
        lines.append(f"  sigma {row['sigma']:g}:")
        lines.extend(_lines({k: v for k, v in row.items() if k not in ("sigma", "kind")}, 4))
    lines.append("problems: " + ("none" if not report["problems"] else ""))
    lines.extend(f"  - {p}" for p in report["problems"])
    return "\n".join(lines)


def _sigmas(ctx, param, values):
    out = []
    for value in values:
        for part in str(value).split(","):
            try:
                out.append(float(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a number") from None
    return tuple(out)


@click.command("inspect")
@click.option("--denoiser", default="demo", show_default=True, help="Denoiser spec (diffusers:DIR, python:..., ...).")
@click.option("--classifier", default="demo", show_default=True, help="Classifier spec, transform options after '?'.")
@click.option("--dataset", default="demo", show_default=True, help="Dataset spec (cifar10:DIR, imagenet64:..., ...); "
              "'' to skip.")
@click.option("--sigma", "sigmas", multiple=True, default=("0.25", "0.5", "1.0"), show_default=True,
              callback=_sigmas, help="Pixel-space noise level; repeat or comma-separate.")
@click.option("--purifier", type=click.Choice(PURIFIER_NAMES), default="consistency", show_default=True)
@click.option("--time", "time_rule", type=click.Choice(["nearest", "exact"]), default="nearest", show_default=True,
              help="t_sigma: training-grid point nearest 2*sigma, or 2*sigma exactly.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="pf-ode steps (default 10).")
@click.option("--purifier-label", default="random", show_default=True,
              help="Labels a class-conditional purifier sees: random or fixed:K (never the true label).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
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
          --dataset imagenet64:/data/Imagenet64_val --sigma 0.25 --time exact
    """
    report = inspect_setup(denoiser, classifier, dataset or None, sigmas, purifier, time_rule, steps,
                           purifier_label, device, load_torchscript)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else format_report(report))
    if report["problems"]:
        raise InputError(f"{len(report['problems'])} problem(s): {report['problems'][0]}")
