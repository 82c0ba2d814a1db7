"""Network adapters: user checkpoints -> :class:`LoadedDenoiser` / :class:`LoadedClassifier`. Offline, any fsspec URL.

Denoiser specs (``--denoiser``):

* ``diffusers:DIR`` -- a diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
  or ``.bin``), or a pipeline folder holding ``unet/`` and ``scheduler/``. See :mod:`cpcluster.models.unet_folder`.
* ``python:MODULE:FACTORY[:WEIGHTS]`` -- ``FACTORY()`` returns an ``nn.Module`` called as
  ``module(x, time_input, class_labels)`` (or a ready :class:`LoadedDenoiser`); optional weights are loaded strictly.
* ``torchscript:FILE`` -- a scripted module with the same call signature.

Network metadata comes from options after ``?`` (and, for diffusers folders, from ``cpcluster.json`` and the
scheduler config): ``kind=consistency|edm|ddpm``, ``c_noise=openai|jax|edm``, ``grid_steps=N``, ``num_classes=K``;
DDPM: ``schedule=linear|cosine|scaled_linear|squaredcos_cap_v2``, ``beta_start``, ``beta_end``, ``timesteps=T``,
``prediction=epsilon|v_prediction|sample``; EDM: ``preconditioned=1``, ``sigma_data``. A network output with twice
the input channels (learned variance) is cut to its first C channels.

Classifier specs (``--classifier``), each with the transform options of :mod:`cpcluster.models.transforms`:

* ``timm:NAME[:CHECKPOINT]`` -- ``timm.create_model(NAME, pretrained=False)`` (never downloads) plus the
  checkpoint; ``num_classes=K``, ``in_chans=C``; mean/std default to the model's ``pretrained_cfg``. Without a
  checkpoint the weights are random (recorded as ``random_init``).
* ``torchscript:FILE``, ``python:MODULE:FACTORY[:WEIGHTS]`` -- ``num_classes=K`` unless the module has a
  ``num_classes`` attribute.
* ``hf-vit:DIR`` -- a transformers ``ViTForImageClassification`` folder as released on the Hugging Face hub, run
  as a timm ViT; the transform defaults to its ``preprocessor_config.json`` (:mod:`cpcluster.models.hf_vit`).

Weights are read only through safetensors or ``torch.load(weights_only=True)``; their sha256 is recorded.
"""
from __future__ import annotations

import importlib
import io

import torch
from torch import nn

from cpcluster.models.loaded import LoadedClassifier, LoadedDenoiser
from cpcluster.models.transforms import (TRANSFORM_KEYS, InputTransform, TransformedClassifier, parse_int,
                                         split_options, transform_from_options)
from cpcluster.models.unet_folder import META_KEYS, load_unet_folder, merge_meta, normalize_meta
from cpcluster.models.weights import apply_state_dict, load_state_dict, read_bytes, sha256_bytes
from cpcluster.util.errors import InputError

CLASSIFIER_KEYS = ("num_classes",) + TRANSFORM_KEYS
MAX_CLASSES = 100_000  # a classifier head asked for by a spec option (ImageNet-21k has 21,841)


class CropChannels(nn.Module):
    """``module(x, time_input, class_labels)``, keeping the first C output channels when it returns 2C.

    Unconditional calls (``class_labels is None``) pass two arguments, so a module traced as ``net(x, t)`` works.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, time_input: torch.Tensor, class_labels: torch.Tensor | None = None):
        out = self.net(x, time_input) if class_labels is None else self.net(x, time_input, class_labels)
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def _strip_prefix(state: dict) -> dict:
    # checkpoints saved from DistributedDataParallel / torch.compile carry a prefix on every key
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_weights(module: nn.Module, url: str, what: str) -> str:
    state, digest = load_state_dict(url, what)
    apply_state_dict(module, _strip_prefix(state), url, what)
    return digest


def _python_factory(argument: str, what: str):
    """``MODULE:FACTORY[:WEIGHTS]`` -> (object returned by FACTORY(), weights URL or None)."""
    module_name, _, rest = argument.partition(":")
    factory_name, _, weights = rest.partition(":")
    if not module_name or not factory_name:
        raise InputError(f"{what}: use python:MODULE:FACTORY[:WEIGHTS]")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"{what}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InputError(f"{what}: {module_name} has no callable {factory_name!r}")
    return factory(), (weights or None)


def _torchscript(url: str, what: str) -> tuple[nn.Module, str]:
    raw = read_bytes(url, what)
    try:
        module = torch.jit.load(io.BytesIO(raw), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError / ValueError variants for non-TorchScript files
        raise InputError(f"{what} {url}: not a TorchScript archive ({type(e).__name__})") from None
    return module, sha256_bytes(raw)


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------------- denoisers


def load_diffusers(argument: str) -> LoadedDenoiser:
    what = f"--denoiser diffusers:{argument}"
    path, options = split_options(argument, what, META_KEYS)
    return load_unet_folder(path, options, what)


def load_python_denoiser(argument: str) -> LoadedDenoiser:
    what = f"--denoiser python:{argument}"
    body, options = split_options(argument, what, META_KEYS)
    obj, weights = _python_factory(body, what)
    if isinstance(obj, LoadedDenoiser):
        if options:  # spec options override the factory's metadata; other keys it set are kept
            own = {k: v for k, v in obj.meta.items() if k in META_KEYS and k != "schedule"}
            meta = normalize_meta(merge_meta({"kind": obj.kind, "schedule_name": obj.meta.get("schedule"), **own},
                                             options), what)
            obj.kind, obj.meta = meta.pop("kind"), {**obj.meta, **meta}
        net = obj.module
    elif isinstance(obj, nn.Module):
        meta = normalize_meta(options, what)
        net = obj
        obj = LoadedDenoiser(CropChannels(net), meta.pop("kind"), meta)
    else:
        raise InputError(f"{what}: the factory returned {type(obj).__name__}, not an nn.Module or LoadedDenoiser")
    if weights:
        obj.sha256 = _load_weights(net, weights, what)
    _frozen(obj.module)
    return obj


def load_torchscript_denoiser(argument: str) -> LoadedDenoiser:
    what = f"--denoiser torchscript:{argument}"
    url, options = split_options(argument, what, META_KEYS)
    module, digest = _torchscript(url, what)
    meta = normalize_meta(options, what)
    return LoadedDenoiser(_frozen(CropChannels(module)), meta.pop("kind"), meta, sha256=digest)


# --------------------------------------------------------------------------------------------------- classifiers


def _classifier(net: nn.Module, num_classes: int, digest, transform: dict, extra: dict | None = None):
    module = _frozen(TransformedClassifier(InputTransform(transform), net))
    return LoadedClassifier(module, num_classes, sha256=digest, transform={**transform, **(extra or {})})


def _num_classes(options: dict, module: nn.Module, what: str) -> int:
    if "num_classes" in options:
        return parse_int(options["num_classes"], what, "num_classes", minimum=2, maximum=MAX_CLASSES)
    value = getattr(module, "num_classes", None)
    if isinstance(value, int) and value >= 2:
        return value
    raise InputError(f"{what}: cannot tell the number of classes; add ?num_classes=K to the spec")


def load_timm(argument: str) -> LoadedClassifier:
    what = f"--classifier timm:{argument}"
    body, options = split_options(argument, what, CLASSIFIER_KEYS + ("in_chans",))
    name, _, checkpoint = body.partition(":")
    import timm

    if not name or not timm.is_model(name):
        raise InputError(f"{what}: {name!r} is not a timm architecture (see timm.list_models())")
    kwargs = {}
    if "num_classes" in options:
        kwargs["num_classes"] = parse_int(options["num_classes"], what, "num_classes", minimum=2,
                                          maximum=MAX_CLASSES)
    if "in_chans" in options:
        kwargs["in_chans"] = parse_int(options["in_chans"], what, "in_chans", maximum=64)
    net = timm.create_model(name, pretrained=False, **kwargs)  # pretrained=False: never touches the network
    digest = _load_weights(net, checkpoint, what) if checkpoint else None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    default = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else (None, None)
    transform = transform_from_options(options, what, default, "timm pretrained_cfg")
    extra = {"random_init": True} if digest is None else {}
    return _classifier(net, int(net.num_classes), digest, transform, extra)


def load_torchscript_classifier(argument: str) -> LoadedClassifier:
    what = f"--classifier torchscript:{argument}"
    url, options = split_options(argument, what, CLASSIFIER_KEYS)
    net, digest = _torchscript(url, what)
    return _classifier(net, _num_classes(options, net, what), digest, transform_from_options(options, what))


def load_python_classifier(argument: str) -> LoadedClassifier:
    what = f"--classifier python:{argument}"
    body, options = split_options(argument, what, CLASSIFIER_KEYS)
    obj, weights = _python_factory(body, what)
    if isinstance(obj, LoadedClassifier):
        if weights:
            obj.sha256 = _load_weights(obj.module, weights, what)
        _frozen(obj.module)
        return obj
    if not isinstance(obj, nn.Module):
        raise InputError(f"{what}: the factory returned {type(obj).__name__}, not an nn.Module or LoadedClassifier")
    digest = _load_weights(obj, weights, what) if weights else None
    return _classifier(obj, _num_classes(options, obj, what), digest, transform_from_options(options, what))
