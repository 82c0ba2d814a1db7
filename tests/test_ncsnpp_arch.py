"""Architecture ncsnpp: FIR resampling against an independent scipy reference, Flax naming, config refusals.

The numerical match with jcm's own Flax network is tested in test_flax_ncsnpp.py on a checkpoint jcm wrote.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from cpcluster.models.archs import build_architecture
from cpcluster.models.archs.ncsnpp_layers import FirDownConv, GroupNorm, fir_downsample, fir_upsample
from cpcluster.util.errors import InputError

SMALL = {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "image_size": 16}
TAPS = (1, 3, 3, 1)


def _kernel(gain):
    k = np.outer(TAPS, TAPS).astype(np.float64)
    return k / k.sum() * gain


def test_fir_upsample_is_zero_insertion_then_full_convolution():
    """StyleGAN2 upsample_2d: zeros between pixels, convolve with 4 * k/sum(k), keep the centred 2H x 2W window."""
    x = torch.randn(1, 1, 5, 6, dtype=torch.float64)
    up = np.zeros((10, 12))
    up[::2, ::2] = x[0, 0].numpy()
    full = convolve2d(up, _kernel(4.0), mode="full")  # (10 + 3) x (12 + 3)
    expected = full[1:11, 1:13]  # pad (2, 1) of upsample_2d for a 4-tap kernel -> offset L - 1 - 2 = 1
    got = fir_upsample(x, TAPS)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # a constant image stays constant away from the border (gain 4 exactly compensates the inserted zeros)
    assert torch.allclose(fir_upsample(torch.ones(1, 1, 8, 8), TAPS)[..., 3:-3, 3:-3], torch.ones(1))


def test_fir_downsample_and_conv_downsample():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    full = convolve2d(x[0, 0].numpy(), _kernel(1.0), mode="full")  # 11 x 11, zero outside the image
    np.testing.assert_allclose(fir_downsample(x, TAPS)[0, 0].numpy(), full[2:10:2, 2:10:2], atol=1e-12)
    conv = FirDownConv(1, 1, TAPS).double()
    with torch.no_grad():
        conv.bias.zero_()
    w = conv.weight[0, 0].detach().numpy()
    blurred = convolve2d(x[0, 0].numpy(), _kernel(1.0), mode="full")[1:12 - 2, 1:12 - 2]  # pad (2, 2), valid
    # then a stride-2 cross-correlation with the 3x3 kernel, no padding
    expected = np.array([[np.sum(blurred[2 * i:2 * i + 3, 2 * j:2 * j + 3] * w) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(conv(x)[0, 0].detach().numpy(), expected, atol=1e-12)


def test_groupnorm_groups_and_epsilon_are_flax_ncsnpp():
    assert GroupNorm(256).groups == 32 and GroupNorm(16).groups == 4 and GroupNorm(24).groups == 6
    x = torch.full((1, 8, 2, 2), 3.0, dtype=torch.float64)  # group variance ~2e-7: epsilon 1e-6 dominates
    x[0, 0, 0, 0] = 3.0 + 1e-3
    gn = GroupNorm(8).double()
    mean = x[0, :4].mean()
    var = ((x[0, :4] - mean) ** 2).mean()
    expected = (x[0, 0, 0, 0] - mean) / torch.sqrt(var + 1e-6)
    assert torch.allclose(gn(x)[0, 0, 0, 0], expected, rtol=1e-9)  # eps 1e-5 would give 0.47 not 0.91


def test_state_dict_names_are_flax_paths_and_count_blocks_like_flax():
    module = build_architecture("ncsnpp", SMALL, "test")
    keys = list(module.state_dict())
    assert keys[:3] == ["GaussianFourierProjection_0.W", "Dense_0.kernel", "Dense_0.bias"]
    blocks = {k.split(".")[0] for k in keys if k.startswith("ResnetBlockBigGANpp_")}
    attn = {k.split(".")[0] for k in keys if k.startswith("AttnBlockpp_")}
    assert len(blocks) == 2 * 2 * 1 + 3 * 2 and len(attn) == 3  # L=2 levels, 1 block each, attention at 8 only
    assert "Downsample_0.Conv2d_0.weight" in keys and "Downsample_1.Conv2d_0.weight" not in keys
    assert "GaussianFourierProjection_0.W" not in dict(module.named_parameters())  # Flax stops its gradient
    out = module(torch.randn(2, 3, 16, 16), torch.tensor([-1.0, 0.5]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="16x16"):
        module(torch.randn(1, 3, 32, 32), torch.zeros(1))


def test_the_released_config_builds_the_56m_network_on_the_meta_device():
    module = build_architecture("ncsnpp", {}, "test", meta_device=True)
    # the Flax tree of configs/cifar10_ve_cd.py less the 128 Fourier frequencies (a buffer here)
    assert sum(p.numel() for p in module.parameters()) == 56_395_523
    assert module.state_dict()["Conv_1.kernel"].shape == (3, 256, 3, 3)  # nf * ch_mult[0] = 256 -> RGB


@pytest.mark.parametrize("change, message", [
    ({"progressive": "output_skip"}, "progressive"),
    ({"resblock_type": "ddpm"}, "resblock_type"),
    ({"fir": False}, "fir=False is not implemented"),
    ({"skip_rescale": False}, "skip_rescale=False is not implemented"),
    ({"nf": 10**6}, "nf"),
    ({"ch_mult": [2] * 20}, "ch_mult"),
    ({"image_size": 20, "ch_mult": [1, 2, 2, 2]}, "not divisible"),
    ({"nf": 18}, "GroupNorm groups"),
    ({"width": 8}, "unknown architecture config key"),
])
def test_unsupported_or_absurd_configs_are_one_error(change, message):
    with pytest.raises(InputError, match=message):
        build_architecture("ncsnpp", {**SMALL, **change}, "test", meta_device=True)
