"""Architecture ``edm-precond``: cpcluster's own EDM networks against NVlabs/edm's outputs (tests/data/edm)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpcluster.models.archs import assign_state, build_architecture
from cpcluster.models.archs.edm_layers import UNetBlock
from cpcluster.util.errors import InputError
from edm_files import CASES, load_case

# |ours - EDM's| <= ATOL * max(1, max |EDM's output| of that sample): float32, different summation orders.
ATOL = 1e-5


def case_config(record: dict) -> dict:
    """The architecture config written by hand from the recorded constructor arguments (not by the converter)."""
    root, inner = record["tree"][0], record["tree"][1]
    common = ("img_resolution", "img_channels", "label_dim", "use_fp16")
    return {"precond": record["precond"], "precond_kwargs": {k: root["init_kwargs"][k] for k in common
                                                             if k in root["init_kwargs"]},
            "model_type": inner["class"], "model_kwargs": inner["init_kwargs"]}


def assert_matches(out: np.ndarray, ref: np.ndarray) -> None:
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_edm(name):
    record, state, arrays = load_case(name)
    module = assign_state(build_architecture("edm-precond", case_config(record), name, meta_device=True), state,
                          name).eval()
    x, sigma = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["sigma"])
    conditional = "out_nolabel" in arrays
    labels = torch.from_numpy(arrays["labels"]) if conditional else None
    with torch.no_grad():
        out = module(x, sigma, labels).numpy()
        assert_matches(out, arrays["out"])
        if conditional:  # int labels -> one-hot inside; a float one-hot and no labels (EDM feeds zeros) as well
            one_hot = torch.nn.functional.one_hot(labels, record["tree"][0]["init_kwargs"]["label_dim"]).float()
            np.testing.assert_array_equal(module(x, sigma, one_hot).numpy(), out)
            assert_matches(module(x, sigma, None).numpy(), arrays["out_nolabel"])
            assert not np.allclose(arrays["out"], arrays["out_nolabel"], atol=1e-3)  # the labels matter
    # every tensor matters: perturbing any one of the weights changes the output
    with torch.no_grad():
        first = module.model.enc[next(iter(module.model.enc))].weight
        first.add_(0.1)
        assert not np.allclose(module(x, sigma, labels).numpy(), out, atol=1e-4)


def test_multi_head_attention_layout():
    """EDM's qkv channels are grouped per head as (channel, q/k/v); checked against an explicit computation."""
    torch.manual_seed(0)
    block = UNetBlock(96, 96, 16, attention=True, channels_per_head=32).eval()  # 3 heads
    qkv = torch.randn(2, 3 * 96, 4, 5)
    heads, c = 3, 32
    expected = torch.empty(2, 96, 20)
    grouped = qkv.reshape(2, heads, c, 3, 20)
    for h in range(heads):
        q, k, v = grouped[:, h, :, 0], grouped[:, h, :, 1], grouped[:, h, :, 2]  # (B, c, HW)
        w = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / c**0.5, dim=2)
        expected[:, h * c:(h + 1) * c] = torch.einsum("bqk,bck->bcq", w, v)
    assert block.num_heads == 3
    torch.testing.assert_close(block._attend(qkv), expected.reshape(2, 96, 4, 5), rtol=1e-5, atol=1e-5)


def _config(**model):
    base = {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "model_channels": 8, "channel_mult": [1, 2],
            "num_blocks": 1, "attn_resolutions": [4]}
    return {"precond": "EDMPrecond", "precond_kwargs": {"img_resolution": 8, "img_channels": 3},
            "model_type": "SongUNet", "model_kwargs": {**base, **model}}


@pytest.mark.parametrize("change, message", [
    ({"model_channels": 4096, "channel_mult": [1, 4]}, "at most 8192 channels"),
    ({"model_channels": 2048, "channel_mult": [1, 2, 2], "num_blocks": 32, "img_resolution": 64}, "parameters"),
    ({"in_channels": 1}, "in_channels=1"),
    ({"img_resolution": 6, "channel_mult": [1, 2, 2]}, "cannot be halved"),
    ({"model_channels": 34}, "GroupNorm over 34 channels"),
    ({"model_channels": 9}, "even noise embedding"),
    ({"encoder_type": "fancy"}, "encoder_type"),
    ({"depth": 3}, "unknown architecture config key"),
])
def test_implausible_configs_are_refused_before_building(change, message):
    config = _config(**change)
    if "img_resolution" in change:
        config["precond_kwargs"]["img_resolution"] = change["img_resolution"]
    with pytest.raises(InputError, match=message):
        build_architecture("edm-precond", config, "test")


def test_iddpm_levels_and_vp_scalings_follow_their_formulas():
    """iDDPM's u table (built here, float64) is EDM's recursion; VP's c_noise inverts its sigma(t)."""
    from cpcluster.models.archs.edm_precond import VPPrecond, iDDPMPrecond

    record, state, _ = load_case("iddpm-adm")
    module = build_architecture("edm-precond", case_config(record), "test")
    torch.testing.assert_close(module.u, state["u"], rtol=1e-3, atol=1e-5)  # EDM: float32 recursion
    vp = VPPrecond(torch.nn.Identity(), 3, 0)
    t = torch.tensor([0.01, 0.3, 1.0]).reshape(-1, 1, 1, 1)
    sigma = ((0.5 * vp.beta_d * t**2 + vp.beta_min * t).exp() - 1).sqrt()
    torch.testing.assert_close(vp.scalings(sigma)[3], (vp.M - 1) * t, rtol=1e-4, atol=1e-4)
    assert isinstance(module, iDDPMPrecond) and module.out_factor == 2
