"""What an OpenAI UNet state dict's tensor names and shapes say about its architecture (for the converter's errors).

:func:`infer_config` reads ``model_channels`` (``time_embed.0``), ``in_channels`` / ``out_channels`` (first and last
conv), ``num_classes`` (``label_emb``), ``num_res_blocks`` (the first output block holding an upsampling layer),
``channel_mult`` and ``attention_resolutions`` (the first residual block of each level), ``use_scale_shift_norm``
(``emb_layers`` twice as wide as the block), ``resblock_updown`` and ``attention_conv_dims``. Whatever cannot be read
(another architecture, a damaged file) is left out; nothing here raises.
"""
from __future__ import annotations

import re

import torch


def _shape(state: dict, key: str) -> tuple | None:
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _blocks(state: dict, prefix: str) -> dict[int, set[str]]:
    """``{N: {"M.rest", ...}}`` of the keys ``PREFIX.N.M.rest``."""
    found: dict[int, set[str]] = {}
    for key in state:
        m = re.match(rf"{prefix}\.(\d+)\.(.+)$", key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def _structure(state: dict, mc: int) -> dict:
    """num_res_blocks, channel_mult, attention_resolutions, resblock_updown from the block layout."""
    found: dict = {}
    inputs, outputs = _blocks(state, "input_blocks"), _blocks(state, "output_blocks")
    if not inputs or not outputs:
        return found
    n_in = max(inputs) + 1
    n_res = None
    for j in sorted(outputs):  # the first output block with an upsampling layer after its residual block
        ups = {k.split(".", 1)[0] for k in outputs[j] if re.match(r"[1-9]\d*\.(conv|in_layers)\.", k)}
        if ups:
            n_res = j
            found["resblock_updown"] = any(k.startswith(f"{u}.in_layers.") for u in ups for k in outputs[j])
            break
    n_res = n_in - 1 if n_res is None else n_res
    if n_res < 1 or n_in % (n_res + 1):
        return found
    found["num_res_blocks"] = n_res
    mult, attention = [], []
    for level in range(n_in // (n_res + 1)):
        first = 1 + level * (n_res + 1)
        width = _shape(state, f"input_blocks.{first}.0.in_layers.2.weight")
        if width is None or width[0] % mc:
            return found
        mult.append(width[0] // mc)
        if "1.qkv.weight" in inputs.get(first, ()):
            attention.append(2 ** level)
    found.update(channel_mult=mult, attention_resolutions=attention)
    return found


def infer_config(state: dict) -> dict:
    """The architecture keys that ``state``'s names and shapes determine (a subset of the config keys)."""
    found: dict = {}
    emb = _shape(state, "time_embed.0.weight")
    if emb is None or len(emb) != 2:
        return found
    mc = found["model_channels"] = emb[1]
    first, last = _shape(state, "input_blocks.0.0.weight"), _shape(state, "out.2.weight")
    if first and last and len(first) == 4 and len(last) == 4:
        found.update(in_channels=first[1], out_channels=last[0])
    label = _shape(state, "label_emb.weight")
    found["num_classes"] = label[0] if label else None
    qkv = next((_shape(state, k) for k in state if k.endswith(".qkv.weight")), None)
    if qkv:
        found["attention_conv_dims"] = len(qkv) - 2
    film, width = _shape(state, "input_blocks.1.0.emb_layers.1.weight"), _shape(
        state, "input_blocks.1.0.in_layers.2.weight")
    if film and width:
        found["use_scale_shift_norm"] = film[0] == 2 * width[0]
    found.update(_structure(state, mc))
    return found


def _text(value) -> str:
    """A value as ``--set`` takes it: ``1,2,2``, ``true``, ``none``, ``32``."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    return str(value)


def describe_differences(inferred: dict, config: dict) -> str:
    """``"model_channels=32 channel_mult=1,1"``: the inferred values that differ from ``config`` ("" if none)."""
    return " ".join(f"{k}={_text(v)}" for k, v in inferred.items() if _text(v) != _text(config.get(k)))
