"""Architecture ``demo-unet``: the demo's small consistency UNet (:class:`cpcluster.demo.nets.DemoUNet`)."""
from __future__ import annotations

from torch import nn

from cpcluster.util.errors import InputError

from cpcluster.models.archs.params import check_keys, get_int, get_optional_int


def build(config: dict, what: str) -> nn.Module:
    """``{"channels": C, "width": W, "num_classes": K or null}`` -> a DemoUNet (forward ``(x, c_noise, labels)``)."""
    from cpcluster.demo.nets import DemoUNet

    check_keys(config, ("channels", "width", "num_classes"), what)
    width = get_int(config, "width", what, 8, 1024, default=32)
    if width % 8:
        raise InputError(f"{what}: architecture config width={width} must be a multiple of 8 (GroupNorm of 8 groups)")
    return DemoUNet(channels=get_int(config, "channels", what, 1, 16, default=1), width=width,
                    num_classes=get_optional_int(config, "num_classes", what, 1, 100_000))
