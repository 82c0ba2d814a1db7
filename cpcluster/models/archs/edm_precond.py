"""Architecture ``edm-precond``: an NVlabs/edm network -- a preconditioner around a SongUNet or DhariwalUNet.

All four of EDM's preconditioners (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``) turn their inner
network F into the same thing, a denoiser in the variance-exploding form ``D(x; sigma) = c_skip x + c_out
F(c_in x, c_noise, labels)``, and differ only in four scalings (and iDDPM's table ``u`` of noise levels). So they
are one registered architecture whose config names the preconditioner: a released EDM pickle and a baseline
(VP/VE/iDDPM) pickle convert and run the same way, as ``kind=edm`` networks with ``preconditioned: true``.

``module(x, sigma, class_labels)``: ``x`` (B, C, R, R) model space [-1, 1] plus noise of standard deviation
``sigma`` (B,) (model-space units; EDM's own time input), ``class_labels`` (B,) int64 (turned into EDM's one-hot
vector here), a float (B, label_dim) vector, or None (EDM then feeds zeros). Returns D, (B, C, R, R) float32.
Computation is float32 (EDM's ``use_fp16`` is recorded and not applied; certify's ``--dtype`` autocasts).

Config (JSON, from ``cpcluster convert edm-pickle``)::

    {"precond": "EDMPrecond", "precond_kwargs": {"img_resolution": 32, "img_channels": 3, "label_dim": 10,
     "use_fp16": false, "sigma_data": 0.5}, "model_type": "SongUNet",
     "model_kwargs": {"img_resolution": 32, "in_channels": 3, "out_channels": 3, "label_dim": 10, ...}}

``model_kwargs`` are the inner network's constructor arguments with EDM's names and defaults.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cpcluster.models.archs.edm_unets import UNETS
from cpcluster.models.archs.params import check_keys, get_bool, get_choice, get_float, get_int, get_int_list
from cpcluster.util.errors import InputError

COMMON_KWARGS = {"img_resolution": None, "img_channels": None, "label_dim": 0, "use_fp16": False}
# The preconditioner arguments that change D (the sampler's sigma_min / sigma_max / epsilon_t do not).
FORWARD_KWARGS = {
    "EDMPrecond": {"sigma_data": 0.5},
    "VPPrecond": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000},
    "VEPrecond": {},
    "iDDPMPrecond": {"C_1": 0.001, "C_2": 0.008, "M": 1000},
}
MAX_WIDTH = 8192
MAX_PARAMETERS = 2_000_000_000


class Preconditioned(nn.Module):
    """Base: ``forward(x, sigma, class_labels) -> D`` (see module docstring); subclasses give the scalings."""

    out_factor = 1  # output channels of F per image channel

    def __init__(self, model: nn.Module, img_channels: int, label_dim: int):
        super().__init__()
        self.img_channels, self.label_dim = img_channels, label_dim
        self.model = model

    def scalings(self, sigma: torch.Tensor):
        """``(c_skip, c_out, c_in, c_noise)`` for sigma of shape (B, 1, 1, 1)."""
        raise NotImplementedError

    def one_hot(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """EDM's label input: (B, label_dim) float; zeros (1, label_dim) when no labels; None if unconditional."""
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros(1, self.label_dim, device=x.device)
        if class_labels.is_floating_point():
            return class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return F.one_hot(class_labels.long().reshape(-1), self.label_dim).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        f = self.model(c_in * x, c_noise.flatten(), self.one_hot(class_labels, x))
        return c_skip * x + c_out * f[:, : self.img_channels].to(torch.float32)


class EDMPrecond(Preconditioned):
    """Karras et al. (2022): c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
    c_noise = ln(s)/4."""

    def __init__(self, model, img_channels, label_dim, sigma_data=0.5):
        super().__init__(model, img_channels, label_dim)
        self.sigma_data = float(sigma_data)

    def scalings(self, sigma):
        sd2 = self.sigma_data**2
        return (sd2 / (sigma**2 + sd2), sigma * self.sigma_data / (sigma**2 + sd2).sqrt(),
                1 / (sd2 + sigma**2).sqrt(), sigma.log() / 4)


class VPPrecond(Preconditioned):
    """Variance preserving: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) t(s) with t the inverse
    of ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``."""

    def __init__(self, model, img_channels, label_dim, beta_d=19.9, beta_min=0.1, M=1000):
        super().__init__(model, img_channels, label_dim)
        self.beta_d, self.beta_min, self.M = float(beta_d), float(beta_min), int(M)

    def scalings(self, sigma):
        t = ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * t


class VEPrecond(Preconditioned):
    """Variance exploding: c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)."""

    def scalings(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(Preconditioned):  # noqa: N801 (EDM's class name)
    """Improved DDPM: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = M-1-j with j the index of the level in
    the buffer ``u`` (M+1 noise levels of the cosine schedule) nearest s; F has 2C channels, the first C are used."""

    out_factor = 2

    def __init__(self, model, img_channels, label_dim, C_1=0.001, C_2=0.008, M=1000):  # noqa: N803
        super().__init__(model, img_channels, label_dim)
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        j = np.arange(M + 1, dtype=np.float64)
        alpha_bar = np.sin(0.5 * np.pi * j / M / (self.C_2 + 1)) ** 2
        u = np.zeros(M + 1)
        for i in range(M, 0, -1):
            u[i - 1] = math.sqrt((u[i] ** 2 + 1) / max(alpha_bar[i - 1] / alpha_bar[i], self.C_1) - 1)
        self.register_buffer("u", torch.tensor(u, dtype=torch.float32))

    def scalings(self, sigma):
        index = (sigma.reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), self.M - 1 - index.to(torch.float32)


PRECONDS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "iDDPMPrecond": iDDPMPrecond}


def _precond_kwargs(kw: dict, precond: str, what: str) -> dict:
    check_keys(kw, (*COMMON_KWARGS, *FORWARD_KWARGS[precond]), what)
    out = {"img_resolution": get_int(kw, "img_resolution", what, 1, 4096),
           "img_channels": get_int(kw, "img_channels", what, 1, 64),
           "label_dim": get_int(kw, "label_dim", what, 0, 100_000, default=0),
           "use_fp16": get_bool(kw, "use_fp16", what, default=False)}
    for key, default in FORWARD_KWARGS[precond].items():
        out[key] = (get_int(kw, key, what, 1, 100_000, default=default) if key == "M"
                    else get_float(kw, key, what, 1e-9, 1e6, default=default))
    return out


def _model_kwargs(kw: dict, model_type: str, what: str) -> dict:
    defaults = UNETS[model_type][1]
    check_keys(kw, ("img_resolution", "in_channels", "out_channels", *defaults), what)
    out = {"img_resolution": get_int(kw, "img_resolution", what, 1, 4096),
           "in_channels": get_int(kw, "in_channels", what, 1, 64),
           "out_channels": get_int(kw, "out_channels", what, 1, 128),
           "label_dim": get_int(kw, "label_dim", what, 0, 100_000, default=0),
           "augment_dim": get_int(kw, "augment_dim", what, 0, 1024, default=0),
           "model_channels": get_int(kw, "model_channels", what, 2, 4096, default=defaults["model_channels"]),
           "channel_mult": list(get_int_list(kw, "channel_mult", what, 1, 64, 8, default=defaults["channel_mult"],
                                             min_len=1)),
           "channel_mult_emb": get_int(kw, "channel_mult_emb", what, 1, 16, default=4),
           "num_blocks": get_int(kw, "num_blocks", what, 1, 32, default=defaults["num_blocks"]),
           "attn_resolutions": list(get_int_list(kw, "attn_resolutions", what, 1, 4096, 16,
                                                 default=defaults["attn_resolutions"])),
           "dropout": get_float(kw, "dropout", what, 0.0, 1.0, default=0.1),
           "label_dropout": get_float(kw, "label_dropout", what, 0.0, 1.0, default=0.0)}
    if model_type == "SongUNet":
        out.update(embedding_type=get_choice(kw, "embedding_type", what, ("positional", "fourier"), "positional"),
                   channel_mult_noise=get_int(kw, "channel_mult_noise", what, 1, 16, default=1),
                   encoder_type=get_choice(kw, "encoder_type", what, ("standard", "skip", "residual"), "standard"),
                   decoder_type=get_choice(kw, "decoder_type", what, ("standard", "skip"), "standard"),
                   resample_filter=list(get_int_list(kw, "resample_filter", what, 1, 1000, 8, default=[1, 1],
                                                     min_len=1)))
    return out


def _check_size(pk: dict, mk: dict, precond: str, what: str) -> None:
    """Cross-checks of the two kwargs sets, and a parameter-count bound, before anything is allocated."""
    expected = {"img_resolution": pk["img_resolution"], "in_channels": pk["img_channels"],
                "out_channels": pk["img_channels"] * PRECONDS[precond].out_factor, "label_dim": pk["label_dim"]}
    for key, value in expected.items():
        if mk[key] != value:
            raise InputError(f"{what}: model_kwargs {key}={mk[key]} but {precond} with its precond_kwargs needs "
                             f"{value}")
    levels = len(mk["channel_mult"])
    if mk["img_resolution"] % (1 << (levels - 1)):
        raise InputError(f"{what}: img_resolution {mk['img_resolution']} cannot be halved {levels - 1} times")
    width = mk["model_channels"] * max(mk["channel_mult"])
    emb = mk["model_channels"] * mk["channel_mult_emb"]
    noise = mk["model_channels"] * mk.get("channel_mult_noise", 1)
    if width > MAX_WIDTH or emb > 2 * MAX_WIDTH or noise % 2:
        raise InputError(f"{what}: {width} channels / embedding {emb} / noise embedding {noise} is not a plausible "
                         f"EDM network (at most {MAX_WIDTH} channels, an even noise embedding)")
    blocks = levels * (2 * mk["num_blocks"] + 3) + 2
    estimate = blocks * (40 * width**2 + 2 * emb * width) + 2 * emb**2
    if estimate > MAX_PARAMETERS:
        raise InputError(f"{what}: this config asks for about {estimate:,} parameters (limit {MAX_PARAMETERS:,})")


def build(config: dict, what: str) -> nn.Module:
    """The preconditioned network of an ``edm-precond`` config (see the module docstring)."""
    check_keys(config, ("precond", "precond_kwargs", "model_type", "model_kwargs"), what)
    precond = get_choice(config, "precond", what, tuple(PRECONDS))
    model_type = get_choice(config, "model_type", what, tuple(UNETS))
    for key in ("precond_kwargs", "model_kwargs"):
        if not isinstance(config.get(key), dict):
            raise InputError(f"{what}: the architecture config lacks a {key!r} object")
    pk = _precond_kwargs(config["precond_kwargs"], precond, what)
    mk = _model_kwargs(config["model_kwargs"], model_type, what)
    _check_size(pk, mk, precond, what)
    try:
        model = UNETS[model_type][0](**mk)
    except ValueError as e:
        raise InputError(f"{what}: {model_type} config does not make a network: {e}") from None
    extra = {k: pk[k] for k in FORWARD_KWARGS[precond]}
    return PRECONDS[precond](model, pk["img_channels"], pk["label_dim"], **extra)
