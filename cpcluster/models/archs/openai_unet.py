"""Architecture ``openai-unet``: the ``UNetModel`` of improved-diffusion and consistency_models (guided-diffusion's).

Our own implementation with upstream's ``state_dict`` keys (``time_embed``, ``label_emb``, ``input_blocks.N.M``,
``middle_block``, ``output_blocks``, ``out``) and numerics (blocks in :mod:`.openai_unet_blocks`), so that the
released ``.pt`` files (``torch.save(model.state_dict())``) load as they are.

Config keys mirror the upstream constructor: ``image_size``, ``in_channels``, ``model_channels``, ``out_channels``,
``num_res_blocks``, ``attention_resolutions`` (the *downsample rates* at which attention runs, e.g. [2, 4] for
``--attention_resolutions 16,8`` at 32x32), ``dropout``, ``channel_mult``, ``conv_resample``, ``num_classes``,
``num_heads``, ``num_head_channels`` (-1: use ``num_heads``), ``num_heads_upsample`` (-1: ``num_heads``),
``use_scale_shift_norm``, ``resblock_updown``, ``use_new_attention_order``; and two of cpcluster's:

* ``attention_conv_dims`` -- 1 (improved-diffusion: ``qkv`` / ``proj_out`` are ``Conv1d``) or 2 (consistency_models:
  ``Conv2d`` 1x1). consistency_models ignores ``use_new_attention_order`` and always splits q, k, v first (the
  flash-attention layout): its checkpoints need ``use_new_attention_order: true``.
* ``time_input_scale`` -- the forward multiplies the time input by it: ``1000 / T`` for improved-diffusion's
  ``rescale_timesteps=True`` (the network saw ``t * 1000 / T`` for integer timestep t), 1 otherwise.

Forward ``(x (B, in_channels, H, W) model space, time_input (B,), class_labels (B,) int64 or None)`` ->
(B, C, H, W); a learned-sigma output (``out_channels == 2 * in_channels``) is cut to its first ``in_channels``
channels (the mean / epsilon part). H and W must be divisible by ``2 ** (len(channel_mult) - 1)``.
"""
from __future__ import annotations

import torch
from torch import nn

from cpcluster.models.archs.openai_unet_blocks import (GROUPS, AttentionBlock, Downsample, GroupNorm32, ResBlock,
                                                       TimestepSequential, Upsample, timestep_embedding)
from cpcluster.models.archs.params import (check_keys, get_bool, get_choice, get_float, get_int, get_int_list,
                                           get_optional_int)
from cpcluster.util.errors import InputError

MAX_CHANNELS = 8192
MAX_PARAMETERS = 4_000_000_000
KEYS = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
        "dropout", "channel_mult", "conv_resample", "num_classes", "num_heads", "num_head_channels",
        "num_heads_upsample", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
        "attention_conv_dims", "time_input_scale")


class OpenAIUNet(nn.Module):
    """The UNet; constructor arguments as in the module docstring (already checked by :func:`read_config`)."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: tuple, channel_mult: tuple, dropout: float = 0.0, conv_resample: bool = True,
                 num_classes: int | None = None, num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, attention_conv_dims: int = 1, time_input_scale: float = 1.0,
                 image_size: int | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.num_classes, self.time_input_scale = num_classes, float(time_input_scale)
        emb = 4 * model_channels
        up_heads = num_heads if num_heads_upsample == -1 else num_heads_upsample
        order = "qkv-first" if use_new_attention_order else "heads-first"

        def attention(ch, heads):
            heads = ch // num_head_channels if num_head_channels != -1 else heads
            return AttentionBlock(ch, heads, order, attention_conv_dims)

        def res(ch, out=None, resample=None):
            return ResBlock(ch, emb, dropout, out, use_scale_shift_norm, resample)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb)
        ch = channel_mult[0] * model_channels
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, resample="down") if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepSequential(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch), attention(ch, num_heads), res(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, up_heads))
                if level and i == num_res_blocks:
                    layers.append(res(ch, resample="up") if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, time_input: torch.Tensor, class_labels: torch.Tensor | None = None):
        t = torch.as_tensor(time_input, device=x.device).float().reshape(-1).expand(x.shape[0])
        if self.time_input_scale != 1.0:
            t = t * self.time_input_scale
        weight = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(weight.dtype))
        if self.num_classes is not None:
            if class_labels is None:
                raise ValueError("this OpenAI UNet is class-conditional: pass class_labels (B,) int64")
            emb = emb + self.label_emb(class_labels.reshape(-1))
        h, skips = x.to(weight.dtype), []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h).to(x.dtype)
        return out[:, : self.in_channels] if self.out_channels == 2 * self.in_channels else out


def read_config(config: dict, what: str) -> dict:
    """The constructor arguments of :class:`OpenAIUNet` from a JSON config, every value bounded and consistent."""
    check_keys(config, KEYS, what)
    mult = get_int_list(config, "channel_mult", what, 1, 64, 8, min_len=1)
    mc = get_int(config, "model_channels", what, GROUPS, MAX_CHANNELS)
    widths = [m * mc for m in mult]
    if any(w % GROUPS or w > MAX_CHANNELS for w in widths):
        raise InputError(f"{what}: architecture config model_channels={mc} x channel_mult={list(mult)} gives widths "
                         f"{widths}; each must be a multiple of {GROUPS} (group norm) and at most {MAX_CHANNELS}")
    rates = get_int_list(config, "attention_resolutions", what, 1, 4096, 8, default=[])
    if any(r & (r - 1) or r > 2 ** (len(mult) - 1) for r in rates):
        raise InputError(f"{what}: architecture config attention_resolutions={list(rates)} must be downsample rates "
                         f"(powers of two up to {2 ** (len(mult) - 1)}), i.e. image_size // resolution")
    args = dict(
        image_size=get_optional_int(config, "image_size", what, 2 ** (len(mult) - 1), 4096),
        in_channels=get_int(config, "in_channels", what, 1, 64, default=3), model_channels=mc,
        out_channels=get_int(config, "out_channels", what, 1, 128, default=3),
        num_res_blocks=get_int(config, "num_res_blocks", what, 1, 32), attention_resolutions=rates,
        channel_mult=mult, dropout=get_float(config, "dropout", what, 0.0, 1.0, default=0.0),
        conv_resample=get_bool(config, "conv_resample", what, default=True),
        num_classes=get_optional_int(config, "num_classes", what, 1, 1_000_000),
        num_heads=get_int(config, "num_heads", what, 1, 1024, default=1),
        num_head_channels=get_int(config, "num_head_channels", what, -1, MAX_CHANNELS, default=-1),
        num_heads_upsample=get_int(config, "num_heads_upsample", what, -1, 1024, default=-1),
        use_scale_shift_norm=get_bool(config, "use_scale_shift_norm", what, default=False),
        resblock_updown=get_bool(config, "resblock_updown", what, default=False),
        use_new_attention_order=get_bool(config, "use_new_attention_order", what, default=False),
        attention_conv_dims=get_choice(config, "attention_conv_dims", what, (1, 2), default=1),
        time_input_scale=get_float(config, "time_input_scale", what, 0.0, 1e6, default=1.0))
    if args["time_input_scale"] <= 0:
        raise InputError(f"{what}: architecture config time_input_scale must be > 0 (1000/T or 1)")
    _check_heads(args, widths, what)
    return args


def _check_heads(args: dict, widths: list, what: str) -> None:
    """Every attention width splits evenly into heads (upstream would fail in a reshape)."""
    hc = args["num_head_channels"]
    if hc == 0 or args["num_heads_upsample"] == 0:
        raise InputError(f"{what}: architecture config num_head_channels / num_heads_upsample is -1 or positive")
    up = args["num_heads"] if args["num_heads_upsample"] == -1 else args["num_heads_upsample"]
    levels = [widths[r.bit_length() - 1] for r in args["attention_resolutions"]] + [widths[-1]]
    for width in levels:
        for heads in ({args["num_heads"], up} if hc == -1 else {max(width // hc, 1)}):
            if width % heads or (hc != -1 and width % hc):
                raise InputError(f"{what}: attention width {width} does not split into "
                                 + (f"heads of {hc} channels" if hc != -1 else f"{heads} heads"))


def build(config: dict, what: str) -> nn.Module:
    """An :class:`OpenAIUNet` from its config; refuses a config whose network would exceed MAX_PARAMETERS."""
    args = read_config(config, what)
    with torch.device("meta"):
        probe = OpenAIUNet(**args)
    count = sum(p.numel() for p in probe.parameters())
    if count > MAX_PARAMETERS:
        raise InputError(f"{what}: the architecture config describes a network of {count:,} parameters "
                         f"(limit {MAX_PARAMETERS:,})")
    if next(probe.parameters()).device == torch.empty(0).device:  # already asked for the meta device
        return probe
    return OpenAIUNet(**args)
