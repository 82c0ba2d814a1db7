"""transformers ViT -> timm ``VisionTransformer``: constructor arguments from ``config.json`` and the tensor mapping.

``ViTForImageClassification`` and timm's ``VisionTransformer`` (``class_token=True``, ``global_pool="token"``,
learned position embeddings including the class token, pre-norm blocks, exact GELU, final LayerNorm, linear head on
the class token) compute the same function; they differ in tensor names, in q/k/v being three ``nn.Linear`` in
transformers and one ``qkv`` in timm, and in the LayerNorm epsilon (transformers' ``layer_norm_eps``, 1e-12 by
default; timm's 1e-6), which :func:`vit_kwargs` carries over exactly.

Tensor names (``{i}`` = block), transformers -> timm:

=============================================================  ====================================
``vit.embeddings.cls_token`` / ``.position_embeddings``        ``cls_token`` / ``pos_embed``
``vit.embeddings.patch_embeddings.projection.{weight,bias}``   ``patch_embed.proj.*``
``vit.encoder.layer.{i}.layernorm_before`` / ``_after``        ``blocks.{i}.norm1`` / ``norm2``
``...attention.attention.{query,key,value}``                   ``blocks.{i}.attn.qkv`` (rows q, k, v)
``...attention.output.dense``                                  ``blocks.{i}.attn.proj``
``...intermediate.dense`` / ``...output.dense``                ``blocks.{i}.mlp.fc1`` / ``fc2``
``vit.layernorm`` / ``classifier``                             ``norm`` / ``head``
=============================================================  ====================================

Both split the hidden dimension into heads the same way (head h = features [h*d, (h+1)*d)), so concatenating the
q, k and v weights row-wise is the whole attention mapping. ``vit.pooler.*`` (present only in checkpoints saved from
a ``ViTModel`` with pooler) is not used by the classifier and is dropped, as transformers drops it.
"""
from __future__ import annotations

import torch

from cpcluster.models.archs.params import get_float, get_int
from cpcluster.util.errors import InputError

IGNORED_PREFIX = "vit.pooler."
WHERE = "a ViTForImageClassification of this config.json"
# ViTConfig's defaults (ViT-B/16 at 224), used for keys a config.json leaves out
DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "image_size": 224, "patch_size": 16, "num_channels": 3, "layer_norm_eps": 1e-12}


def _num_labels(config: dict, what: str) -> int:
    labels = config.get("id2label")
    if labels is not None:
        if not isinstance(labels, dict) or not 2 <= len(labels) <= 1_000_000:
            raise InputError(f"{what}: config.json id2label must map 2..10^6 class ids to names")
        if "num_labels" in config and config["num_labels"] != len(labels):
            raise InputError(f"{what}: config.json has num_labels={config['num_labels']} but {len(labels)} id2label")
        return len(labels)
    return get_int(config, "num_labels", what, 2, 1_000_000, default=2)


def vit_kwargs(config: dict, what: str) -> dict:
    """timm ``VisionTransformer`` keyword arguments (JSON values) for a transformers ViT ``config.json``.

    ``layer_norm_eps`` is not a timm argument: :func:`cpcluster.models.hf_vit.build_vit` turns it into the
    ``norm_layer``. Sizes are bounded before anything is built; other model types and activations are refused.
    """
    if config.get("model_type") != "vit":
        raise InputError(f"{what}: config.json has model_type {config.get('model_type')!r}; hf-vit reads "
                         "ViTForImageClassification folders (model_type \"vit\")")
    arch = config.get("architectures")
    if arch is not None and "ViTForImageClassification" not in arch:
        raise InputError(f"{what}: config.json describes {arch!r}, not a ViTForImageClassification (a classifier "
                         "head is needed)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise InputError(f"{what}: config.json has hidden_act={config['hidden_act']!r}; hf-vit builds exact GELU only")
    if config.get("use_mask_token") or config.get("interpolate_pos_encoding"):
        raise InputError(f"{what}: config.json asks for mask tokens / interpolated position embeddings; not supported")

    def number(key: str, lo: int, hi: int) -> int:
        return get_int(config, key, what, lo, hi, default=DEFAULTS[key])

    hidden = number("hidden_size", 1, 8192)
    heads = number("num_attention_heads", 1, 256)
    if hidden % heads:
        raise InputError(f"{what}: config.json hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    intermediate = number("intermediate_size", 1, 65536)
    mlp_ratio = intermediate / hidden
    if int(hidden * mlp_ratio) != intermediate:  # timm sizes its MLP as int(dim * mlp_ratio)
        raise InputError(f"{what}: intermediate_size {intermediate} is not reachable as int(hidden_size * ratio)")
    image, patch = number("image_size", 1, 4096), number("patch_size", 1, 1024)
    if patch > image:
        raise InputError(f"{what}: config.json patch_size {patch} exceeds image_size {image}")
    qkv_bias = config.get("qkv_bias", True)
    if not isinstance(qkv_bias, bool):
        raise InputError(f"{what}: config.json qkv_bias={qkv_bias!r}; expected true or false")
    return {"img_size": image, "patch_size": patch, "in_chans": number("num_channels", 1, 64),
            "num_classes": _num_labels(config, what), "embed_dim": hidden,
            "depth": number("num_hidden_layers", 1, 256), "num_heads": heads,
            "mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias, "class_token": True, "global_pool": "token",
            "layer_norm_eps": get_float(config, "layer_norm_eps", what, 0.0, 1.0, default=DEFAULTS["layer_norm_eps"])}


def _linear(layout: dict, name: str, out: int, inp: int, bias: bool = True) -> None:
    layout[name + ".weight"] = (out, inp)
    if bias:
        layout[name + ".bias"] = (out,)


def hf_layout(kwargs: dict) -> dict[str, tuple]:
    """``{name: shape}`` of the ``ViTForImageClassification`` state_dict that ``kwargs`` describe, in its order."""
    d, p, mlp = kwargs["embed_dim"], kwargs["patch_size"], int(kwargs["embed_dim"] * kwargs["mlp_ratio"])
    tokens = (kwargs["img_size"] // p) ** 2 + 1
    layout = {"vit.embeddings.cls_token": (1, 1, d), "vit.embeddings.position_embeddings": (1, tokens, d),
              "vit.embeddings.patch_embeddings.projection.weight": (d, kwargs["in_chans"], p, p),
              "vit.embeddings.patch_embeddings.projection.bias": (d,)}
    for i in range(kwargs["depth"]):
        block = f"vit.encoder.layer.{i}."
        for part in ("query", "key", "value"):
            _linear(layout, block + "attention.attention." + part, d, d, kwargs["qkv_bias"])
        _linear(layout, block + "attention.output.dense", d, d)
        _linear(layout, block + "intermediate.dense", mlp, d)
        _linear(layout, block + "output.dense", d, mlp)
        for norm in ("layernorm_before", "layernorm_after"):
            layout[f"{block}{norm}.weight"] = layout[f"{block}{norm}.bias"] = (d,)
    layout["vit.layernorm.weight"] = layout["vit.layernorm.bias"] = (d,)
    _linear(layout, "classifier", kwargs["num_classes"], d)
    return layout


def check_state(state: dict, kwargs: dict, what: str) -> tuple[dict, list[str]]:
    """``(state without vit.pooler.*, the names dropped)``; a tensor that does not fit is one :class:`InputError`
    naming the first (missing, wrong shape, unknown) in transformers' order."""
    from cpcluster.models.archs import first_shape_mismatch

    ignored = sorted(k for k in state if k.startswith(IGNORED_PREFIX))
    state = {k: state[k] for k in sorted(state) if not k.startswith(IGNORED_PREFIX)}  # unknown ones: by name
    problem = first_shape_mismatch(hf_layout(kwargs), state, WHERE)
    if problem:
        raise InputError(f"{what}: the weights do not fit config.json: {problem}")
    return state, ignored


_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
          "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_TOP = {"vit.embeddings.cls_token": "cls_token", "vit.embeddings.position_embeddings": "pos_embed",
        "vit.embeddings.patch_embeddings.projection": "patch_embed.proj", "vit.layernorm": "norm",
        "classifier": "head"}


def timm_state(state: dict, kwargs: dict) -> dict:
    """transformers' tensors (checked by :func:`check_state`) under timm's names, q/k/v concatenated into qkv."""
    out = {}
    for old, new in _TOP.items():
        for suffix in ("", ".weight", ".bias"):
            if old + suffix in state:
                out[new + suffix] = state[old + suffix]
    for i in range(kwargs["depth"]):
        src, dst = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for old, new in _BLOCK.items():
            for suffix in (".weight", ".bias"):
                out[dst + new + suffix] = state[src + old + suffix]
        for suffix in (".weight", ".bias") if kwargs["qkv_bias"] else (".weight",):
            out[dst + "attn.qkv" + suffix] = torch.cat(
                [state[f"{src}attention.attention.{part}{suffix}"] for part in ("query", "key", "value")], dim=0)
    return out
