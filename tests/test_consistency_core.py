"""The consistency function and time-step rule shared by certify and finetune (DESIGN.md section 1)."""
import pytest
import torch

from cpcluster.models.consistency import ConsistencyFunction, karras_grid, time_for_sigma
from cpcluster.models.purifier_base import LabelPolicy
from cpcluster.models.specs import load_denoiser


@pytest.mark.parametrize("steps, expected", [(18, (0.5853, 1.0882, 1.9233)), (40, (0.4700, 1.0717, 1.7672))])
def test_nearest_grid_time(steps, expected):
    got = [time_for_sigma(s, steps) for s in (0.25, 0.5, 1.0)]
    assert got == pytest.approx(expected, abs=5e-5)
    assert all(any(abs(g - k) < 1e-12 for k in karras_grid(steps)) for g in got)
    assert time_for_sigma(0.5, None, "exact") == 1.0


def test_boundary_condition_is_exact():
    net = load_denoiser("demo-random").module
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(ConsistencyFunction(net)(x, 0.002), x)
    assert not torch.allclose(ConsistencyFunction(net)(x, 1.0), x)


def test_label_policy_never_uses_true_label():
    gen = torch.Generator().manual_seed(0)
    assert LabelPolicy("fixed:3").labels(4, 10, "cpu").tolist() == [3, 3, 3, 3]
    assert LabelPolicy("random").labels(4, None, "cpu") is None
    a = LabelPolicy("random").labels(1000, 10, "cpu", gen)
    assert set(a.tolist()) == set(range(10))
