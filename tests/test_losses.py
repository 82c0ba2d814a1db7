"""cpcluster.core.losses: the LPIPS wrapper, the L1/L2 ablations, and the backbone-cache check (no downloads)."""
import os
import socket
import urllib.request

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cpcluster.core.losses import (BACKBONE_FILES, PerceptualLoss, PixelLoss, backbone_path, build_loss, build_lpips,
                                   check_backbone)
from cpcluster.util.errors import InputError

torch.set_num_threads(1)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache, and every way of reaching the network made to fail loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("something tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path / "torch"


def test_backbone_path_follows_torch_home(torch_home):
    for net, name in BACKBONE_FILES.items():
        assert backbone_path(net) == os.path.join(str(torch_home), "hub", "checkpoints", name)


def test_missing_backbone_names_file_and_folder(torch_home):
    with pytest.raises(InputError) as e:
        check_backbone("vgg")
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and os.path.join(str(torch_home), "hub", "checkpoints") in msg
    assert "\n" not in msg and "--lpips-random-backbone" in msg
    with pytest.raises(InputError, match="alexnet-owt-7be5be79.pth"):
        build_lpips("alex", random_backbone=False)


def test_random_backbone_is_seeded_and_downloads_nothing(torch_home):
    import lpips

    a, b, c = build_lpips("alex", True, seed=3), build_lpips("alex", True, seed=3), build_lpips("alex", True, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same on every rank and every rerun
    assert not torch.equal(sa["net.slice1.0.weight"], sc["net.slice1.0.weight"])
    # the linear layers are the package's calibrated v0.1 weights, not random
    shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth"),
                         map_location="cpu", weights_only=True)
    assert all(torch.equal(sa[k], v) for k, v in shipped.items())
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    assert not os.path.exists(torch_home)  # nothing was cached either


def test_cached_backbone_loads_torchvision_features(torch_home):
    """A torchvision-format AlexNet file in the cache is what the LPIPS trunk computes with."""
    import torchvision

    torch.manual_seed(123)  # not the random-backbone seed (0): build_lpips(seed=0) draws the same init as seed 0
    reference = torchvision.models.alexnet(weights=None).eval()
    path = backbone_path("alex")
    os.makedirs(os.path.dirname(path))
    torch.save({f"features.{k}": v for k, v in reference.features.state_dict().items()}, path)
    model = build_lpips("alex", random_backbone=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # lpips's AlexNet trunk = torchvision features[0:12] (relu5, before the last max-pool)
        assert torch.allclose(model.net(x).relu5, reference.features[:12](x), atol=1e-5)
        random = build_lpips("alex", random_backbone=True)
        a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
        assert not torch.allclose(model(a, b), random(a, b))


def test_cached_backbone_of_the_wrong_network_is_refused(torch_home):
    path = backbone_path("alex")
    os.makedirs(os.path.dirname(path))
    torch.save({"features.0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(InputError, match="alexnet-owt-7be5be79.pth.*no tensor features.0.weight"):
        build_lpips("alex", random_backbone=False)


@pytest.fixture(scope="module")
def alex():
    return build_lpips("alex", True, seed=0)


def test_perceptual_loss_grey_images_and_resize(alex):
    loss = PerceptualLoss(alex, resize=40)
    a, b = torch.rand(3, 1, 16, 16) * 2 - 1, torch.rand(3, 1, 16, 16) * 2 - 1
    out = loss(a, b)
    assert out.shape == (3,)
    up = [F.interpolate(t.repeat(1, 3, 1, 1), size=(40, 40), mode="bilinear", align_corners=False) for t in (a, b)]
    assert torch.allclose(out, alex(*up).flatten(), atol=1e-6)  # repeated to 3 channels, then resized
    a64, b64 = torch.rand(3, 1, 64, 64) * 2 - 1, torch.rand(3, 1, 64, 64) * 2 - 1  # AlexNet needs >= ~32 px
    native = PerceptualLoss(alex, resize=0)(a64, b64)
    assert torch.allclose(native, alex(a64.repeat(1, 3, 1, 1), b64.repeat(1, 3, 1, 1)).flatten(), atol=1e-6)
    assert torch.allclose(loss(a, a), torch.zeros(3), atol=1e-7)


def test_perceptual_loss_is_per_image_so_batch_splits_agree(alex):
    loss = PerceptualLoss(alex, resize=32)
    a, b = torch.rand(6, 3, 16, 16) * 2 - 1, torch.rand(6, 3, 16, 16) * 2 - 1
    whole = loss(a, b)
    halves = torch.cat([loss(a[:3], b[:3]), loss(a[3:], b[3:])])
    assert torch.allclose(whole, halves, atol=1e-6)
    assert torch.allclose(whole, loss(b, a), atol=1e-6)  # LPIPS is symmetric
    assert (whole > 0).all()


def test_gradient_reaches_the_image_not_lpips(alex):
    loss = PerceptualLoss(alex, resize=32)
    a = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_(True)
    loss(a, torch.zeros(2, 1, 16, 16)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in alex.parameters())


def test_pixel_losses_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3, 5, 5)), rng.normal(size=(4, 3, 5, 5))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_allclose(PixelLoss("l2")(ta, tb).numpy(), ((a - b) ** 2).reshape(4, -1).mean(1))
    np.testing.assert_allclose(PixelLoss("l1")(ta, tb).numpy(), np.abs(a - b).reshape(4, -1).mean(1))
    with pytest.raises(InputError):
        PixelLoss("l3")


def test_build_loss_kinds(torch_home):
    assert isinstance(build_loss("l2"), PixelLoss) and isinstance(build_loss("l1"), PixelLoss)
    lp = build_loss("lpips", "alex", resize=24, random_backbone=True)
    assert isinstance(lp, PerceptualLoss) and lp.resize == 24
