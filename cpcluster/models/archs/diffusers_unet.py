"""Architecture ``diffusers-unet2d``: a diffusers ``UNet2DModel`` built from its ``config.json`` (offline).

The config is the dict diffusers writes with ``save_pretrained``. The keys that set the network's size are checked
before anything is built, so a config asking for an absurd network is one error, not an out-of-memory kill.
"""
from __future__ import annotations

import torch
from torch import nn

from cpcluster.models.archs.params import get_float, get_int, get_int_list, get_optional_int
from cpcluster.util.errors import InputError

MAX_CHANNELS = 8192


class DiffusersUNet(nn.Module):
    """``module(x, time_input, class_labels)`` around a ``UNet2DModel`` (first C channels of a 2C output)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, time_input: torch.Tensor, class_labels: torch.Tensor | None = None):
        out = self.unet(x, time_input, class_labels=class_labels, return_dict=False)[0]
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def check_config(config: dict, what: str) -> None:
    """Plausibility of a UNet2DModel config: the class, and every key that sets the network's size."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise InputError(f"{what}: the config describes a {config['_class_name']!r}; only UNet2DModel is supported")
    get_optional_int(config, "sample_size", what, 1, 4096)
    get_int(config, "in_channels", what, 1, 64, default=3)
    get_int(config, "out_channels", what, 1, 128, default=3)
    get_int(config, "layers_per_block", what, 1, 32, default=2)
    get_int_list(config, "block_out_channels", what, 1, MAX_CHANNELS, 16, default=[224, 448, 672, 896], min_len=1)
    get_optional_int(config, "num_class_embeds", what, 1, 1_000_000)
    get_optional_int(config, "time_embedding_dim", what, 1, 4 * MAX_CHANNELS)
    get_optional_int(config, "num_train_timesteps", what, 1, 1_000_000)
    get_optional_int(config, "norm_num_groups", what, 1, MAX_CHANNELS)
    get_optional_int(config, "attn_norm_num_groups", what, 1, MAX_CHANNELS)
    head = config.get("attention_head_dim")
    if head is not None and not isinstance(head, list):
        get_int(config, "attention_head_dim", what, 1, MAX_CHANNELS)
    elif head is not None:
        get_int_list(config, "attention_head_dim", what, 1, MAX_CHANNELS, 16)
    if config.get("norm_eps") is not None:
        get_float(config, "norm_eps", what, 0.0, 1.0)
    for key in ("down_block_types", "up_block_types"):
        blocks = config.get(key, ())
        if not isinstance(blocks, (list, tuple)) or len(blocks) > 16 or not all(isinstance(b, str) for b in blocks):
            raise InputError(f"{what}: architecture config {key} must be a list of at most 16 block names")


def build(config: dict, what: str) -> nn.Module:
    """A :class:`DiffusersUNet` from a ``UNet2DModel`` config dict (weights uninitialised or on the meta device)."""
    from diffusers import UNet2DModel

    check_config(config, what)
    try:
        unet = UNet2DModel.from_config(config)
    except Exception as e:  # diffusers raises several types for a bad config
        raise InputError(f"{what}: not a valid UNet2DModel config ({type(e).__name__}: {str(e)[:200]})") from None
    return DiffusersUNet(unet)
