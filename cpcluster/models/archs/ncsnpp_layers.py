"""Layers of the NCSN++ network (score_sde / jcm, JAX/Flax) in PyTorch, numerically the Flax ones.

Tensors are NCHW inside. Parameter *names* are Flax's leaf names (``kernel``, ``bias``, ``scale``, ``W``, ``b``,
``weight``) and submodules carry Flax's automatic names (``Conv_0``, ``GroupNorm_1``, ``NIN_3`` ...), so a
state_dict key is the Flax parameter path joined with dots (``ResnetBlockBigGANpp_3.Conv_0.kernel``). Layouts
are PyTorch's: convolution kernels (out, in, kh, kw) where Flax stores HWIO, dense and NIN matrices (out, in) where
Flax stores (in, out); :mod:`cpcluster.convert.flax_ncsnpp` transposes them.

Flax conventions matched here: GroupNorm with ``min(C // 4, 32)`` groups and epsilon 1e-6 (flax's default), "SAME"
padding of odd kernels (k // 2 on each side), swish = x * sigmoid(x), residual sums divided by sqrt(2)
(``skip_rescale``), StyleGAN2's FIR resampling (``upfirdn2d``) with the kernel normalised to sum 1 (times 4 when
upsampling), the Gaussian Fourier features ``[sin(2 pi t W), cos(2 pi t W)]`` with ``W`` a constant (a buffer: Flax
stops its gradient, so fine-tuning must not change it either).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


def num_groups(channels: int) -> int:
    """The GroupNorm group count of NCSN++: ``min(C // 4, 32)``."""
    return min(channels // 4, 32)


class Conv(nn.Module):
    """``flax.linen.Conv`` with "SAME" padding, stride 1: ``kernel`` (out, in, k, k), ``bias`` (out,)."""

    def __init__(self, cin: int, cout: int, size: int = 3):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(cout, cin, size, size))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, self.bias, padding=self.kernel.shape[-1] // 2)


class Dense(nn.Module):
    """``flax.linen.Dense``: ``kernel`` (out, in), ``bias`` (out,); x (B, in) -> (B, out)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kernel, self.bias)


class NIN(nn.Module):
    """Network-in-network (a per-pixel linear map): ``W`` (out, in), ``b`` (out,); NCHW -> NCHW."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(cout, cin))
        self.b = nn.Parameter(torch.zeros(cout))
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W[:, :, None, None], self.b)


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm(num_groups=min(C // 4, 32))``, epsilon 1e-6: ``scale``, ``bias`` (C,)."""

    def __init__(self, channels: int):
        super().__init__()
        self.groups = num_groups(channels)
        self.scale = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.groups, self.scale, self.bias, eps=1e-6)


class GaussianFourierProjection(nn.Module):
    """t (B,) -> (B, 2 E) features ``[sin(2 pi t W), cos(2 pi t W)]``; ``W`` (E,) a constant buffer."""

    def __init__(self, size: int, scale: float):
        super().__init__()
        self.register_buffer("W", torch.randn(size) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """In float32 whatever the module's dtype (phases reach hundreds of radians); output in W's dtype."""
        proj = t.float()[:, None] * self.W.float()[None, :] * 2 * math.pi  # Flax's order of operations
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=1).to(self.W.dtype)


def fir_kernel_2d(taps, gain: float, like: torch.Tensor) -> torch.Tensor:
    """The separable FIR kernel ``outer(k, k) / sum`` times ``gain`` (L, L), on ``like``'s device and dtype."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(k, k)
    return (k / k.sum() * gain).to(device=like.device, dtype=like.dtype)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (pad0, pad1) on both axes, convolve with ``kernel``, keep every down-th pixel.

    x (B, C, H, W) -> (B, C, (H*up + pad0 + pad1 - L + 1) / down, ...). A true convolution (the kernel flipped),
    applied to each channel alone, as StyleGAN2's and score_sde's ``upfirdn_2d``.
    """
    b, c, h, w = x.shape
    if up > 1:
        zeros = x.new_zeros(b, c, h * up, w * up)
        zeros[:, :, ::up, ::up] = x
        x = zeros
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    x = F.conv2d(x.reshape(b * c, 1, *x.shape[2:]), kernel.flip(0, 1)[None, None])
    x = x.reshape(b, c, *x.shape[2:])
    return x[:, :, ::down, ::down] if down > 1 else x


def fir_upsample(x: torch.Tensor, taps) -> torch.Tensor:
    """``upsample_2d(x, k, factor=2)``: (B, C, H, W) -> (B, C, 2H, 2W)."""
    p = len(taps) - 2
    return upfirdn2d(x, fir_kernel_2d(taps, 4.0, x), up=2, pad=((p + 1) // 2 + 1, p // 2))


def fir_downsample(x: torch.Tensor, taps) -> torch.Tensor:
    """``downsample_2d(x, k, factor=2)``: (B, C, H, W) -> (B, C, H/2, W/2)."""
    p = len(taps) - 2
    return upfirdn2d(x, fir_kernel_2d(taps, 1.0, x), down=2, pad=((p + 1) // 2, p // 2))


class FirDownConv(nn.Module):
    """``up_or_down_sampling.Conv2d(down=True)``: FIR blur then a stride-2 3x3 conv; ``weight`` (out, in, 3, 3)."""

    def __init__(self, cin: int, cout: int, taps):
        super().__init__()
        self.taps = tuple(taps)
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = len(self.taps) - 2 + 2  # kernel length - factor + conv size - 1
        x = upfirdn2d(x, fir_kernel_2d(self.taps, 1.0, x), pad=((p + 1) // 2, p // 2))
        return F.conv2d(x, self.weight, self.bias, stride=2)


class Downsample(nn.Module):
    """``layerspp.Downsample(fir=True, with_conv=True)`` (the residual input pyramid): holds ``Conv2d_0``."""

    def __init__(self, cin: int, cout: int, taps):
        super().__init__()
        self.Conv2d_0 = FirDownConv(cin, cout, taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Conv2d_0(x)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block with FIR up/down sampling and a time-embedding bias; x (B, in, H, W), temb (B, E).

    Submodules in Flax's creation order: ``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``GroupNorm_1``, ``Conv_1`` and,
    when the channels change or the block resamples, the 1x1 shortcut ``Conv_2``.
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, taps, dropout: float, up: bool = False,
                 down: bool = False):
        super().__init__()
        self.taps, self.up, self.down = tuple(taps), up, down
        self.GroupNorm_0 = GroupNorm(cin)
        self.Conv_0 = Conv(cin, cout)
        self.Dense_0 = Dense(temb_dim, cout)
        self.GroupNorm_1 = GroupNorm(cout)
        self.dropout = nn.Dropout(dropout)
        self.Conv_1 = Conv(cout, cout)
        if cin != cout or up or down:
            self.Conv_2 = Conv(cin, cout, size=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.GroupNorm_0(x))
        if self.up:
            h, x = fir_upsample(h, self.taps), fir_upsample(x, self.taps)
        elif self.down:
            h, x = fir_downsample(h, self.taps), fir_downsample(x, self.taps)
        h = self.Conv_0(h) + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.dropout(F.silu(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / SQRT2


class AttnBlockpp(nn.Module):
    """Self-attention over all pixels (DDPM style): ``GroupNorm_0``, q/k/v ``NIN_0..2``, output ``NIN_3``."""

    def __init__(self, channels: int):
        super().__init__()
        self.GroupNorm_0 = GroupNorm(channels)
        for i in range(4):
            self.add_module(f"NIN_{i}", NIN(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (self._modules[f"NIN_{i}"](h).reshape(b, c, hh * ww) for i in range(3))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * (c ** -0.5), dim=-1)
        h = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
        return (x + self._modules["NIN_3"](h)) / SQRT2
