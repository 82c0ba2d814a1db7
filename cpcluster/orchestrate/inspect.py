"""What a certify run would load, without running any network: :func:`inspect_setup` (``cpcluster inspect``).

No network runs (no forward pass, no noise). What loading itself runs: a ``python:MODULE:FACTORY`` spec imports
MODULE and calls FACTORY (code the user named on the command line); a ``torchscript:`` archive runs the TorchScript
code it holds (its ``__setstate__`` methods) while it is deserialised, so inspect loads one only when asked to with
``load_torchscript``. Every other spec kind reads data and weights only.
"""
from __future__ import annotations

from cpcluster.util.errors import InputError


def _parameters(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _device(choice: str) -> dict:
    """The device ``--device choice`` resolves to here (:func:`cpcluster.jobs.certify.resolve_device`), described."""
    import torch

    from cpcluster.jobs.certify import resolve_device

    if resolve_device(choice).type == "cpu":
        return {"type": "cpu", "threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
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
    from cpcluster.models.purifier_base import LabelPolicy
    from cpcluster.models.purifiers import build_purifier
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
        channels = den.channel_problem(data.shape) if den is not None else None
        problems += [p for p in (channels, clf.size_problem(data.shape[1:])) if p]
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
