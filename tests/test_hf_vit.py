"""Classifier spec ``hf-vit:DIR``: transformers-written ViT folders (tests/data/hf_vit) against transformers' logits.

Tolerances: the network reproduces transformers' float32 logits within 1e-5 (measured: 0, identical operations);
the input transform reproduces the processor's resize within its uint8 rounding (PIL rounds after each of its two
passes: at most 1/255 in pixel space), and PIL's float bilinear within 1e-3/255.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cpcluster.models.hf_vit import build_vit
from cpcluster.models.hf_vit_layout import hf_layout, timm_state, vit_kwargs
from cpcluster.models.specs import load_classifier
from cpcluster.util.errors import InputError
from hf_vit_files import DATA, copy_folder, pixels, reference

torch.set_num_threads(1)
ATOL = 1e-5


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.mark.parametrize("weights, other", [("model.safetensors", "pytorch_model.bin"),
                                            ("pytorch_model.bin", "model.safetensors")])
def test_logits_equal_transformers_from_either_weight_file(tmp_path, weights, other):
    folder = copy_folder("vit-cifar10", tmp_path, drop=[other])
    ref = reference("vit-cifar10")
    clf = load_classifier(f"hf-vit:{folder}")
    assert clf.num_classes == 10 and clf.architecture["weights_file"] == weights
    assert clf.sha256 == _sha256(os.path.join(folder, weights))
    with torch.no_grad():
        logits = clf.module(pixels(ref))  # pixel space [0, 1]: the processor's normalisation is inside
    np.testing.assert_allclose(logits.numpy(), ref["logits"], atol=ATOL, rtol=0)
    assert np.ptp(ref["logits"], axis=1).min() > 0.5  # the reference discriminates: a wrong network shows


def test_epsilon_bias_heads_and_mlp_ratio_are_carried_over():
    ref = reference("vit-resize")  # layer_norm_eps 0.1, no q/k/v bias, 3 heads, MLP x1.25, patch 8, 7 labels
    clf = load_classifier(f"hf-vit:{DATA}/vit-resize")
    net = clf.module.net
    assert net.norm.eps == 0.1 and net.blocks[0].attn.qkv.bias is None
    with torch.no_grad():
        logits = net(torch.from_numpy(ref["pixel_values"]))
    np.testing.assert_allclose(logits.numpy(), ref["logits"], atol=ATOL, rtol=0)
    timm_default = build_vit({**clf.architecture["kwargs"], "layer_norm_eps": 1e-6}, "test")
    timm_default.load_state_dict(net.state_dict())
    with torch.no_grad():
        wrong = timm_default(torch.from_numpy(ref["pixel_values"]))
    assert (wrong - logits).abs().max() > 1e-2  # timm's own epsilon would have been visible


def test_resize_differs_from_the_processor_only_by_its_uint8_rounding():
    ref = reference("vit-resize")  # the processor resizes 32 -> 48 with PIL (bilinear) on uint8 images
    clf = load_classifier(f"hf-vit:{DATA}/vit-resize")
    x = pixels(ref)
    with torch.no_grad():
        ours = clf.module.transform(x)
        logits = clf.module(x)
    diff = (ours - torch.from_numpy(ref["pixel_values"])).abs() * 0.5  # std 0.5 -> pixel-space units
    assert 0 < diff.max() <= (1 + 1e-3) / 255 and diff.mean() < 0.4 / 255
    assert (logits - torch.from_numpy(ref["logits"])).abs().max() < 0.05  # measured 0.007


@pytest.mark.parametrize("size", [48, 224])
def test_bilinear_upsampling_equals_pil_float_resize(size):
    from PIL import Image

    images = reference("vit-cifar10")["images"][:2].astype(np.float32)
    pil = np.stack([[np.asarray(Image.fromarray(np.ascontiguousarray(im[..., c]), mode="F").resize(
        (size, size), resample=Image.Resampling.BILINEAR)) for c in range(3)] for im in images])
    ours = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)
    np.testing.assert_allclose(ours.numpy(), pil, atol=1e-3, rtol=0)


def test_transform_comes_from_the_processor_and_spec_options_override_it(tmp_path):
    base = load_classifier(f"hf-vit:{DATA}/vit-cifar10").transform  # legacy ViTFeatureExtractor form, size 32
    assert (base["resize"], base["interp"], base["mean"], base["std"]) == ([32, 32], "bilinear", [0.5] * 3, [0.5] * 3)
    assert base["normalization_source"] == "preprocessor_config.json"
    assert base["from_preprocessor"] == ["interp", "mean", "resize", "std"]
    bicubic = load_classifier(f"hf-vit:{DATA}/vit-cifar10?interp=bicubic&quantize=uint8").transform
    assert bicubic["interp"] == "bicubic" and bicubic["quantize"] == "uint8" and "interp" not in \
        bicubic["from_preprocessor"]
    imagenet = load_classifier(f"hf-vit:{DATA}/vit-cifar10?mean=imagenet").transform
    assert imagenet["std"] == [0.229, 0.224, 0.225] and imagenet["normalization_source"] == "spec"
    with pytest.raises(InputError, match="resizes to 64x64 but config.json says image_size 32; use"):
        load_classifier(f"hf-vit:{DATA}/vit-cifar10?resize=64")
    folder = copy_folder("vit-resize", tmp_path, processor={"do_normalize": False, "resample": 3})
    plain = load_classifier(f"hf-vit:{folder}").transform
    assert plain["mean"] is None and plain["interp"] == "bicubic" and plain["resize"] == [48, 48]


@pytest.mark.parametrize("processor, message", [
    ({"resample": 1}, "resample=1, a PIL filter cpcluster does not reproduce; choose one with ?interp="),
    ({"size": {"shortest_edge": 48}}, "cpcluster resizes to a fixed size only: add ?resize=S"),
    ({"do_center_crop": True}, "center-crops"),
    ({"image_processor_type": "ConvNextImageProcessor"}, "is a 'ConvNextImageProcessor'"),
    ({"rescale_factor": 1.0}, "rescale_factor=1.0"),
    ({"image_mean": "half"}, "image_mean='half'; expected a list of numbers"),
])
def test_processor_cpcluster_cannot_reproduce_is_refused(tmp_path, processor, message):
    folder = copy_folder("vit-resize", tmp_path, processor=processor)
    with pytest.raises(InputError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        load_classifier(f"hf-vit:{folder}")


def test_without_processor_the_spec_must_give_the_transform(tmp_path):
    folder = copy_folder("vit-resize", tmp_path, drop=["preprocessor_config.json"])
    with pytest.raises(InputError, match=r"no preprocessor_config.json .* \?resize=48&mean=half"):
        load_classifier(f"hf-vit:{folder}")
    clf = load_classifier(f"hf-vit:{folder}?mean=half")  # no resize: the images must come at 48x48
    assert clf.transform["resize"] is None and clf.transform["from_preprocessor"] == []
    assert "takes 48x48 images but they reach it unresized at 32x32; add resize=48" in clf.size_problem((32, 32))
    assert clf.size_problem((48, 48)) is None


def test_full_size_layout_equals_transformers_and_timm_vit_base_patch16_224():
    import timm

    with open(os.path.join(DATA, "vit-b16-layout.json")) as fh:
        record = json.load(fh)  # transformers' ViTConfig() defaults with 10 labels, and its state_dict layout
    kwargs = vit_kwargs(record["config"], "test")
    layout = hf_layout(kwargs)
    assert list(layout.items()) == [(k, tuple(s)) for k, s in record["state_dict"]]
    mapped = timm_state({k: torch.empty(s, device="meta") for k, s in layout.items()}, kwargs)
    with torch.device("meta"):
        stock = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    assert stock.norm.eps == 1e-6 and build_vit(kwargs, "test", meta_device=True).norm.eps == 1e-12


def test_pooler_tensors_are_dropped_and_recorded(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_folder("vit-cifar10", tmp_path, drop=["pytorch_model.bin"])
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    save_file({**state, "vit.pooler.dense.weight": torch.ones(32, 32), "vit.pooler.dense.bias": torch.ones(32)}, path)
    clf = load_classifier(f"hf-vit:{folder}")
    assert clf.architecture["ignored_tensors"] == ["vit.pooler.dense.bias", "vit.pooler.dense.weight"]
    with torch.no_grad():
        logits = clf.module(pixels(reference("vit-cifar10")))
    np.testing.assert_allclose(logits.numpy(), reference("vit-cifar10")["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "deit"}, "model_type 'deit'; hf-vit reads ViTForImageClassification folders"),
    ({"architectures": ["ViTModel"]}, "not a ViTForImageClassification"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"num_attention_heads": 3}, "not a multiple of num_attention_heads 3"),
    ({"hidden_size": 10**6}, "hidden_size=1000000; expected an integer in [1, 8192]"),
    ({"layer_norm_eps": "1e-12"}, "layer_norm_eps='1e-12'"),
    ({"num_hidden_layers": 3}, "tensor 'vit.encoder.layer.2.attention.attention.query.weight' (32, 32) is missing"),
    ({"id2label": {str(i): str(i) for i in range(5)}, "label2id": None},
     "tensor 'classifier.weight' has shape (10, 32), a ViTForImageClassification of this config.json needs (5, 32)"),
    ({"qkv_bias": False}, "tensor 'vit.encoder.layer.0.attention.attention.key.bias' is not part of a "
                          "ViTForImageClassification of this config.json (6 such tensor(s))"),
])
def test_config_and_tensor_mismatches_are_refused(tmp_path, config, message):
    folder = copy_folder("vit-cifar10", tmp_path, config=config)
    with pytest.raises(InputError) as err:
        load_classifier(f"hf-vit:{folder}")
    assert message in str(err.value)


def test_missing_files_are_refused(tmp_path):
    folder = copy_folder("vit-cifar10", tmp_path, drop=["model.safetensors", "pytorch_model.bin"])
    with pytest.raises(InputError, match="no model.safetensors or pytorch_model.bin"):
        load_classifier(f"hf-vit:{folder}")
    with pytest.raises(InputError, match="no config.json in"):
        load_classifier(f"hf-vit:{tmp_path}/nowhere")
    with pytest.raises(InputError, match="unknown option 'num_classes'"):
        load_classifier(f"hf-vit:{DATA}/vit-cifar10?num_classes=10")
