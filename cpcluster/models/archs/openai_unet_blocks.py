"""Building blocks of the OpenAI UNet (:mod:`cpcluster.models.archs.openai_unet`), named as upstream names them.

The attribute names and ``nn.Sequential`` positions reproduce the ``state_dict`` keys of improved-diffusion's and
consistency_models' ``unet.py`` (``in_layers.0`` norm, ``in_layers.2`` conv, ``emb_layers.1``, ``out_layers.0`` /
``out_layers.3``, ``skip_connection``, ``norm`` / ``qkv`` / ``proj_out``, ``op``, ``conv``), so a released ``.pt``
loads without renaming. Numerics follow upstream: group norms (32 groups) computed in float32, sinusoidal time
embedding ``[cos, sin]`` with max period 10^4, FiLM ("scale-shift") conditioning ``norm(h) (1 + scale) + shift``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
QKV_ORDERS = ("heads-first", "qkv-first")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm of 32 groups evaluated in float32 whatever the input dtype; the result has the input's dtype."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) float32 of a (B,) time input: ``[cos(t f_i), sin(t f_i)]`` (zero-padded if odd),
    ``f_i = max_period^(-i / (dim // 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _resample(x: torch.Tensor, direction: str | None) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling, 2x2 average pooling, or nothing (parameter-free resampling)."""
    if direction == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if direction == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding; optionally resamples (``resample="up"`` / ``"down"``).

    ``forward(x (B, channels, H, W), emb (B, emb_channels)) -> (B, out_channels, H', W')``.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 scale_shift: bool = False, resample: str | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift = scale_shift
        self.resample = resample
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample:  # upstream resamples between the activation and the first conv, and on the skip path
            h = self.in_layers[2](_resample(self.in_layers[1](self.in_layers[0](x)), self.resample))
            x = _resample(x, self.resample)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions, with a residual connection.

    ``qkv`` is a 1x1 convolution to 3C channels (``nn.Conv1d`` over the flattened positions in improved-diffusion,
    ``nn.Conv2d`` in consistency_models: ``conv_dims``). Its channels are read as (heads, [q, k, v], C/heads) with
    ``qkv_order="heads-first"`` (improved-diffusion, guided-diffusion's legacy order) or as ([q, k, v], heads, C/heads)
    with ``"qkv-first"`` (guided-diffusion's new order; consistency_models always, flash-attention layout).
    ``forward(x (B, C, H, W)) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, heads: int, qkv_order: str = "heads-first", conv_dims: int = 1):
        super().__init__()
        self.heads, self.qkv_order = heads, qkv_order
        conv = nn.Conv1d if conv_dims == 1 else nn.Conv2d
        self.norm = GroupNorm32(channels)
        self.qkv = conv(channels, 3 * channels, 1)
        self.proj_out = conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        flat = isinstance(self.qkv, nn.Conv1d)
        h = self.norm(x.reshape(b, c, -1) if flat else x)
        qkv = self.qkv(h).reshape(b, 3 * c, height * width)
        d = c // self.heads
        if self.qkv_order == "heads-first":
            q, k, v = qkv.reshape(b, self.heads, 3 * d, -1).split(d, dim=2)
        else:
            q, k, v = qkv.reshape(b, 3, self.heads, d, -1).unbind(1)
        # softmax(q^T k / sqrt(d)) v per head; (B, heads, positions, d) for scaled_dot_product_attention
        a = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        a = a.transpose(2, 3).reshape(b, c, -1)
        out = self.proj_out(a if flat else a.reshape(b, c, height, width))
        return x + out.reshape(x.shape)


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv (``op``) or, without ``use_conv``, 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling followed, with ``use_conv``, by a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resample(x, "up")
        return self.conv(x) if self.conv is not None else x


class TimestepSequential(nn.Sequential):
    """``nn.Sequential`` whose residual blocks also receive the time embedding: ``forward(x, emb)``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
