"""Architecture openai-unet and converter openai-unet against what upstream code computed (tests/data/openai_unet).

The stand-ins are improved-diffusion / consistency_models UNets at small width with random weights, saved and run by
upstream (scripts/dev/make_openai_unet_reference.py). Everything is float32; the tolerance is 2e-5 absolute on
outputs of size ~1-5 (the differences are summation order: upstream's einsum attention vs
scaled_dot_product_attention, observed ~1e-6).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from cpcluster.convert.openai_unet import PRESETS, preset_config
from cpcluster.convert.openai_unet_shapes import infer_config
from cpcluster.models.archs import build_architecture
from cpcluster.models.consistency import C_NOISE, ConsistencyFunction
from cpcluster.models.ddpm import OneStepDDPMPurifier
from cpcluster.models.pfode import DDPMDenoiser, EDMDenoiser, PFODEPurifier, edm_scalings
from cpcluster.models.purifier_base import ConsistencyPurifier, LabelPolicy
from cpcluster.models.weights import load_state_dict
from openai_unet_files import STANDINS, convert_standin, preset_layouts, reference, write_pt

torch.set_num_threads(1)
TOL = dict(rtol=0, atol=2e-5)


def _t(array):
    return torch.from_numpy(np.asarray(array))


def _labels(ref):
    return _t(ref["labels"]) if "labels" in ref else None


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """name -> LoadedDenoiser of every stand-in converted under its preset, plus ``cd``: the cm one as the CD model."""
    from cpcluster.models.specs import load_denoiser

    root = tmp_path_factory.mktemp("openai")
    specs = {name: convert_standin(name, root) for name in STANDINS}
    specs["cd"] = convert_standin("cm", root, preset="cd_imagenet64_lpips")
    return {name: load_denoiser(spec) for name, spec in specs.items()}


@pytest.mark.parametrize("name", ["id_uncond", "id_cond"])
def test_improved_diffusion_forward_matches_upstream_with_its_time_input(nets, name):
    ref, den = reference(name), nets[name]
    scale = 0.25 if name == "id_uncond" else 1.0  # rescale_timesteps: 1000 / T with T = 4000
    assert den.module.time_input_scale == scale
    with torch.no_grad():  # the purifiers pass the integer timestep; the network scales it itself
        out = den.module(_t(ref["x"]), _t(ref["timesteps"]), _labels(ref))
    assert out.shape == (2, 3, 16, 16)  # learned sigma: the variance half of upstream's 6 channels is cut
    torch.testing.assert_close(out, _t(ref["out"][:, :3]), **TOL)
    assert not torch.allclose(out, _t(ref["out"][:, 3:]), atol=1e-2)


def test_consistency_models_forward_matches_upstream(nets):
    ref, den = reference("cm"), nets["cm"]
    sigma = _t(ref["sigmas"])
    c_in = edm_scalings(sigma)[2].view(-1, 1, 1, 1)
    with torch.no_grad():  # KarrasDenoiser.denoise feeds F(c_in x, 1000 * 0.25 ln sigma, y)
        out = den.module(c_in * _t(ref["x"]), C_NOISE["openai"](sigma), _labels(ref))
    torch.testing.assert_close(out, _t(ref["out"]), **TOL)
    # upstream without flash attention runs QKVAttentionLegacy in float16: same layout, float16 rounding only
    torch.testing.assert_close(out, _t(ref["out_fp16_attention"]), rtol=0, atol=5e-3)
    with torch.no_grad():
        wrong = den.module(c_in * _t(ref["x"]), C_NOISE["openai"](sigma), (_labels(ref) + 1) % 10)
    assert (wrong - out).abs().max() > 1e-2  # the label reaches the network


@pytest.mark.parametrize("name", ["id_uncond", "id_cond"])
def test_onestep_ddpm_matches_upstream_pred_xstart(nets, name):
    """Carlini et al.'s purifier = upstream p_mean_variance's pred_xstart at the first t reaching 2 sigma."""
    ref, den = reference(name), nets[name]
    for i, sigma in enumerate(ref["sigmas_pixel"]):
        label = int(ref["labels"][i]) if "labels" in ref else 0
        purifier = OneStepDDPMPurifier(den, sigma, label_policy=LabelPolicy(f"fixed:{label}"))
        assert purifier.t == ref["timesteps"][i]
        assert purifier.abar_t == pytest.approx(ref["alphas_cumprod"][purifier.t], rel=1e-12)
        x_noisy = (_t(ref["x"][i:i + 1]) / np.sqrt(purifier.abar_t) + 1) / 2  # pixel space, x_t = sqrt(abar) (2x-1)
        with torch.no_grad():
            out = purifier(x_noisy)
        expected = (_t(ref["pred_xstart"][i:i + 1]).clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["id_uncond", "id_cond"])
def test_onestep_ddpm_exact_rule_runs_carlinis_code(nets, name):
    """--time-rule exact: the input scaled to model-space noise exactly 2 sigma, the network at Carlini et al.'s
    rounded timestep (1984 at sigma 0.5, where the reference has upstream's pred_xstart), x0 from that step's abar."""
    ref, den = reference(name), nets[name]
    i = [float(s) for s in ref["sigmas_pixel"]].index(0.5)
    label = int(ref["labels"][i]) if "labels" in ref else 0
    purifier = OneStepDDPMPurifier(den, 0.5, time_rule="exact", label_policy=LabelPolicy(f"fixed:{label}"))
    assert purifier.t == ref["timesteps"][i] and purifier.scale == pytest.approx(1 / np.sqrt(2.0), rel=1e-15)
    assert purifier.scale != pytest.approx(np.sqrt(purifier.abar_t), rel=1e-6)  # not the step's own marginal
    x_noisy = (_t(ref["x"][i:i + 1]) / purifier.scale + 1) / 2  # so that the purifier's x_t is upstream's
    with torch.no_grad():
        out = purifier(x_noisy)
    expected = (_t(ref["pred_xstart"][i:i + 1]).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


def test_pf_ode_on_an_improved_diffusion_network_gets_the_rescaled_time(nets):
    """pf-ode reads a DDPM network as D(x, sigma_j); at the reference timesteps D equals upstream's pred_xstart."""
    ref, den = reference("id_uncond"), nets["id_uncond"]
    D = DDPMDenoiser(den)
    for i, t in enumerate(ref["timesteps"]):
        sigma_j = float(D.sigmas[t])
        assert D.index(sigma_j) == t
        x = _t(ref["x"][i:i + 1]) / np.sqrt(D.abar[t])  # variance-exploding x = x_t / sqrt(abar)
        with torch.no_grad():
            torch.testing.assert_close(D(x, sigma_j, None), _t(ref["pred_xstart"][i:i + 1]), rtol=0, atol=2e-5)
    one = PFODEPurifier(den, float(ref["sigmas_pixel"][1]), steps=1)
    assert one.times[0] == pytest.approx(float(D.sigmas[ref["timesteps"][1]]))


def test_edm_teacher_and_cd_model_match_upstream_karras_denoiser(nets):
    """EDM preconditioning (pf-ode's D) and the consistency function equal KarrasDenoiser.denoise, also as purifiers."""
    ref = reference("cm")
    x, labels = _t(ref["x"]), _labels(ref)
    edm, cd = EDMDenoiser(nets["cm"]), ConsistencyFunction(nets["cd"].module, nets["cd"].meta["c_noise"])
    assert nets["cm"].kind == "edm" and nets["cd"].kind == "consistency" and nets["cd"].meta["grid_steps"] == 40
    with torch.no_grad():
        torch.testing.assert_close(cd(x, _t(ref["sigmas"]), labels), _t(ref["denoised_cm"]), **TOL)
        for i, sigma in enumerate(ref["sigmas"].tolist()):
            row = slice(i, i + 1)
            torch.testing.assert_close(edm(x[row], sigma, labels[row]), _t(ref["denoised_edm"][row]), **TOL)
            # one-step purifiers at t = 2 sigma_pixel = sigma (--time exact), pixel space in and out
            policy = LabelPolicy(f"fixed:{int(labels[i])}")
            x_noisy = (x[row] + 1) / 2
            pf = PFODEPurifier(nets["cm"], sigma / 2, steps=1, time_rule="exact", label_policy=policy)
            cp = ConsistencyPurifier(nets["cd"], sigma / 2, time_rule="exact", label_policy=policy)
            for purifier, key in ((pf, "denoised_edm"), (cp, "denoised_cm")):
                expected = ((_t(ref[key][row]) + 1) / 2).clamp(0, 1)
                torch.testing.assert_close(purifier(x_noisy), expected, **TOL)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_the_released_networks_tensor_for_tensor(preset):
    """Each preset's network has exactly the keys and shapes of upstream's network built from the README flags."""
    layout = preset_layouts()[preset]
    _, config, meta, _ = preset_config({"preset": preset}, "test")
    module = build_architecture("openai-unet", config, "test", meta_device=True)
    state = module.state_dict()
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
    assert (len(state), sum(p.numel() for p in module.parameters())) == (layout["tensors"], layout["parameters"])
    assert hashlib.sha256(lines.encode()).hexdigest() == layout["layout_sha256"]
    if "timesteps" in layout:  # improved-diffusion: the time input its GaussianDiffusion feeds the network
        assert meta["timesteps"] == layout["timesteps"] and meta["kind"] == "ddpm"
        assert config["time_input_scale"] == (1000 / layout["timesteps"] if layout["rescale_timesteps"] else 1.0)
    inferred = infer_config(state)
    assert {k: config[k] for k in inferred} == {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in inferred.items()}
    assert set(inferred) >= {"model_channels", "channel_mult", "num_res_blocks", "num_classes", "out_channels",
                             "attention_resolutions", "use_scale_shift_norm", "resblock_updown"}


@pytest.mark.parametrize("name", sorted(STANDINS))
def test_shapes_of_the_upstream_files_say_their_architecture(tmp_path, name):
    state, _ = load_state_dict(write_pt(name, tmp_path))
    got = infer_config(state)
    expected = dict(model_channels=32, num_res_blocks=1, channel_mult=[1, 1], in_channels=3,
                    out_channels=3 if name == "cm" else 6, num_classes=None if name == "id_uncond" else 10,
                    attention_resolutions=[1, 2] if name == "cm" else [2], use_scale_shift_norm=name != "id_cond",
                    resblock_updown=name == "cm", attention_conv_dims=2 if name == "cm" else 1)
    assert got == expected


SMALL_CONFIG = dict(model_channels=32, channel_mult=[1, 1], num_res_blocks=1, attention_resolutions=[2])


@pytest.mark.parametrize("change, message", [
    (dict(model_channels=10**6), "model_channels=1000000"),
    (dict(model_channels=48, channel_mult=[1, 3]), "multiple of 32"),
    (dict(attention_resolutions=[3]), "downsample rates"),
    (dict(attention_resolutions=[4]), "downsample rates"),  # two levels reach rate 2 only
    (dict(num_heads=3), "does not split into 3 heads"),
    (dict(num_head_channels=24), "heads of 24 channels"),
    (dict(num_head_channels=0), "-1 or positive"),
    (dict(time_input_scale=0), "time_input_scale"),
    (dict(use_scale_shift_norm="yes"), "expected true or false"),
    (dict(width=32), "unknown architecture config key"),
    (dict(model_channels=4096, channel_mult=[2] * 8, num_res_blocks=32), "parameters (limit"),
])
def test_config_is_checked_before_anything_is_built(change, message):
    from cpcluster.util.errors import InputError

    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        build_architecture("openai-unet", {**SMALL_CONFIG, **change}, "test")


def test_time_input_labels_and_float32_group_norm():
    from cpcluster.models.archs.openai_unet_blocks import GroupNorm32

    torch.manual_seed(0)
    net = build_architecture("openai-unet", {**SMALL_CONFIG, "num_classes": 5, "time_input_scale": 0.5}, "t").eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        full = net(x, torch.full((3,), 40.0), torch.tensor([1, 1, 1]))
        torch.testing.assert_close(net(x, torch.tensor(40.0), torch.tensor([1, 1, 1])), full)  # a scalar time
        net.time_input_scale = 1.0
        torch.testing.assert_close(net(x, torch.full((3,), 20.0), torch.tensor([1, 1, 1])), full)
        with pytest.raises(ValueError, match="class-conditional"):
            net(x, torch.full((3,), 20.0), None)
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_()
        h = (torch.randn(2, 64, 4, 4) * 50 + 300).to(torch.bfloat16)
        out = norm(h)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.group_norm(h.float(), 32, norm.weight, norm.bias).to(torch.bfloat16)
    assert torch.equal(out, expected)
