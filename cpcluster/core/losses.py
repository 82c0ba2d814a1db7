"""Fine-tuning losses in model space [-1, 1]: LPIPS (``lpips`` package) and the L1 / L2 ablations.

Every loss maps two (B, C, H, W) model-space tensors to a (B,) per-image loss, so a batch split over ranks
averages to the same number as the whole batch on one rank.

LPIPS backbones. The ``lpips`` package ships only its small linear layers (``lpips/weights/v0.1/*.pth``, read
from the installed package). Its VGG16 / AlexNet trunk would normally come from torchvision, which *downloads*
the ImageNet weights when they are missing from its cache. Compute nodes usually have no internet, so this module
never lets torchvision fetch anything: it builds the trunk randomly initialised (``pnet_rand=True``, no I/O) and
then loads the ImageNet weights itself from ``<torch hub dir>/checkpoints/<file>`` (``$TORCH_HOME/hub``, default
``~/.cache/torch/hub``) with ``torch.load(weights_only=True)``. :func:`check_backbone` tells exactly which file is
missing and where it belongs. ``random_backbone=True`` (tests, the demo) keeps the seeded random trunk instead:
the loss is then *not* the perceptual metric of the paper.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from cpcluster.util.errors import InputError

# torchvision's file names for the ImageNet weights of the LPIPS trunks (the hash prefix is part of the name).
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
BACKBONE_URLS = {"vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
                 "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"}
RANDOM_BACKBONE_WARNING = ("WARNING: --lpips-random-backbone: LPIPS runs on a RANDOMLY INITIALISED {net} trunk. "
                           "The loss is not the perceptual metric of the paper; use this for tests and the demo only.")


def backbone_path(net: str) -> str:
    """Where torchvision's cache keeps the ImageNet weights of the LPIPS trunk ``net`` ("vgg" or "alex")."""
    if net not in BACKBONE_FILES:
        raise InputError(f"--lpips-net {net!r}: use one of {', '.join(BACKBONE_FILES)}")
    return os.path.join(torch.hub.get_dir(), "checkpoints", BACKBONE_FILES[net])


def check_backbone(net: str) -> str:
    """The path of the cached trunk weights; :class:`InputError` naming the exact file and folder if absent."""
    path = backbone_path(net)
    if not os.path.isfile(path):
        raise InputError(f"LPIPS {net} backbone weights missing: put {BACKBONE_FILES[net]} (from "
                         f"{BACKBONE_URLS[net]}) into {os.path.dirname(path)} (torchvision's cache, "
                         "$TORCH_HOME/hub/checkpoints), or pass --lpips-random-backbone for tests and demos")
    return path


def _load_trunk(model, net: str, path: str) -> None:
    """Copy torchvision's ``features.<i>.*`` tensors of ``path`` into the LPIPS trunk (``slice<k>.<i>.*``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"LPIPS {net} backbone {path}: cannot be loaded with weights_only=True "
                         f"({type(e).__name__}); replace it with torchvision's file") from None
    mine = model.net.state_dict()
    new = {}
    for key in mine:  # "slice2.5.weight" -> torchvision "features.5.weight"
        _, index, param = key.split(".")
        src = f"features.{index}.{param}"
        if src not in state or tuple(state[src].shape) != tuple(mine[key].shape):
            raise InputError(f"LPIPS {net} backbone {path}: no tensor {src} of shape {tuple(mine[key].shape)}; "
                             "is this torchvision's file for this network?")
        new[key] = state[src]
    model.net.load_state_dict(new, strict=True)


def build_lpips(net: str = "vgg", random_backbone: bool = False, seed: int = 0) -> nn.Module:
    """An ``lpips.LPIPS`` module (v0.1 linear layers from the package), frozen, in eval mode, on the CPU.

    ``random_backbone=False`` loads the trunk from :func:`check_backbone`'s file; ``True`` keeps a trunk drawn
    from ``seed`` (the same on every rank and every run, so losses agree across ranks and resumptions). Nothing is
    downloaded either way.
    """
    import lpips

    path = None if random_backbone else check_backbone(net)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for lpips's pretrained=False
        model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=True, verbose=False)
    if path is not None:
        _load_trunk(model, net, path)
    return model.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """LPIPS between model-space images, per image.

    ``forward(a, b)``: (B, C, H, W) model space [-1, 1] (``a`` may leave the range) -> (B,) LPIPS distances.
    Grey images (C = 1) are repeated to 3 channels; both are resized bilinearly (align_corners=False) to
    ``resize x resize`` first when ``resize > 0`` (224 in the reference run).
    """

    def __init__(self, lpips_module: nn.Module, resize: int = 224):
        super().__init__()
        self.lpips = lpips_module
        self.resize = int(resize)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(self.prepare(a), self.prepare(b)).reshape(a.shape[0])


class PixelLoss(nn.Module):
    """``l2``: mean squared difference per image; ``l1``: mean absolute difference per image. (B,) out."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ("l1", "l2"):
            raise InputError(f"--loss {kind!r}: use lpips, l2 or l1")
        self.kind = kind

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (a - b).flatten(1)
        return d.abs().mean(1) if self.kind == "l1" else d.square().mean(1)


def build_loss(kind: str, lpips_net: str = "vgg", resize: int = 224, random_backbone: bool = False,
               seed: int = 0) -> nn.Module:
    """The training loss ``kind`` ("lpips", "l2", "l1"): a module ``(a, b) -> (B,)`` in model space."""
    if kind == "lpips":
        return PerceptualLoss(build_lpips(lpips_net, random_backbone, seed), resize)
    return PixelLoss(kind)
