"""FID and the transport distance (numpy, aggregate/quality.py) against independent references, and the Inception
feature extractor (cpcluster/core/fid.py) on a random-weight stand-in saved in the released file format."""
import numpy as np
import pytest
import torch

from cpcluster.aggregate.quality import fid, transport_w2
from cpcluster.core import fid as fidmod
from cpcluster.util.errors import InputError

torch.set_num_threads(1)


# -------------------------------------------------------------------------------------------------------- FID
@pytest.mark.parametrize("n, d", [(12, 40), (300, 16)])  # fewer images than dimensions, and more
def test_fid_matches_torch_fidelity_and_is_zero_for_a_set_against_itself(n, d):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 0.7 * rng.normal(size=(n + 3, d)) @ rng.normal(size=(d, d)) + 0.5
    stats = lambda f: {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}  # noqa: E731
    reference = fid_statistics_to_metric(stats(a), stats(b), False)["frechet_inception_distance"]
    assert fid(a, b) == pytest.approx(reference, rel=1e-6)
    assert fid(b, a) == pytest.approx(fid(a, b), rel=1e-9)
    assert abs(fid(a, a)) < 1e-8 * np.sum(a.var(0))


def test_fid_refuses_too_few_images_and_other_dimensions():
    with pytest.raises(InputError, match="at least 2 images"):
        fid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(InputError, match="feature dimensions differ"):
        fid(np.ones((3, 4)) * np.arange(3)[:, None], np.ones((3, 5)) * np.arange(3)[:, None])


# -------------------------------------------------------------------------------------------------- transport
def test_transport_is_the_exact_w2_of_pot_and_zero_for_identical_sets():
    import ot

    rng = np.random.default_rng(1)
    a, b = rng.random((40, 1, 4, 4)), rng.random((40, 1, 4, 4))
    cost = ot.dist(a.reshape(40, -1), b.reshape(40, -1), metric="sqeuclidean")
    reference = np.sqrt(ot.emd2(np.full(40, 1 / 40), np.full(40, 1 / 40), cost, numItermax=10**7))
    assert transport_w2(a, b) == pytest.approx(reference, rel=1e-9)
    assert transport_w2(a, a) == 0.0
    assert transport_w2(a, a[rng.permutation(40)]) == 0.0  # a distance between sets: order does not matter
    paired = np.sqrt(((a - b) ** 2).reshape(40, -1).sum(1).mean())
    assert transport_w2(a, b) <= paired  # the identity coupling is one candidate


def test_transport_refuses_empty_and_mismatched_sets():
    with pytest.raises(InputError, match="empty"):
        transport_w2(np.zeros((0, 1, 4, 4)), np.zeros((0, 1, 4, 4)))
    with pytest.raises(InputError, match="same size"):
        transport_w2(np.zeros((3, 1, 4, 4)), np.zeros((3, 1, 8, 8)))


# ------------------------------------------------------------------------------------------ Inception features
@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """torch-fidelity's file format: torch.save of the InceptionV3 state_dict (random weights, real key names)."""
    path = tmp_path_factory.mktemp("inception") / fidmod.INCEPTION_FILE
    torch.save(fidmod.random_state(seed=3), path)
    return path, fidmod.load_inception(str(path))


def test_the_file_loads_strictly_and_bad_files_are_refused(tmp_path, standin, monkeypatch):
    path, model = standin
    expected = fidmod.random_state(3)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(InputError, match=f"{tmp_path / 'th' / 'hub' / 'checkpoints' / fidmod.INCEPTION_FILE} is not"):
        fidmod.check_inception(None)
    state = dict(expected)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(InputError, match="no tensor Mixed_7c.branch_pool.conv.weight"):
        fidmod.load_inception(str(tmp_path / "cut.pth"))
    torch.save({"x": np.zeros(3)}, tmp_path / "pickle.pth")  # needs numpy globals: refused by weights_only
    with pytest.raises(InputError, match="weights_only=True"):
        fidmod.load_inception(str(tmp_path / "pickle.pth"))


def test_fid_of_purification_like_noise_grows_and_a_set_against_itself_is_zero(standin):
    from cpcluster.models.specs import load_dataset

    _, model = standin
    x = torch.from_numpy(load_dataset("demo").get(np.arange(0, 120, 10))[0])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    clean = fidmod.features(model, x)
    assert clean.shape == (12, 2048) and clean.dtype == torch.float64
    values = [fid(clean.numpy(), fidmod.features(model, x + s * noise).numpy()) for s in (0.05, 0.2, 0.5)]
    assert abs(fid(clean.numpy(), clean.numpy())) < 1e-9 * values[0]
    assert 0 < values[0] < values[1] < values[2], values
    with pytest.raises(InputError, match="1 or 3"):
        fidmod.features(model, torch.zeros(2, 2, 8, 8))
