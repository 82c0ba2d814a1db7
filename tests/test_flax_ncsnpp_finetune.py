"""The jcm stand-in through the fine-tuning route: convert -> finetune (2 DDP ranks) -> certify the export ->
aggregate, with CIFAR-10 binary batches in the official layout (random images) and a random timm ResNet-18.

Uses tests/routes.py, which comes with fine-tuning of network folders on main: skipped until that is merged.
"""
import json
import os

import numpy as np
import pytest
import torch

from cpcluster.core.shards import read_shard
from cpcluster.models.specs import load_denoiser

routes = pytest.importorskip("routes", reason="the fine-tuning route helpers (tests/routes.py) are on main")

torch.set_num_threads(1)
CHECKPOINT = os.path.join(os.path.dirname(__file__), "data", "flax_ncsnpp", "checkpoint_80")
CLASSIFIER = "timm:resnet18?num_classes=10&mean=cifar10&quantize=uint8"


@pytest.mark.slow
def test_converted_jcm_network_finetunes_and_certifies(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "cifar" / "cifar-10-batches-bin")
    for name, count in [("test_batch", 4)] + [(f"data_batch_{i}", 4) for i in range(1, 6)]:
        x = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, 10, (count, 1), dtype=np.uint8)
        folder = tmp_path / "cifar" / "cifar-10-batches-bin"
        (folder / f"{name}.bin").write_bytes(np.concatenate([y, x], 1).tobytes())
    net = str(tmp_path / "cd")
    routes.cli("convert", "flax-ncsnpp", CHECKPOINT, net)
    data = f"cifar10:{tmp_path / 'cifar'}"
    out = str(tmp_path / "ft")
    output, digests = routes.finetune_two_ranks(f"net:{net}", out, data=data + "?split=train", eval_data=data)
    assert len(digests) == 2 and digests[0] == digests[1], output
    base, tuned = load_denoiser(f"net:{net}"), load_denoiser(f"finetuned:{out}/final")
    assert routes.states_differ(base.module.state_dict(), tuned.module.state_dict())
    assert torch.equal(base.module.state_dict()["GaussianFourierProjection_0.W"],
                       tuned.module.state_dict()["GaussianFourierProjection_0.W"])  # Flax never trains W
    record = json.loads(open(os.path.join(out, "final", "cpcluster.json")).read())
    assert record["architecture"] == "ncsnpp" and tuned.meta["c_noise"] == "jax" and tuned.meta["grid_steps"] == 18
    os.rename(net, net + ".moved")  # the export is self-contained
    summary = routes.certify_and_aggregate(f"finetuned:{out}/final", str(tmp_path / "results"), "tuned",
                                           dataset=data, classifier=CLASSIFIER)
    (group,) = summary["groups"]
    assert group["images_evaluated"] == 3 and group["sigma"] == 0.5
    shard = next(p for p in os.listdir(tmp_path / "results" / "tuned") if p.endswith(".h5"))
    config = read_shard(str(tmp_path / "results" / "tuned" / shard)).config
    assert config["purifier"]["t_sigma"] == pytest.approx(1.0882, abs=5e-5)
    assert config["denoiser"]["sha256"] == record["weights"]["sha256"]
