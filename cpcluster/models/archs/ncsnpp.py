"""Architecture ``ncsnpp``: the NCSN++ network of the JAX consistency models (openai/consistency_models_cifar10).

A PyTorch re-implementation of ``jcm.models.ncsnpp.NCSNpp`` with the options every released CIFAR-10 config uses
(``configs/cifar10_ve_cd.py``, ``cifar10_ve_ct_*.py``): BigGAN residual blocks with FIR resampling, a residual
input pyramid, ``skip_rescale``, DDPM attention at ``attn_resolutions``, a Gaussian Fourier time embedding and swish.
Other values of those options are refused with one line (``check_config``), not approximated.

``forward(x, time_input, class_labels=None)``: ``x`` (B, C, H, W) in model space (the consistency function's
``c_in(t) x_t``), ``time_input`` (B,) the network's time input, for jcm ``0.25 ln t`` (c_noise convention
"jax"), fed straight into the Fourier features; returns (B, C, H, W). The network is unconditional: class labels
are ignored. H = W = ``image_size`` is required, since the attention layers sit at fixed resolutions.

state_dict keys are Flax's parameter paths (``ResnetBlockBigGANpp_3.Conv_0.kernel``, ``AttnBlockpp_0.NIN_1.W``,
``GaussianFourierProjection_0.W``), the submodules numbered per class in the order Flax creates them; see
:mod:`cpcluster.models.archs.ncsnpp_layers` for the layouts.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

from cpcluster.models.archs.ncsnpp_layers import (SQRT2, AttnBlockpp, Conv, Dense, Downsample,
                                                  GaussianFourierProjection, GroupNorm, ResnetBlockBigGANpp)
from cpcluster.models.archs.params import (check_keys, get_bool, get_choice, get_float, get_int, get_int_list)
from cpcluster.util.errors import InputError

# The options of the released configs: the only values this implementation has (and is tested with).
FIXED = {"resblock_type": "biggan", "progressive": "none", "progressive_input": "residual",
         "embedding_type": "fourier", "nonlinearity": "swish", "fir": True, "skip_rescale": True,
         "conditional": True, "double_heads": False}
SIZES = ("image_size", "num_channels", "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
         "fourier_scale", "fir_kernel")
MAX_CHANNELS = 4096


def check_config(config: dict, what: str) -> dict:
    """The checked, complete config (defaults: the released CIFAR-10 network); refuses what is not implemented."""
    check_keys(config, (*SIZES, *FIXED), what)
    for key, value in FIXED.items():
        if isinstance(value, bool):
            got = get_bool(config, key, what, default=value)
            if got != value:
                raise InputError(f"{what}: NCSN++ option {key}={got} is not implemented (only {key}={value}, as in "
                                 "the released CIFAR-10 configs)")
        else:
            get_choice(config, key, what, (value,), default=value)
    out = {
        "image_size": get_int(config, "image_size", what, 4, 1024, default=32),
        "num_channels": get_int(config, "num_channels", what, 1, 16, default=3),
        "nf": get_int(config, "nf", what, 4, MAX_CHANNELS, default=128),
        "ch_mult": get_int_list(config, "ch_mult", what, 1, 64, 8, default=[2, 2, 2], min_len=1),
        "num_res_blocks": get_int(config, "num_res_blocks", what, 1, 32, default=4),
        "attn_resolutions": get_int_list(config, "attn_resolutions", what, 1, 1024, 8, default=[16]),
        "dropout": get_float(config, "dropout", what, 0.0, 0.99, default=0.0),
        "fourier_scale": get_float(config, "fourier_scale", what, 0.0, 1e4, default=16.0),
        "fir_kernel": get_int_list(config, "fir_kernel", what, 0, 1000, 8, default=[1, 3, 3, 1], min_len=2),
    }
    levels = len(out["ch_mult"])
    if out["image_size"] % 2 ** (levels - 1):
        raise InputError(f"{what}: image_size {out['image_size']} is not divisible by 2^{levels - 1} "
                         f"({levels} resolutions in ch_mult)")
    if max(out["ch_mult"]) * out["nf"] > MAX_CHANNELS:
        raise InputError(f"{what}: nf * ch_mult asks for more than {MAX_CHANNELS} channels")
    for ch in (out["nf"], *(out["nf"] * m for m in out["ch_mult"])):
        if ch % min(ch // 4, 32):
            raise InputError(f"{what}: {ch} channels cannot be split into min(C // 4, 32) GroupNorm groups")
    if not sum(out["fir_kernel"]):
        raise InputError(f"{what}: fir_kernel {list(out['fir_kernel'])} sums to 0")
    return out


class NCSNpp(nn.Module):
    """NCSN++ (see the module docstring); build it with :func:`build`, which checks the config."""

    def __init__(self, image_size: int, num_channels: int, nf: int, ch_mult, num_res_blocks: int,
                 attn_resolutions, dropout: float, fourier_scale: float, fir_kernel):
        super().__init__()
        self.image_size = image_size
        counts: collections.Counter = collections.Counter()

        def add(module: nn.Module) -> str:
            kind = type(module).__name__
            name = f"{kind}_{counts[kind]}"  # Flax's automatic name: class name, index per class and parent
            counts[kind] += 1
            self.add_module(name, module)
            return name

        temb_dim = 4 * nf
        res_block = lambda cin, cout, **kw: ResnetBlockBigGANpp(cin, cout, temb_dim, fir_kernel, dropout, **kw)
        add(GaussianFourierProjection(nf, fourier_scale))
        add(Dense(2 * nf, temb_dim))
        add(Dense(temb_dim, temb_dim))
        add(Conv(num_channels, nf))
        # (op, module name, extra name) in execution order; ops: res, attn, down (block + pyramid), up
        self.down_steps: list[tuple[str, str, str | None]] = []
        skips, ch, pyramid_ch = [nf], nf, num_channels
        levels = len(ch_mult)
        for level, mult in enumerate(ch_mult):
            resolution = image_size >> level
            for _ in range(num_res_blocks):
                block = add(res_block(ch, nf * mult))
                ch = nf * mult
                attn = add(AttnBlockpp(ch)) if resolution in attn_resolutions else None
                self.down_steps.append(("res", block, attn))
                skips.append(ch)
            if level != levels - 1:
                block = add(res_block(ch, ch, down=True))
                self.down_steps.append(("down", block, add(Downsample(pyramid_ch, ch, fir_kernel))))
                pyramid_ch = ch
                skips.append(ch)
        self.mid = [add(res_block(ch, ch)), add(AttnBlockpp(ch)), add(res_block(ch, ch))]
        self.up_steps: list[tuple[str, str]] = []
        for level in reversed(range(levels)):
            for _ in range(num_res_blocks + 1):
                cout = nf * ch_mult[level]
                self.up_steps.append(("res", add(res_block(ch + skips.pop(), cout))))
                ch = cout
            if image_size >> level in attn_resolutions:
                self.up_steps.append(("attn", add(AttnBlockpp(ch))))
            if level != 0:
                self.up_steps.append(("up", add(res_block(ch, ch, up=True))))
        assert not skips
        add(GroupNorm(ch))
        add(Conv(ch, num_channels))

    def forward(self, x: torch.Tensor, time_input: torch.Tensor, class_labels: torch.Tensor | None = None):
        """x (B, C, H, W) model space, time_input (B,) = 0.25 ln t; returns (B, C, H, W). Labels are ignored."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"this NCSN++ was built for {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        m = self._modules
        temb = m["Dense_0"](m["GaussianFourierProjection_0"](time_input))
        temb = m["Dense_1"](F.silu(temb))
        hs = [m["Conv_0"](x)]
        pyramid = x
        for op, name, extra in self.down_steps:
            h = m[name](hs[-1], temb)
            if op == "down":
                pyramid = (m[extra](pyramid) + h) / SQRT2
                h = pyramid
            elif extra is not None:
                h = m[extra](h)
            hs.append(h)
        h = m[self.mid[0]](hs[-1], temb)
        h = m[self.mid[2]](m[self.mid[1]](h), temb)
        for op, name in self.up_steps:
            if op == "res":
                h = m[name](torch.cat([h, hs.pop()], dim=1), temb)
            elif op == "attn":
                h = m[name](h)
            else:
                h = m[name](h, temb)
        return m["Conv_1"](F.silu(m["GroupNorm_0"](h)))


def build(config: dict, what: str) -> nn.Module:
    """An :class:`NCSNpp` from its arch config (keys: ``SIZES`` and the fixed options ``FIXED``, Flax's names)."""
    return NCSNpp(**check_config(config, what))
