"""Architectures of the built-in demo models (small enough to certify thousands of draws per second on a CPU).

* :class:`DemoClassifier`: pixel space (B, 1, 16, 16) in [0, 1] -> logits (B, 10).
* :class:`DemoUNet`: the network F of a consistency model, ``F(x, c_noise, class_labels)`` in model space
  [-1, 1], (B, C, 16, 16) -> (B, C, 16, 16); time input ``c_noise = 1000 * 0.25 ln t`` (the "openai" convention).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class DemoClassifier(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.5) / 0.5))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DemoUNet(nn.Module):
    """Two-level UNet with a Fourier embedding of ``c_noise / 250 = ln t`` and optional class conditioning."""

    def __init__(self, channels: int = 1, width: int = 32, num_classes: int | None = None):
        super().__init__()
        self.num_freqs = 16
        emb_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(2 * self.num_freqs, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.enc = _ResBlock(width, width, emb_dim)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(2 * width, 2 * width, emb_dim)
        self.mid2 = _ResBlock(2 * width, 2 * width, emb_dim)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.dec = _ResBlock(2 * width, width, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def _embed(self, c_noise: torch.Tensor, class_labels):
        freqs = torch.exp(torch.linspace(0, math.log(64.0), self.num_freqs, device=c_noise.device))
        arg = (c_noise.float() / 250.0)[:, None] * freqs[None, :] / 8.0
        emb = self.time_mlp(torch.cat([arg.sin(), arg.cos()], dim=1))
        if self.label_emb is not None:
            if class_labels is None:
                raise ValueError("this DemoUNet is class-conditional: pass class_labels")
            emb = emb + self.label_emb(class_labels)
        return emb

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None):
        emb = self._embed(c_noise, class_labels).to(x.dtype)
        h0 = self.enc(self.inp(x), emb)
        h = self.mid2(self.mid1(self.down(h0), emb), emb)
        h = self.dec(torch.cat([self.up(h), h0], dim=1), emb)
        return self.out(h)
