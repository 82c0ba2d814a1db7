"""Classifier spec ``hf-vit:DIR``: a Hugging Face ``ViTForImageClassification`` folder, run as a timm ViT.

The CIFAR-10 classifier of the paper (Carlini et al.'s ``aaraki/vit-base-patch16-224-in21k-finetuned-cifar10``) is
released in this form: ``config.json`` (``model_type`` "vit"), ``model.safetensors`` and/or ``pytorch_model.bin``
(or their sharded ``*.index.json``), ``preprocessor_config.json``. cpcluster reads the folder directly -- no
conversion step, no ``transformers`` -- because nothing in it needs an unsafe reader: the weights are safetensors or
a ``torch.save`` state_dict read with ``weights_only=True``, and the network is rebuilt from ``config.json`` as
timm's ``VisionTransformer`` (the same maths; :mod:`cpcluster.models.hf_vit_layout` maps the tensors). The run
config records the sha256 of the very weight file of the release.

The classifier input transform comes from ``preprocessor_config.json`` (``ViTImageProcessor`` /
``ViTFeatureExtractor``: resize to ``size`` with PIL filter ``resample`` -- 2 bilinear, 3 bicubic, 0 nearest --,
then ``(x - image_mean) / image_std``); spec options (:mod:`cpcluster.models.transforms`) override it, e.g.
``hf-vit:/ckpt/vit-cifar10?interp=bicubic``. It is recorded in the run config with the weights.

Difference from transformers' processor: it resizes the *uint8* image with PIL and rounds the result to uint8
before ``/ 255``; cpcluster resizes the float pixel-space tensor with ``F.interpolate`` (align_corners=False,
antialias) and does not round. For upsampling (CIFAR-10 32 -> 224) the bilinear weights are the same (equal to PIL's
float resize), so the inputs differ only by PIL's rounding after each of its two passes: at most 1/255 in [0, 1]
(tests/test_hf_vit.py). PIL's bicubic kernel (a = -0.5) differs from torch's (a = -0.75), and PIL's nearest picks
pixel centres (torch's ``nearest`` agrees for integer upscaling factors only). Carlini et al.'s code does not use
the processor at all: it feeds the [-1, 1] purified image resized by ``F.interpolate(..., (224, 224),
mode="bicubic", antialias=True)`` -- that is ``?interp=bicubic`` here (mean = std = 0.5 maps [0, 1] to [-1, 1]).
The Consistency Purification paper's code feeds ``(255 x).int()``, bilinearly upsampled: ``?quantize=floor``.

The loaded module takes pixel space (B, C, H, W) in [0, 1] and returns logits (B, num_labels).
"""
from __future__ import annotations

import torch
from torch import nn

from cpcluster.models.loaded import LoadedClassifier
from cpcluster.models.transforms import (TRANSFORM_KEYS, InputTransform, TransformedClassifier, split_options,
                                         transform_from_options)
from cpcluster.util.errors import InputError

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_TYPES = ("ViTImageProcessor", "ViTImageProcessorFast", "ViTFeatureExtractor")
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling codes cpcluster can reproduce


def _size(value, what: str) -> str:
    """``size`` of a processor config -> the ``resize`` option (``S`` or ``HxW``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return f"{value['height']}x{value['width']}"
    raise InputError(f"{what}: {PROCESSOR_FILE} has size={value!r}; cpcluster resizes to a fixed size only: "
                     "add ?resize=S to the spec")


def _numbers(value, what: str, key: str) -> str:
    if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 64
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise InputError(f"{what}: {PROCESSOR_FILE} has {key}={value!r}; expected a list of numbers")
    return ",".join(repr(float(v)) for v in value)


def processor_options(processor: dict, options: dict, what: str) -> dict:
    """Transform options (strings, as after ``?``) that ``processor`` implies, for keys the spec does not set."""
    kind = processor.get("image_processor_type", processor.get("feature_extractor_type"))
    if kind is not None and kind not in PROCESSOR_TYPES:
        raise InputError(f"{what}: {PROCESSOR_FILE} is a {kind!r}; hf-vit reads {', '.join(PROCESSOR_TYPES)} "
                         "(give the transform in the spec and remove the file to use another)")
    if processor.get("do_center_crop"):
        raise InputError(f"{what}: {PROCESSOR_FILE} center-crops; cpcluster's transforms do not")
    if processor.get("do_rescale", True) and abs(float(processor.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise InputError(f"{what}: {PROCESSOR_FILE} has rescale_factor={processor['rescale_factor']}; cpcluster's "
                         "pixel space is uint8 / 255")
    if not processor.get("do_rescale", True):
        raise InputError(f"{what}: {PROCESSOR_FILE} has do_rescale=false (the network takes 0..255 values); "
                         "cpcluster's pixel space is [0, 1]")
    derived: dict[str, str] = {}
    if processor.get("do_resize", True) and "resize" not in options:
        derived["resize"] = _size(processor.get("size", 224), what)
    if processor.get("do_resize", True) and "interp" not in options:
        resample = processor.get("resample", 2)
        if resample not in PIL_RESAMPLE:
            raise InputError(f"{what}: {PROCESSOR_FILE} has resample={resample!r}, a PIL filter cpcluster does not "
                             f"reproduce; choose one with ?interp={'|'.join(PIL_RESAMPLE.values())}")
        derived["interp"] = PIL_RESAMPLE[resample]
    if "mean" not in options and "std" not in options:
        if processor.get("do_normalize", True):
            derived["mean"] = _numbers(processor.get("image_mean", [0.5] * 3), what, "image_mean")
            derived["std"] = _numbers(processor.get("image_std", [0.5] * 3), what, "image_std")
        else:
            derived["mean"] = "none"
    return derived


def input_transform(processor: dict | None, folder: str, options: dict, image_size: int, what: str) -> dict:
    """The transform record (:func:`transform_from_options`) of ``processor`` (the folder's
    ``preprocessor_config.json``, None when it has none) overridden by ``options``."""
    if processor is not None:
        derived = processor_options(processor, options, what)
    elif "mean" in options:
        derived = {}
    else:
        raise InputError(f"{what}: no {PROCESSOR_FILE} in {folder}; give the input transform in the spec, e.g. "
                         f"?resize={image_size}&mean=half")
    transform = transform_from_options({**derived, **options}, what)
    if "mean" in derived and transform["mean"] is not None:
        transform["normalization_source"] = PROCESSOR_FILE
    transform["from_preprocessor"] = sorted(derived)
    if transform["resize"] and transform["resize"] != [image_size, image_size]:
        raise InputError(f"{what}: the transform resizes to {transform['resize'][0]}x{transform['resize'][1]} but "
                         f"config.json says image_size {image_size}; use ?resize={image_size}")
    return transform


def build_vit(kwargs: dict, what: str, meta_device: bool = False) -> nn.Module:
    """timm's ``VisionTransformer`` from :func:`cpcluster.models.hf_vit_layout.vit_kwargs` (LayerNorm epsilon exact)."""
    from functools import partial

    try:
        from timm.layers import LayerNorm
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise InputError(f"{what}: needs timm (pip install 'cpcluster[timm]')") from None
    args = {k: v for k, v in kwargs.items() if k != "layer_norm_eps"}
    norm = partial(LayerNorm, eps=kwargs["layer_norm_eps"])
    if meta_device:
        with torch.device("meta"):
            return VisionTransformer(**args, norm_layer=norm)
    return VisionTransformer(**args, norm_layer=norm)


def vit_architecture(folder: str, options: dict, what: str) -> tuple[nn.Module, dict, dict]:
    """:func:`vit_from_records` of the folder's ``config.json`` and ``preprocessor_config.json`` (when present)."""
    from cpcluster.models.weights import read_json_object
    from cpcluster.util.fileio import exists, join_url

    config_url, processor_url = join_url(folder, "config.json"), join_url(folder, PROCESSOR_FILE)
    if not exists(config_url):
        raise InputError(f"{what}: no config.json in {folder}; expected a ViTForImageClassification folder saved "
                         "with save_pretrained (as on the Hugging Face hub)")
    processor = read_json_object(processor_url, what) if exists(processor_url) else None
    return vit_from_records(read_json_object(config_url, what), processor, folder, options, what)


def vit_from_records(config: dict, processor: dict | None, folder: str, options: dict,
                     what: str) -> tuple[nn.Module, dict, dict]:
    """``(module, kwargs, transform)`` from a ``config.json`` and ``preprocessor_config.json`` record (None: the spec
    ``options`` give the transform): a :class:`TransformedClassifier` whose ViT lives on the meta device (no weights
    read). ``folder`` names where the records came from, in messages."""
    from cpcluster.models.hf_vit_layout import vit_kwargs

    kwargs = vit_kwargs(config, what)
    transform = input_transform(processor, folder, options, kwargs["img_size"], what)
    net = build_vit(kwargs, what, meta_device=True)
    return TransformedClassifier(InputTransform(transform), net), kwargs, transform


def load_hf_vit(folder: str, options: dict, what: str) -> LoadedClassifier:
    """The :class:`LoadedClassifier` of a ``ViTForImageClassification`` folder (see the module docstring)."""
    from cpcluster.models.archs import assign_state
    from cpcluster.models.hf_vit_layout import check_state, timm_state
    from cpcluster.models.weights import load_sharded_state_dict, load_state_dict
    from cpcluster.util.fileio import exists, join_url

    root = folder.rstrip("/")
    module, kwargs, transform = vit_architecture(root, options, what)
    name = next((n for n in (*WEIGHT_NAMES, *INDEX_NAMES) if exists(join_url(root, n))), None)
    if name is None:
        raise InputError(f"{what}: no {' or '.join(WEIGHT_NAMES)} (or a sharded *.index.json) in {root}")
    url = join_url(root, name)
    state, digest = (load_sharded_state_dict if name.endswith(".index.json") else load_state_dict)(url, what)
    state, ignored = check_state(state, kwargs, f"{what}: {url}")
    assign_state(module.net, timm_state(state, kwargs), what)
    module.eval().requires_grad_(False)
    architecture = {"timm": "VisionTransformer", "kwargs": kwargs, "input_size": [kwargs["img_size"]] * 2,
                    "weights_file": name, "source_format": "transformers ViTForImageClassification"}
    if ignored:
        architecture["ignored_tensors"] = ignored
    return LoadedClassifier(module, kwargs["num_classes"], sha256=digest, transform=transform,
                            architecture=architecture)


def load_hf_vit_classifier(argument: str) -> LoadedClassifier:
    what = f"--classifier hf-vit:{argument}"
    folder, options = split_options(argument, what, TRANSFORM_KEYS)
    if not folder:
        raise InputError(f"{what}: give the folder, hf-vit:DIR (config.json, model.safetensors or pytorch_model.bin, "
                         f"{PROCESSOR_FILE})")
    return load_hf_vit(folder, options, what)
