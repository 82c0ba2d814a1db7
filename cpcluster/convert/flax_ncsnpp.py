"""Converter ``flax-ncsnpp``: a JAX consistency model of openai/consistency_models_cifar10 -> ``net:`` folder.

Source: a checkpoint written by ``jcm/checkpoints.py`` (``cd-lpips/checkpoints/checkpoint_80`` and the other
CIFAR-10 CD/CT releases): flax's msgpack of jcm's ``State`` (``params``, ``params_ema``, optimizer and rng state).
The sampler, and so the paper's purifier, uses ``params_ema``; ``--set params=params`` takes the raw weights.

Mapping: each Flax parameter path becomes the state_dict key of architecture ``ncsnpp`` joined with dots
(``ResnetBlockBigGANpp_3.Conv_0.kernel``); 4-D kernels HWIO -> OIHW, 2-D matrices (Dense ``kernel``, NIN ``W``)
(in, out) -> (out, in), everything float32. The architecture is ``--set preset=cifar10-cd`` (the released CD/CT
config) with ``nf``, ``num_channels``, ``ch_mult`` and ``num_res_blocks`` read off the tensor shapes, and ``--set``
overrides on top. The network's time input is ``0.25 ln t`` (``c_noise`` "jax") on an 18-point training grid.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from cpcluster.convert import Converted
from cpcluster.convert.flax_msgpack import read_flax_entries
from cpcluster.util.errors import InputError

DESCRIPTION = ("JAX/Flax model of openai/consistency_models_cifar10 (jcm msgpack checkpoint: cd-lpips/checkpoints/"
               "checkpoint_80, or the EDM teacher edm_cifar10_ema with preset=cifar10-edm) -> architecture ncsnpp")
PRESETS = {
    # configs/cifar10_ve_cd.py (the CT configs share every key here except dropout, which only matters in training)
    "cifar10-cd": {"image_size": 32, "num_channels": 3, "nf": 128, "ch_mult": [2, 2, 2], "num_res_blocks": 4,
                   "attn_resolutions": [16], "dropout": 0.0, "fourier_scale": 16.0, "fir_kernel": [1, 3, 3, 1]},
    # configs/cifar10_k_ve.py: the EDM teacher (edm_cifar10_ema) the CD models were distilled from; same network
    "cifar10-edm": {"image_size": 32, "num_channels": 3, "nf": 128, "ch_mult": [2, 2, 2], "num_res_blocks": 4,
                    "attn_resolutions": [16], "dropout": 0.13, "fourier_scale": 16.0, "fir_kernel": [1, 3, 3, 1]},
}
# What each preset's network is: the CD/CT models are consistency functions on the 18-point grid; the EDM teacher is
# an EDM denoiser D = c_skip x + c_out F(c_in x, 0.25 ln t) with sigma_data 0.5 (jcm's get_denoiser_fn), continuous
# in t (no grid: purify with --time-rule exact).
PRESET_META = {
    "cifar10-cd": {"kind": "consistency", "c_noise": "jax", "num_classes": None},
    "cifar10-edm": {"kind": "edm", "c_noise": "jax", "preconditioned": False, "sigma_data": 0.5, "num_classes": None},
}
LIST_KEYS = ("ch_mult", "attn_resolutions")
OPTIONS = {
    "preset": "cifar10-cd (default: the released CIFAR-10 CD/CT consistency models) or cifar10-edm (the EDM "
              "teacher edm_cifar10_ema, for the onestep-EDM and PF-ODE EDM rows)",
    "params": "which weights: params_ema (default, what jcm's sampler uses) or params",
    "grid_steps": "N of the training time grid (default 18 for the CD/CT models; none for the EDM teacher)",
    "image_size": "override: image side in pixels (attention sits at fixed resolutions)",
    "nf": "override: base channels (read off Conv_0 when not given)",
    "num_channels": "override: image channels (read off Conv_0 when not given)",
    "ch_mult": "override: channel multipliers per resolution, e.g. 2,2,2 (read off the blocks when not given)",
    "num_res_blocks": "override: residual blocks per resolution (counted when not given)",
    "attn_resolutions": "override: resolutions with attention, e.g. 16 (none for no attention)",
    "dropout": "override: dropout rate used when fine-tuning (0.0 in the CD config)",
}
WEIGHT_CHOICES = ("params_ema", "params")
_INDEXED = re.compile(r"^(?P<kind>[A-Za-z]+)_(?P<index>\d+)$")


def _parse_override(key: str, text: str, what: str):
    try:
        if key in LIST_KEYS:
            return [] if text.strip().lower() in ("", "none") else [int(v) for v in text.split(",")]
        return float(text) if key == "dropout" else int(text)
    except ValueError:
        expected = "a list of integers such as 2,2,2" if key in LIST_KEYS else "a number"
        raise InputError(f"{what}: --set {key}={text!r} is not {expected}") from None


def flatten(tree: dict, what: str, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax's nested parameter dict -> ``{"A_0.B_1.kernel": array}`` (empty sub-dicts dropped)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, what, path + "."))
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            flat[path] = value
        else:
            kind = f"an array of {value.dtype}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
            raise InputError(f"{what}: parameter {path} is {kind}, not a floating-point array")
    return flat


def to_torch_layout(flat: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HWIO kernels -> OIHW, (in, out) matrices -> (out, in); float32 tensors that own their memory."""
    state = {}
    for key, array in flat.items():
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)
        elif array.ndim == 2:
            array = array.T
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    return state


def infer_from_shapes(flat: dict[str, np.ndarray]) -> dict:
    """What the tensor shapes tell of the config: num_channels and nf (``Conv_0``), and, when the block counts
    fit the NCSN++ layout, ch_mult and num_res_blocks. Keys it cannot tell are left out."""
    found: dict = {}
    stem = flat.get("Conv_0.kernel")
    if stem is None or stem.ndim != 4:
        return found
    found["num_channels"], found["nf"] = int(stem.shape[2]), int(stem.shape[3])
    modules = {path.split(".")[0] for path in flat}
    counts: dict[str, int] = {}
    for name in modules:
        match = _INDEXED.match(name)
        if match:
            counts[match["kind"]] = counts.get(match["kind"], 0) + 1
    levels = counts.get("Downsample", 0) + 1
    blocks = counts.get("ResnetBlockBigGANpp", 0)
    per_level, remainder = divmod(blocks - 3 * levels, 2 * levels)  # blocks = 2 L n + 3 L
    if remainder or per_level < 1:
        return found
    mult = []
    for level in range(levels):
        kernel = flat.get(f"ResnetBlockBigGANpp_{level * (per_level + 1)}.Conv_0.kernel")
        if kernel is None or kernel.ndim != 4 or kernel.shape[3] % found["nf"]:
            return found
        mult.append(int(kernel.shape[3]) // found["nf"])
    found.update(ch_mult=mult, num_res_blocks=per_level)
    return found


def convert(source: str, options: dict, what: str) -> Converted:
    """Read ``source`` (msgpack of a jcm State), pick the weights, map them onto ``ncsnpp`` (see module doc)."""
    from cpcluster.models.archs import build_architecture, first_mismatch
    from cpcluster.models.archs.params import get_int

    preset_name = options.get("preset", "cifar10-cd")
    if preset_name not in PRESETS:
        raise InputError(f"{what}: unknown preset {preset_name!r}; known: {', '.join(PRESETS)}")
    choice = options.get("params", "params_ema")
    if choice not in WEIGHT_CHOICES:
        raise InputError(f"{what}: --set params={choice!r}; use params_ema or params")
    default_grid = "18" if PRESET_META[preset_name]["kind"] == "consistency" else None
    grid_text = options.get("grid_steps", default_grid)
    grid_steps = None if grid_text is None else get_int(
        {"grid_steps": _parse_override("grid_steps", grid_text, what)}, "grid_steps", what, 2, 10_000)

    entries, names = read_flax_entries(source, {choice}, what)
    if choice not in entries:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise InputError(f"{what}: the checkpoint has no {choice!r} entry (its entries: {shown or 'none'}); is it "
                         "a jcm training checkpoint?")
    tree = entries[choice]
    if not isinstance(tree, dict) or not tree:
        raise InputError(f"{what}: {choice} is empty or not a parameter tree")
    if set(tree) == {"NCSNpp_0", "NCSNpp_1"}:
        raise InputError(f"{what}: {choice} holds a joint_ncsnpp (two NCSN++ networks); only model.name=ncsnpp "
                         "checkpoints (the released CD/CT models) are supported")
    flat = flatten(tree, f"{what}: {choice}")
    inferred = infer_from_shapes(flat)
    overrides = {k: _parse_override(k, v, what) for k, v in options.items() if k in PRESETS[preset_name]}
    config = {**PRESETS[preset_name], **inferred, **overrides}
    state = to_torch_layout(flat)
    module = build_architecture("ncsnpp", config, what, meta_device=True)
    problem = first_mismatch(module, state)
    if problem:
        shown = ", ".join(f"{k}={config[k]}" for k in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions",
                                                       "image_size"))
        raise InputError(f"{what}: {choice} does not fit NCSN++ ({shown}): {problem}; if the network was trained "
                         "with another config, give its values with --set KEY=VALUE")
    notes = [f"weights: {choice} of the jcm State" + (" (what jcm's sampler uses)" if choice == "params_ema" else ""),
             f"preset {preset_name}; read off the tensor shapes: "
             + (", ".join(f"{k}={v}" for k, v in inferred.items()) or "nothing")]
    if overrides:
        notes.append("overrides: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    meta = {**PRESET_META[preset_name], "grid_steps": grid_steps}
    return Converted(state=state, architecture="ncsnpp", arch_config=config, meta=meta, notes=notes,
                     source_info={"weights": choice, "preset": preset_name})
