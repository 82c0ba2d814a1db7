"""``onestep-edm``: one evaluation of an EDM denoiser at t = 2 sigma; equals pf-ode with one step."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.convert import run_conversion
from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.purifier_base import LabelPolicy
from cpcluster.models.purifiers import PURIFIERS, build_purifier
from cpcluster.models.specs import load_denoiser
from cpcluster.util.errors import InputError
from edm_files import write_edm_pickle
from test_purifiers import GaussianDenoiser

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def edm_net(tmp_path_factory):
    """The conditional DDPM++ reference case converted from a stand-in EDM pickle: ``net:`` spec."""
    folder = tmp_path_factory.mktemp("edm")
    run_conversion("edm-pickle", write_edm_pickle(str(folder / "n.pkl"), "ddpmpp-cond"), str(folder / "net"))
    return f"net:{folder / 'net'}"


def test_one_evaluation_at_twice_sigma_equals_pf_ode_one_step(edm_net):
    den = load_denoiser(edm_net)
    calls = []
    hook = den.module.register_forward_pre_hook(lambda m, args: calls.append([a.clone() for a in args]))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=gen) + 0.5 * torch.randn(4, 3, 8, 8, generator=gen)
    try:
        for policy in ("fixed:3", "random"):
            one = build_purifier("onestep-edm", den, 0.5, time_rule="exact", label_policy=LabelPolicy(policy))
            calls.clear()
            with torch.no_grad():
                out = one(x, torch.Generator().manual_seed(1))
            assert len(calls) == 1  # exactly one network evaluation
            x_t, sigma, labels = calls[0]
            torch.testing.assert_close(x_t, 2 * x - 1, rtol=0, atol=0)
            assert torch.equal(sigma, torch.full((4,), 1.0))  # t = 2 sigma, model space
            with torch.no_grad():
                direct = ((den.module(x_t, sigma, labels) + 1) / 2).clamp(0, 1)
            torch.testing.assert_close(out, direct, rtol=0, atol=0)
            assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
            for solver in ("heun", "euler"):
                ode = build_purifier("pf-ode", den, 0.5, steps=1, time_rule="exact", solver=solver,
                                     label_policy=LabelPolicy(policy))
                calls.clear()
                with torch.no_grad():
                    via_ode = ode(x, torch.Generator().manual_seed(1))
                assert len(calls) == 1 and torch.equal(calls[0][2], labels)
                torch.testing.assert_close(via_ode, out, rtol=0, atol=1e-6)
    finally:
        hook.remove()
    assert one.describe() == {"kind": "onestep-edm", "t_sigma": 1.0, "time_rule": "exact", "preconditioned": True,
                              "label_policy": "random"}


@pytest.mark.parametrize("preconditioned", [True, False])
def test_gaussian_data_gives_the_posterior_mean(preconditioned):
    """For x0 ~ N(m, s^2) the exact denoiser is m + s^2/(s^2 + t^2) (x_t - m); the purifier must return it."""
    m, s = 0.1, 0.3
    den = LoadedDenoiser(GaussianDenoiser(m, s, preconditioned), "edm",
                         {"c_noise": "edm", "preconditioned": preconditioned, "num_classes": None})
    x = 0.5 + 0.4 * torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (0.25, 0.5, 1.0):
        t = 2 * sigma
        expected = ((m + s**2 / (s**2 + t**2) * (2 * x - 1 - m)) + 1) / 2
        out = build_purifier("onestep-edm", den, sigma, time_rule="exact")(x)
        torch.testing.assert_close(out, expected.clamp(0, 1), rtol=0, atol=1e-8)  # c_noise goes via float32


def test_time_rules_and_refusals(edm_net):
    den = load_denoiser(edm_net)
    with pytest.raises(InputError, match="--time-rule exact"):
        build_purifier("onestep-edm", den, 0.25)  # continuous-time network: no grid for "nearest"
    gridded = load_denoiser(edm_net + "?grid_steps=18")
    assert build_purifier("onestep-edm", gridded, 0.25).describe()["t_sigma"] == pytest.approx(0.5853, abs=1e-4)
    assert build_purifier("onestep-edm", gridded, 0.25, time_rule="exact").t == 0.5
    with pytest.raises(InputError, match="--purifier pf-ode"):
        build_purifier("onestep-edm", den, 0.25, time_rule="exact", steps=4)
    assert build_purifier("onestep-edm", den, 0.25, time_rule="exact", steps=1).t == 0.5
    for kind, fix in (("consistency", "--purifier consistency"), ("ddpm", "--purifier onestep-ddpm")):
        other = LoadedDenoiser(den.module, kind, {"num_classes": 10}, spec="x")
        with pytest.raises(InputError, match=fix):
            build_purifier("onestep-edm", other, 0.25, time_rule="exact")


def test_purifier_lists_agree():
    assert "onestep-edm" in PURIFIERS
    for command in ("certify", "inspect"):
        result = CliRunner().invoke(main, [command, "--purifier", "onestep-edmx"])
        assert result.exit_code == 2 and "onestep-edm" in result.output  # the choices offered name it
