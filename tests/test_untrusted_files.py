"""Files in data and results folders are data (issue 11): they never choose code to run, and a tiny file cannot
make a reader hang or allocate gigabytes. Every refusal is one ``Error:`` line naming the file."""
import json
import os
import pickle
import sys
import textwrap
import threading
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from cpcluster.cli import main
from cpcluster.models.specs import load_dataset, load_denoiser
from cpcluster.util.errors import InputError

SMALL = ["--denoiser", "demo-random", "--max-images", "4", "--n0", "20", "--n", "100", "--block-size", "50",
         "--draw-batch", "50", "--batch", "100", "--device", "cpu"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(res, *needles):
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ code from files
@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    """A module whose import is recorded in a marker file; its factory returns the demo-random classifier."""
    name = f"cpc_probe_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"
    marker = tmp_path / "imported.txt"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(textwrap.dedent(f"""
        with open({str(marker)!r}, "a") as fh:
            fh.write("imported\\n")

        def make():
            from cpcluster.models.specs import load_classifier
            return load_classifier("demo-random")
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    yield f"python:{name}:make", marker
    sys.modules.pop(name, None)


def test_resubmit_never_imports_code_named_only_by_run_json(tmp_path, probe_module):
    from cpcluster.jobs.certify import main as shard_main

    spec, marker = probe_module
    out = tmp_path / "out"
    res = cli("certify", *SMALL, "--classifier", spec, "--sigma", "0.5", "--shards", "2", "--executor", "debug",
              "--out", out, "--name", "run")
    assert res.exit_code == 0, res.output
    run_dir = out / "run"
    os.remove(run_dir / "shard-00001-of-00002.h5")
    sys.modules.pop(spec.split(":")[1])
    marker.unlink()

    for extra in ((), ("--dry-run",)):
        line = one_error_line(cli("resubmit", run_dir, "--executor", "debug", *extra), "run.json",
                              f"--classifier '{spec}'")
        assert "runs code" in line
    one_error_line(cli("resubmit", run_dir, "--executor", "debug", "--classifier", "python:other:make"),
                   "differs from")
    assert shard_main([str(run_dir), "1"]) == 2
    assert not marker.exists(), "a spec read from run.json was imported"

    res = cli("resubmit", run_dir, "--executor", "debug", "--classifier", spec)
    assert res.exit_code == 0 and "(2 of 2 complete)" in res.output, res.output
    assert marker.exists()


def write_torchscript_probe(path):
    """A scripted classifier whose ``__setstate__`` prints a marker: code that runs when the archive is loaded."""
    import torch
    from torch import nn

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.ones(1)

        def forward(self, x):
            return x.flatten(1)[:, :10] * self.scale

        @torch.jit.export
        def __getstate__(self):
            return (self.scale, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool]):
            print("CPC-PROBE-SETSTATE-RAN")
            self.scale = state[0]
            self.training = state[1]

    torch.jit.script(Probe()).save(str(path))


def test_inspect_loads_torchscript_only_when_asked(tmp_path, capfd):
    write_torchscript_probe(tmp_path / "probe.pt")
    spec = f"torchscript:{tmp_path}/probe.pt?num_classes=10"
    res = cli("inspect", "--classifier", spec, "--dataset", "")
    one_error_line(res, "--load-torchscript")
    assert "CPC-PROBE-SETSTATE-RAN" not in res.output + capfd.readouterr().out
    res = cli("inspect", "--classifier", spec, "--dataset", "", "--load-torchscript")
    assert res.exit_code == 0, res.output
    assert "CPC-PROBE-SETSTATE-RAN" in res.output + capfd.readouterr().out  # the code that the flag warns about
    help_text = cli("inspect", "--help").output
    assert "Nothing runs" not in help_text and "--load-torchscript" in help_text


# --------------------------------------------------------------------------------------- resource exhaustion
def cifar_pickle(labels) -> bytes:
    return pickle.dumps({b"batch_label": b"x", b"data": np.zeros((2, 3072), np.uint8), b"labels": labels},
                        protocol=2)


def test_cifar_pickle_of_shared_lists_is_refused_before_it_expands(tmp_path):
    inner = list(range(200))
    raw = cifar_pickle([[inner] * 200] * 200)  # 8 million labels once expanded, from 7 KB
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(raw)
    assert len(raw) < 10_000
    with pytest.raises(InputError, match="expands to more objects than it holds") as e:
        load_dataset(f"cifar10:{tmp_path}")
    assert "test_batch" in str(e.value)
    buffer = np.zeros(3072 * 500, np.uint8)  # one array referenced many times: copies would need 150 MB
    raw = pickle.dumps({b"data": [buffer] * 100, b"labels": [0]}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(raw)
    with pytest.raises(InputError, match="expands to more array data than it holds"):
        load_dataset(f"cifar10:{tmp_path}")


def run_with_timeout(fn, seconds=20):
    """``fn()``'s exception (or None); fails the test if it does not return within ``seconds`` (a FIFO hang)."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still reading after {seconds} s: a non-regular file was opened")
    return box.get("error")


def test_device_files_and_fifos_are_refused_as_configs_weights_and_images(tmp_path):
    from unet_files import CM_SCHEDULER, save_unet

    folder = save_unet(str(tmp_path / "unet"), scheduler=CM_SCHEDULER)
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    os.remove(weights)
    os.symlink("/dev/null", weights)  # /dev/zero would be read forever
    err = run_with_timeout(lambda: load_denoiser(f"diffusers:{folder}"))
    assert isinstance(err, InputError) and "character device" in str(err) and weights in str(err)
    os.remove(os.path.join(folder, "config.json"))
    os.mkfifo(os.path.join(folder, "config.json"))
    err = run_with_timeout(lambda: load_denoiser(f"diffusers:{folder}"))
    assert isinstance(err, InputError) and "FIFO" in str(err) and "config.json" in str(err)

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    os.symlink("/dev/null", tmp_path / "imgs" / "a" / "1.png")
    err = run_with_timeout(lambda: load_dataset(f"folder:{tmp_path}/imgs"))
    assert isinstance(err, InputError) and "1.png" in str(err) and "character device" in str(err)


def test_fifos_and_devices_named_like_shards_or_journals_are_refused(tmp_path):
    from cpcluster.core.journal import read_journal
    from cpcluster.core.shards import read_shard

    os.mkfifo(tmp_path / "shard-00000-of-00001.h5")
    err = run_with_timeout(lambda: read_shard(str(tmp_path / "shard-00000-of-00001.h5")))
    assert isinstance(err, InputError) and "FIFO" in str(err)
    res = []
    err = run_with_timeout(lambda: res.append(cli("aggregate", tmp_path / "shard-*.h5", "--out", tmp_path / "a")))
    assert err is None
    one_error_line(res[0], "shard-00000-of-00001.h5", "FIFO")
    assert not (tmp_path / "a").exists()
    os.symlink("/dev/null", tmp_path / "shard-00000-of-00001.h5.journal")
    err = run_with_timeout(lambda: read_journal(str(tmp_path / "shard-00000-of-00001.h5.journal")))
    assert isinstance(err, InputError) and "character device" in str(err)


def test_npz_header_claiming_tebibytes_is_refused_before_allocating(tmp_path):
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 12288), np.uint8), labels=np.array([1, 2]))
    with zipfile.ZipFile(tmp_path / "val_data.npz") as z:
        members = {n: z.read(n) for n in z.namelist()}
    old = b"(2, 12288)"
    new = b"(2000000000, 12288)"  # 24 TB of uint8, header padded to the same length
    header = members["data.npy"]
    end = header.index(b"\n") + 1
    patched = header[:end].replace(old, new).replace(b" " * (len(new) - len(old)) + b"\n", b"\n")
    assert len(patched) == end
    members["data.npy"] = patched + header[end:]
    with zipfile.ZipFile(tmp_path / "val_data.npz", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(InputError, match="claims shape") as e:
        load_dataset(f"imagenet64:{tmp_path}")
    assert "val_data.npz" in str(e.value)
    with pytest.raises(InputError, match="claims shape"):
        load_dataset(f"npz:{tmp_path}/val_data.npz?x=data&y=labels")


def test_decompression_bomb_in_an_image_folder_is_refused(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("L", (5000, 5000)).save(tmp_path / "imgs" / "a" / "big.png")  # 25 Mpixel from a few KB
    assert os.path.getsize(tmp_path / "imgs" / "a" / "big.png") < 100_000
    with pytest.raises(InputError, match="5000x5000 pixels") as e:
        load_dataset(f"folder:{tmp_path}/imgs")
    assert "big.png" in str(e.value)


@pytest.mark.parametrize("key, value", [("time_embedding_dim", 10**9), ("num_train_timesteps", 10**12),
                                        ("attention_head_dim", 10**9), ("norm_num_groups", 0),
                                        ("layers_per_block", 10**6)])
def test_diffusers_config_asking_for_an_absurd_network_is_refused(tmp_path, key, value):
    from unet_files import CM_SCHEDULER, save_unet

    folder = save_unet(str(tmp_path / "unet"), scheduler=CM_SCHEDULER)
    config = json.load(open(os.path.join(folder, "config.json")))
    config[key] = value
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(InputError, match=f"architecture config {key}="):
        load_denoiser(f"diffusers:{folder}")


@pytest.mark.parametrize("sidecar, message", [({"kind": "consistency", "grid_steps": 10**12}, "grid_steps=1000000000000 must be <="),
                                              ({"kind": "ddpm", "timesteps": 10**10}, "timesteps=10000000000"),
                                              ({"kind": "ddpm", "betas": "abc"}, "betas must be a list")])
def test_metadata_asking_for_huge_schedules_is_refused(tmp_path, sidecar, message):
    from unet_files import save_unet

    folder = save_unet(str(tmp_path / "unet"), cpcluster=sidecar)
    with pytest.raises(InputError, match=message):
        load_denoiser(f"diffusers:{folder}")
