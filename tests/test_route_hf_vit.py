"""The CIFAR-10 rows' classifier from its released format: a transformers ViT folder (``hf-vit:DIR``) behind a
consistency purifier -> inspect -> certify (debug executor) -> aggregate; and folders it must refuse.

The classifier is the transformers-written stand-in tests/data/hf_vit/vit-cifar10 (the released folder's layout at
toy size), the purifier a diffusers consistency UNet at 3x32x32, the data a CIFAR-10 binary batch of random images.
"""
from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.core.shards import read_shard
from hf_vit_files import DATA, copy_folder
from routes import certify_and_aggregate, cli, write_cifar_batch
from unet_files import CM_SCHEDULER, save_unet

torch.set_num_threads(1)
VIT = f"hf-vit:{DATA}/vit-cifar10"


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_batch(root)
    return f"cifar10:{root}"


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return "diffusers:" + save_unet(str(tmp_path_factory.mktemp("cd") / "cd"), sample_size=32, scheduler=CM_SCHEDULER)


def test_vit_folder_inspects_certifies_and_aggregates(tmp_path, cifar, unet):
    report = cli("inspect", "--denoiser", unet, "--classifier", VIT, "--dataset", cifar, "--sigma", "0.5")
    assert "timm: VisionTransformer" in report and "layer_norm_eps: 1e-12" in report
    assert "normalization_source: preprocessor_config.json" in report and "problems: none" in report
    summary = certify_and_aggregate(unet, str(tmp_path / "results"), "cd-vit", dataset=cifar, classifier=VIT)
    assert summary["groups"][0]["images_evaluated"] == 3
    shard = read_shard(str(next((tmp_path / "results" / "cd-vit").glob("*.h5"))))
    recorded = shard.config["classifier"]
    with open(os.path.join(DATA, "vit-cifar10", "model.safetensors"), "rb") as fh:
        assert recorded["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert recorded["transform"]["interp"] == "bilinear" and recorded["transform"]["mean"] == [0.5] * 3
    assert recorded["architecture"]["kwargs"]["layer_norm_eps"] == 1e-12
    # the transform is part of the run: another interpolation is another run
    res = CliRunner().invoke(main, ["certify", "--denoiser", unet, "--classifier", VIT + "?interp=bicubic",
                                    "--dataset", cifar, "--sigma", "0.5", "--max-images", "3", "--n0", "4", "--n",
                                    "8", "--block-size", "4", "--draw-batch", "4", "--shards", "2", "--device",
                                    "cpu", "--executor", "debug", "--out", str(tmp_path / "results"), "--name",
                                    "cd-vit"])
    assert res.exit_code == 2 and "holds another run" in res.output, res.output


def test_votes_are_the_classifiers_predictions(tmp_path, cifar):
    from cpcluster.models.specs import load_classifier, load_dataset

    cli("certify", "--purifier", "none", "--classifier", VIT, "--dataset", cifar, "--sigma", "1e-4",
        "--n0", "4", "--n", "8", "--block-size", "8", "--draw-batch", "4", "--batch", "8", "--shards", "1",
        "--device", "cpu", "--executor", "debug", "--out", tmp_path, "--name", "plain")
    shard = read_shard(str(next((tmp_path / "plain").glob("*.h5"))))
    images, _ = load_dataset(cifar).get(shard.units[:, 0])
    with torch.no_grad():
        predicted = load_classifier(VIT).module(torch.from_numpy(images)).argmax(1).numpy()
    assert (shard.counts.argmax(1) == predicted).all() and (shard.counts.max(1) == shard.units[:, 3]).all()


def _truncated(tmp_path):
    folder = copy_folder("vit-cifar10", tmp_path, drop=["pytorch_model.bin"])
    path = os.path.join(folder, "model.safetensors")
    raw = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    return folder


def _needs_globals(tmp_path):
    folder = copy_folder("vit-cifar10", tmp_path, drop=["model.safetensors"])
    torch.save({"vit.embeddings.cls_token": torch.zeros(1, 1, 32), "args": argparse.Namespace(cmd="rm")},
               os.path.join(folder, "pytorch_model.bin"))
    return folder


def _other_model(tmp_path):
    return save_unet(str(tmp_path / "unet"), sample_size=32)


@pytest.mark.parametrize("make, message", [
    (_other_model, "config.json has model_type None; hf-vit reads ViTForImageClassification folders"),
    (_truncated, "model.safetensors: not a valid safetensors file"),
    (_needs_globals, "pytorch_model.bin: cannot be loaded with weights_only=True"),
    (lambda p: copy_folder("vit-cifar10", p, config={"num_hidden_layers": 3}),
     "the weights do not fit config.json: tensor 'vit.encoder.layer.2.attention.attention.query.weight' (32, 32) "
     "is missing"),
    (lambda p: copy_folder("vit-cifar10", p, processor={"size": 48}),
     "resizes to 48x48 but config.json says image_size 32"),
])
def test_bad_folder_is_one_error_line_exit_2_and_nothing_written(tmp_path, cifar, unet, make, message):
    out = tmp_path / "results"
    res = CliRunner().invoke(main, ["certify", "--denoiser", unet, "--classifier", f"hf-vit:{make(tmp_path)}",
                                    "--dataset", cifar, "--sigma", "0.5", "--n0", "4", "--n", "8", "--shards", "1",
                                    "--device", "cpu", "--executor", "debug", "--out", str(out), "--name", "run"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.output
    assert not out.exists()


def test_unresized_input_of_the_wrong_size_is_refused_before_running(tmp_path):
    folder = copy_folder("vit-resize", tmp_path, drop=["preprocessor_config.json"])  # takes 48x48, no resize
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", x=rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), y=np.arange(4))
    common = ["--purifier", "none", "--classifier", f"hf-vit:{folder}?mean=half", "--dataset",
              f"npz:{tmp_path}/images.npz?num_classes=7", "--sigma", "0.5"]
    for command in (["inspect"], ["certify", "--executor", "debug", "--out", str(tmp_path / "out")]):
        res = CliRunner().invoke(main, command + common)
        assert res.exit_code == 2, res.output
        assert "the classifier takes 48x48 images but they reach it unresized at 32x32; add resize=48" in res.output
    assert not (tmp_path / "out").exists()


def test_classifier_finetuning_of_the_vit_exports_a_self_contained_folder(tmp_path, cifar):
    """CLS-FT of the released-format ViT (2 SGD steps, Gaussian augmentation), then the released folder is deleted:
    the export still loads -- the ViT and its input transform rebuilt from the export's base/ files -- with the
    trained weights, certifies, and a fine-tuning of the export (the chain) is self-contained too. An altered base
    file is refused."""
    import json
    import shutil

    from cpcluster.core.config_evidence import ClassifierFinetuneConfig
    from cpcluster.jobs.finetune_classifier import ClassifierFinetuneJob
    from cpcluster.models.specs import load_classifier
    from test_finetune_ddp import final_state, max_difference

    released = copy_folder("vit-cifar10", tmp_path / "released")
    spec = f"hf-vit:{released}?interp=bicubic"
    common = dict(denoiser=None, purifier="none", data=cifar, eval_data=cifar, sigmas=(0.5,), steps=2, batch_size=4,
                  optimizer="sgd", lr=0.05, eval_images=0, eval_every=0, checkpoint_every=2, log_every=1)
    ClassifierFinetuneJob(ClassifierFinetuneConfig(classifier=spec, out=str(tmp_path / "ft"), **common))()
    trained = final_state(str(tmp_path / "ft"))["net"]
    before = load_classifier(spec)
    assert max_difference(before.module.state_dict(), trained) > 0  # the steps changed the weights
    export = str(tmp_path / "ft" / "final")
    assert sorted(os.listdir(os.path.join(export, "base"))) == ["config.json", "preprocessor_config.json"]
    shutil.rmtree(released)

    loaded = load_classifier(f"finetuned:{export}")
    assert max_difference(loaded.module.state_dict(), trained) == 0.0
    assert loaded.module.transform.interp == "bicubic" and loaded.module.transform.size == (32, 32)
    images = torch.rand(2, 3, 32, 32)
    before.module.load_state_dict(trained)  # the released architecture with the trained weights
    with torch.no_grad():
        assert torch.equal(loaded.module(images), before.module(images))
    summary = certify_and_aggregate("", str(tmp_path / "results"), "ft-vit", dataset=cifar,
                                    classifier=f"finetuned:{export}", purifier="none")
    assert summary["groups"][0]["images_evaluated"] == 3

    ClassifierFinetuneJob(ClassifierFinetuneConfig(classifier=f"finetuned:{export}", out=str(tmp_path / "ft2"),
                                                   **common))()
    again = load_classifier(f"finetuned:{tmp_path}/ft2/final")
    assert again.finetuned["base"] == spec and again.module.transform.interp == "bicubic"

    with open(os.path.join(export, "base", "config.json")) as fh:
        config = json.load(fh)
    with open(os.path.join(export, "base", "config.json"), "w") as fh:
        json.dump({**config, "num_hidden_layers": 200}, fh)
    res = CliRunner().invoke(main, ["inspect", "--purifier", "none", "--classifier", f"finetuned:{export}",
                                    "--dataset", cifar, "--sigma", "0.5"])
    assert res.exit_code == 2 and "the folder was altered" in res.output, res.output
