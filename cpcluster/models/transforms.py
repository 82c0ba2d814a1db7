"""Spec options (``SPEC?key=value&key=value``) and the classifier input transform they describe.

A classifier's input transform is part of its spec, so it is hashed into the run config with the weights:

    timm:resnet50:/ckpt/r50.safetensors?resize=224&interp=bicubic&mean=imagenet&quantize=uint8

Transform keys (all optional; applied in this order to the pixel-space image in [0, 1]):

* ``quantize=uint8`` -- clamp to [0, 1] and round to 1/255 steps (as if the purified image were saved as a PNG);
  ``quantize=floor`` -- clamp to [0, 1] and truncate to 1/255 steps (``floor(255 x) / 255``: the paper's code feeds
  its ViT ``(255 x).int()``); ``none`` (default) leaves the input untouched (plain randomized smoothing feeds
  unclamped ``x + delta``).
* ``resize=S`` or ``resize=HxW`` -- resample with ``interp=bilinear`` (default), ``bicubic``, ``nearest`` or
  ``area``; ``antialias=1`` (default) / ``0`` for bilinear and bicubic (``F.interpolate``, align_corners=False).
* ``mean=...&std=...`` -- ``(x - mean) / std`` per channel, inside the model. Either a preset (``imagenet``,
  ``cifar10``, ``half`` = 0.5, ``none``; ``std`` defaults to the preset's) or comma-separated numbers (1 or C).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cpcluster.util.errors import InputError

TRANSFORM_KEYS = ("resize", "interp", "antialias", "mean", "std", "quantize")
QUANTIZE = ("none", "uint8", "floor")
NORM_PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "half": ((0.5,), (0.5,)),
    "none": (None, None),
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")


def split_options(argument: str, what: str, allowed) -> tuple[str, dict[str, str]]:
    """``"body?k=v&k2=v2"`` -> ``("body", {"k": "v", "k2": "v2"})``; unknown or repeated keys are an InputError.

    The options start at the last ``?`` of the argument (a path or URL may not contain ``?`` after that).
    """
    if "?" not in argument:
        return argument, {}
    body, _, query = argument.rpartition("?")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InputError(f"{what}: option {item!r} is not key=value")
        if key not in allowed:
            raise InputError(f"{what}: unknown option {key!r}; known options: {', '.join(sorted(allowed))}")
        if key in options:
            raise InputError(f"{what}: option {key!r} given twice")
        options[key] = value
    return body, options


def parse_choice(options: dict, key: str, choices: tuple, what: str) -> str:
    """``options[key]`` if it is one of ``choices`` (default: the first of them), else an InputError naming both."""
    value = options.get(key, choices[0])
    if value not in choices:
        raise InputError(f"{what}: {key}={value!r}; use one of {', '.join(choices)}")
    return value


MAX_OPTION_INT = 10**6  # sizes, classes, steps: no network or schedule option needs more


def parse_int(value, what: str, key: str, minimum: int = 1, maximum: int = MAX_OPTION_INT) -> int:
    """An integer option (text or JSON number) in ``[minimum, maximum]``; InputError naming it otherwise."""
    text = str(value)
    if isinstance(value, (bool, float)) or len(text) > 20:
        raise InputError(f"{what}: {key}={text[:30]!r} is not an integer")
    try:
        number = int(text)
    except ValueError:
        raise InputError(f"{what}: {key}={value!r} is not an integer") from None
    if number < minimum:
        raise InputError(f"{what}: {key}={value} must be >= {minimum}")
    if number > maximum:
        raise InputError(f"{what}: {key}={value} must be <= {maximum}")
    return number


def parse_float(value, what: str, key: str) -> float:
    """A finite number option (text or JSON number); InputError naming it otherwise (NaN and inf included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what}: {key}={value!r} is not a number") from None
    if not math.isfinite(number) or isinstance(value, bool):
        raise InputError(f"{what}: {key}={value!r} must be a finite number")
    return number


def parse_bool(value, what: str, key: str) -> bool:
    text = str(value).lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise InputError(f"{what}: {key}={value!r} must be 0 or 1")


def _numbers(text: str, what: str, key: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what}: {key}={text!r}: use a preset ({', '.join(NORM_PRESETS)}) or numbers") from None
    if key == "std" and any(v <= 0 for v in values):
        raise InputError(f"{what}: std must be positive, got {text}")
    return values


def transform_from_options(options: dict, what: str, default_norm=(None, None), default_source: str = "none") -> dict:
    """The transform description (a JSON-able dict) from spec options; ``default_norm`` = (mean, std) if unset."""
    size = None
    if "resize" in options:
        parts = options["resize"].lower().split("x")
        if len(parts) not in (1, 2):
            raise InputError(f"{what}: resize={options['resize']!r}: use S or HxW")
        dims = [parse_int(p, what, "resize", maximum=8192) for p in parts]
        size = dims * 2 if len(dims) == 1 else dims
    interp = parse_choice(options, "interp", INTERPOLATIONS, what)
    antialias = parse_bool(options.get("antialias", "1"), what, "antialias") and interp in ("bilinear", "bicubic")
    quantize = parse_choice(options, "quantize", QUANTIZE, what)
    mean, std, source = *default_norm, default_source
    if "mean" in options:
        source = "spec"
        if options["mean"] in NORM_PRESETS:
            mean, std = NORM_PRESETS[options["mean"]]
        else:
            mean = _numbers(options["mean"], what, "mean")
            if "std" not in options:
                raise InputError(f"{what}: mean={options['mean']} needs std=... as well")
    if "std" in options:
        source = "spec"
        std = NORM_PRESETS[options["std"]][1] if options["std"] in NORM_PRESETS else _numbers(options["std"], what,
                                                                                                "std")
    if (mean is None) != (std is None):
        raise InputError(f"{what}: give both mean and std, or neither")
    return {"quantize": None if quantize == "none" else quantize, "resize": size,
            "interp": interp if size else None, "antialias": antialias if size else None,
            "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
            "normalization_source": source if mean is not None else None,
            "order": "quantize -> resize -> normalize"}


class InputTransform(nn.Module):
    """Pixel-space (B, C, H, W) in [0, 1] -> the classifier's input, as described by :func:`transform_from_options`."""

    def __init__(self, spec: dict):
        super().__init__()
        self.quantize = spec.get("quantize") if spec.get("quantize") in QUANTIZE[1:] else None
        self.size = tuple(spec["resize"]) if spec.get("resize") else None
        self.interp = spec.get("interp") or "bilinear"
        self.antialias = bool(spec.get("antialias"))
        mean, std = spec.get("mean"), spec.get("std")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize:
            step = torch.round if self.quantize == "uint8" else torch.floor
            x = step(x.clamp(0.0, 1.0) * 255.0) / 255.0
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            smooth = self.interp in ("bilinear", "bicubic")
            x = F.interpolate(x, size=self.size, mode=self.interp, align_corners=False if smooth else None,
                              antialias=self.antialias if smooth else False)
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x


class TransformedClassifier(nn.Module):
    """``net(transform(x))``: pixel-space input, logits out; the transform travels with the classifier."""

    def __init__(self, transform: InputTransform, net: nn.Module):
        super().__init__()
        self.transform = transform
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.transform(x))
