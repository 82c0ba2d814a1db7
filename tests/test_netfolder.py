"""Network folders (net:DIR): round trip of registered architectures, sha256 and fit checks, bounded configs."""
from __future__ import annotations

import json
import os

import pytest
import torch

from cpcluster.models.netfolder import META_FILE, WEIGHTS_FILE, encode_network, write_network_folder
from cpcluster.models.specs import load_denoiser
from cpcluster.util.errors import InputError
from unet_files import CM_SCHEDULER, save_unet


def _forward(den, x, t=1.0):
    with torch.no_grad():
        return den.module(x, torch.full((x.shape[0],), t), None)


def _export(den, folder):
    raw, record = encode_network(den.module.state_dict(), den.architecture["name"], den.architecture["config"],
                                 {"kind": den.kind, **{k: den.meta.get(k) for k in ("c_noise", "grid_steps",
                                                                                    "num_classes")}},
                                 {"file": den.spec})
    write_network_folder(str(folder), raw, record)
    return record


@pytest.mark.parametrize("make", ["demo", "diffusers"])
def test_round_trip_gives_the_same_network(tmp_path, make):
    if make == "demo":
        den = load_denoiser("demo-random")
        x = torch.randn(2, 1, 16, 16)
    else:
        den = load_denoiser("diffusers:" + save_unet(str(tmp_path / "unet"), scheduler=CM_SCHEDULER))
        x = torch.randn(2, 3, 16, 16)
    record = _export(den, tmp_path / "net")
    back = load_denoiser(f"net:{tmp_path / 'net'}")
    assert back.kind == "consistency" and back.sha256 == record["weights"]["sha256"]
    assert back.meta["grid_steps"] == den.meta["grid_steps"]
    assert back.architecture == den.architecture
    assert torch.equal(_forward(back, x), _forward(den, x))
    assert back.meta["in_channels"] == x.shape[1]
    assert not any(p.requires_grad for p in back.module.parameters())
    # spec options override the recorded metadata
    assert load_denoiser(f"net:{tmp_path / 'net'}?grid_steps=40").meta["grid_steps"] == 40


def test_altered_weights_and_records_are_refused(tmp_path):
    den = load_denoiser("demo-random")
    _export(den, tmp_path / "net")
    weights, meta = tmp_path / "net" / WEIGHTS_FILE, tmp_path / "net" / META_FILE
    record = json.loads(meta.read_text())
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(InputError, match="sha256"):
        load_denoiser(f"net:{tmp_path / 'net'}")
    weights.write_bytes(good)
    for key, value, message in [("architecture", "python:os:system", "unknown architecture"),
                                ("format", "other", "not a cpcluster network folder"),
                                ("arch_config", {"width": 10**9}, "width"),
                                ("arch_config", {"width": 32, "depth": 3}, "unknown architecture config key")]:
        meta.write_text(json.dumps({**record, key: value}))
        with pytest.raises(InputError, match=message):
            load_denoiser(f"net:{tmp_path / 'net'}")
    meta.write_text("[" * 100_000)
    with pytest.raises(InputError, match="not valid JSON"):
        load_denoiser(f"net:{tmp_path / 'net'}")


def test_tensors_that_do_not_fit_name_the_first_one(tmp_path):
    den = load_denoiser("demo-random")
    state = dict(den.module.state_dict())
    first = next(iter(state))
    bad = {**state, first: torch.zeros(3)}
    with pytest.raises(InputError, match=f"tensor '{first}' has shape \\(3,\\)"):
        encode_network(bad, "demo-unet", den.architecture["config"], {"kind": "consistency"}, {})
    with pytest.raises(InputError, match="is missing"):
        encode_network({k: v for k, v in state.items() if k != first}, "demo-unet", den.architecture["config"],
                       {"kind": "consistency"}, {})
    with pytest.raises(InputError, match="not part of the architecture"):
        encode_network({**state, "extra.weight": torch.zeros(1)}, "demo-unet", den.architecture["config"],
                       {"kind": "consistency"}, {})
    assert not os.path.exists(tmp_path / "net")


def test_diffusers_config_asking_for_an_absurd_network_is_refused_before_building(tmp_path):
    folder = save_unet(str(tmp_path / "unet"), scheduler=CM_SCHEDULER)
    cfg = json.loads(open(os.path.join(folder, "config.json")).read())
    cfg["layers_per_block"] = 10**6
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(InputError, match="layers_per_block"):
        load_denoiser(f"diffusers:{folder}")


def test_convert_refuses_a_source_that_is_not_a_regular_file(tmp_path):
    from cpcluster.convert import run_conversion

    fifo = tmp_path / "checkpoint_80"
    os.mkfifo(fifo)  # reading it would block forever
    for source in (fifo, tmp_path):
        with pytest.raises(InputError, match="not a regular file"):
            run_conversion("flax-ncsnpp", str(source), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_every_architecture_says_where_its_image_channels_are():
    from cpcluster.models.archs import ARCHITECTURES, IMAGE_CHANNELS, image_channels

    assert set(IMAGE_CHANNELS) == set(ARCHITECTURES)
    assert image_channels("edm-precond", {"precond_kwargs": {"img_channels": 1}}) == 1
    assert image_channels("edm-precond", {"precond_kwargs": {"img_channels": True}}) is None
    assert image_channels("openai-unet", {}) == 3 and image_channels("demo-unet", {}) == 1


def test_a_denoiser_for_other_channels_is_refused_before_anything_runs(tmp_path):
    from click.testing import CliRunner

    from cpcluster.cli import main

    den = load_denoiser("diffusers:" + save_unet(str(tmp_path / "unet"), scheduler=CM_SCHEDULER))  # 3 channels
    _export(den, tmp_path / "net")
    common = ["--denoiser", f"net:{tmp_path / 'net'}", "--classifier", "demo-random", "--dataset", "demo",
              "--sigma", "0.5"]
    res = CliRunner().invoke(main, ["certify", *common, "--executor", "debug", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("Error: ") == 1, res.output
    assert "with --dataset demo: dataset images have 1 channels but the denoiser takes 3" in res.output
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, ["inspect", *common])
    assert res.exit_code == 2 and "dataset images have 1 channels but the denoiser takes 3" in res.output, res.output
