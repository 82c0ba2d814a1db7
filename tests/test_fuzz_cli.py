"""Crafted inputs through the CLI (issue 11): every malformed file, record or option is exit code 2, exactly one
``Error:`` line naming it, no traceback, and nothing written anywhere.

Each case builds its inputs in its own folder from small templates (a synthetic certify run folder with its
run.json, shards and job records; a tiny real run, for the journal cases, whose job is rerun in-process; a diffusers
UNet folder; dataset files), breaks one thing, and runs one command in-process. Apart from the template run, no
network runs and nothing is counted, so the module takes seconds.
"""
import json
import os
import pickle
import shutil
import struct
import zipfile
import zlib

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from synth import make_config, simulate_counts, write_shard
from unet_files import CM_SCHEDULER, save_unet

from cpcluster.cli import main
from cpcluster.core.shards import shard_name
from cpcluster.util.fileio import config_hash

SHARDS = 2
DEEP = "[" * 5000 + "]" * 5000


# --------------------------------------------------------------------------------------------------- templates
def make_run(folder: str) -> str:
    """A finished 2-shard certify run folder (run.json + shards) of 4 demo images, written without any model."""
    from cpcluster.core.config import CertifyConfig
    from cpcluster.sharding.plan import make_plan, select_images

    run_dir = os.path.join(folder, "run")
    config = CertifyConfig(sigma=0.5, run_dir=run_dir, num_shards=SHARDS, n0=10, n=40, block_size=20, draw_batch=10,
                           batch=20, max_images=4, denoiser="demo-random", classifier="demo-random", device="cpu")
    subset = {"skip": 1, "max_images": 4, "indices": None}
    shard_config = make_config(0.5, n0=10, n=40, block_size=20, num_classes=10, denoiser="demo-random",
                               dataset={"spec": "demo", "name": "demo", "fingerprint": "f", "size": 500, **subset},
                               subset=subset)
    ids = select_images(500, 1, 4)
    plan = make_plan(ids, 10, 40, 20, SHARDS)
    os.makedirs(run_dir)
    record = {"config_hash": config_hash(shard_config), "num_shards": SHARDS, "num_images": 4,
              "num_units": len(plan.units), "total_draws": plan.total_draws, "shard_config": shard_config,
              "certify_config": config.to_dict()}
    with open(os.path.join(run_dir, "run.json"), "w") as fh:
        json.dump(record, fh)
    probs = np.full((500, 10), 0.1)
    for k in range(SHARDS):
        units = plan.shard_units(k)
        write_shard(os.path.join(run_dir, shard_name(k, SHARDS)), shard_config, units,
                    simulate_counts(units, probs, seed=k), np.arange(500) % 10, index=k, total=SHARDS, fast=True)
    return run_dir


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    run_dir = make_run(str(root))
    assert CliRunner().invoke(main, ["status", run_dir, "--no-slurm"]).exit_code == 0
    unet = save_unet(str(root / "unet"), scheduler=CM_SCHEDULER)
    res = CliRunner().invoke(main, ["certify", "--denoiser", "demo-random", "--classifier", "demo-random",
                                    "--max-images", "2", "--n0", "10", "--n", "20", "--block-size", "10",
                                    "--draw-batch", "10", "--batch", "20", "--shards", "2", "--sigma", "0.5",
                                    "--device", "cpu", "--executor", "debug", "--out", str(root), "--name", "real"])
    assert res.exit_code == 0, res.output
    return {"run": run_dir, "unet": unet, "real": str(root / "real")}


def copy(templates, name, tmp_path) -> str:
    return shutil.copytree(templates[name], str(tmp_path / "case" / name))


def edit_json(path, change):
    with open(path) as fh:
        value = json.load(fh)
    value = change(value)
    with open(path, "w") as fh:
        fh.write(value if isinstance(value, str) else json.dumps(value))


def run_json(change):
    def setup(t, tmp):
        run_dir = copy(t, "run", tmp)
        edit_json(os.path.join(run_dir, "run.json"), change)
        return run_dir
    return setup


def nested(record, keys, value):
    target = record
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return record


def jobs_file(content: bytes):
    def setup(t, tmp):
        run_dir = copy(t, "run", tmp)
        with open(os.path.join(run_dir, "jobs.jsonl"), "wb") as fh:
            fh.write(content)
        return run_dir
    return setup


def shard_file(edit):
    """A run folder whose shard 0 is changed by ``edit(path)``."""
    def setup(t, tmp):
        run_dir = copy(t, "run", tmp)
        edit(os.path.join(run_dir, shard_name(0, SHARDS)))
        return run_dir
    return setup


def h5_edit(fn):
    def edit(path):
        with h5py.File(path, "r+") as f:
            fn(f)
    return edit


def replace_file(make):
    def edit(path):
        os.remove(path)
        make(path)
    return edit


def truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def huge_units(f):
    del f["units"]
    f.create_dataset("units", shape=(10**10, 4), dtype="i8", chunks=(1024, 4))  # fill value only: 320 GB claimed


def unet_file(name, content=None, change=None, link=None):
    def setup(t, tmp):
        folder = copy(t, "unet", tmp)
        path = os.path.join(folder, name)
        if link is not None:
            os.remove(path)
            os.symlink(link, path)
        elif content is not None:
            with open(path, "w") as fh:
                fh.write(content)
        else:
            edit_json(path, change)
        return folder
    return setup


def update(**kw):
    return lambda d: {**d, **kw}


def journal(header_bytes: bytes):
    """Shard 0 of a real run unfinished: no file, a journal whose header has an intact CRC but that content."""
    def setup(t, tmp):
        run_dir = copy(t, "real", tmp)
        path = os.path.join(run_dir, shard_name(0, SHARDS))
        os.remove(path)
        with open(path + ".journal", "wb") as fh:
            fh.write(b"CPCJOURNAL1\n" + struct.pack("<Q", len(header_bytes)) + header_bytes
                     + struct.pack("<I", zlib.crc32(header_bytes)))
        return run_dir
    return setup


def data_file(name, writer):
    def setup(t, tmp):
        folder = tmp / "case" / "data"
        folder.mkdir(parents=True)
        writer(folder / name)
        return str(folder)
    return setup


def cifar_pickle(obj):
    return lambda path: path.write_bytes(pickle.dumps(obj, protocol=2))


def npz_claiming(shape):
    def write(path):
        np.savez(path, data=np.zeros((2, 12288), np.uint8), labels=np.array([1, 2]))
        with zipfile.ZipFile(path) as z:
            members = {n: z.read(n) for n in z.namelist()}
        header = members["data.npy"]
        end = header.index(b"\n") + 1
        old, new = b"(2, 12288)", repr(shape).encode()
        members["data.npy"] = header[:end].replace(old, new).replace(b" " * (len(new) - len(old)) + b"\n", b"\n") \
            + header[end:]
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
    return write


def image_folder(make):
    def setup(t, tmp):
        folder = tmp / "case" / "imgs" / "a"
        folder.mkdir(parents=True)
        make(folder)
        return str(folder.parent)
    return setup


def big_png(folder):
    from PIL import Image

    Image.new("L", (5000, 5000)).save(folder / "1.png")


def fifo(path):
    os.mkfifo(path)


# ------------------------------------------------------------------------------------------------------ cases
INSPECT = ["inspect", "--dataset", "", "--denoiser"]
RUN = "{run}"
# id -> (setup(templates, tmp_path) -> path or None, argv with {path}, text the Error line must contain)
CASES = {
    # run.json: status and resubmit --dry-run read it
    "run.json deeply nested": (run_json(lambda r: DEEP), ["status", "{path}"], "run.json"),
    "run.json a list": (run_json(lambda r: [r]), ["resubmit", "{path}", "--dry-run"], "run.json"),
    "run.json certify_config a string": (run_json(update(certify_config="x")), ["status", "{path}"], "run.json"),
    "run.json indices a string": (run_json(lambda r: nested(r, ["certify_config", "indices"], "abc")),
                                  ["resubmit", "{path}", "--dry-run"], "run.json"),
    "run.json sigma a list": (run_json(lambda r: nested(r, ["certify_config", "sigma"], [0.5])),
                              ["status", "{path}"], "run.json"),
    "run.json classifier a list": (run_json(lambda r: nested(r, ["certify_config", "classifier"], ["demo"])),
                                   ["status", "{path}"], "run.json"),
    "run.json n huge": (run_json(lambda r: nested(r, ["certify_config", "n"], 10**15)), ["status", "{path}"],
                        "run.json"),
    "run.json dataset size a list": (run_json(lambda r: nested(r, ["shard_config", "dataset", "size"], [500])),
                                     ["status", "{path}"], "run.json"),
    "run.json config_hash a list": (run_json(update(config_hash=[1])), ["status", "{path}"], "run.json"),
    "run.json num_shards a string": (run_json(update(num_shards="2")), ["status", "{path}"], "run.json"),
    "run.json a FIFO": (lambda t, tmp: _replace_run_json(t, tmp, fifo), ["status", "{path}"], "FIFO"),
    # job records
    "jobs.jsonl a list": (jobs_file(b"[1]\n"), ["status", "{path}"], "jobs.jsonl: line 1"),
    "jobs.jsonl deeply nested": (jobs_file(DEEP.encode() + b"\n"), ["status", "{path}"], "jobs.jsonl"),
    "jobs.jsonl shard a string": (jobs_file(b'{"backend": "slurm", "shard": "0", "job_id": "5"}\n'),
                                  ["status", "{path}"], "shard must be an integer"),
    "jobs.jsonl job_id a list": (jobs_file(b'{"backend": "slurm", "shard": 0, "job_id": [5]}\n'),
                                 ["resubmit", "{path}", "--dry-run"], "job_id"),
    "jobs.jsonl not UTF-8": (jobs_file(b"\xff\xfe\n"), ["status", "{path}"], "jobs.jsonl"),
    # shard files, read by aggregate
    "shard truncated": (shard_file(truncate), ["aggregate", "{path}"], "truncated"),
    "shard is text": (shard_file(lambda p: open(p, "w").write("not hdf5")), ["aggregate", "{path}"], "HDF5"),
    "shard without labels": (shard_file(h5_edit(lambda f: f.__delitem__("labels"))), ["aggregate", "{path}"],
                             "missing dataset 'labels'"),
    "shard config deeply nested": (shard_file(h5_edit(lambda f: f.attrs.__setitem__("config", DEEP))),
                                   ["aggregate", "{path}"], "attribute 'config'"),
    "shard config a list": (shard_file(h5_edit(lambda f: f.attrs.__setitem__("config", "[1]"))),
                            ["aggregate", "{path}"], "attribute 'config'"),
    "shard info not JSON": (shard_file(h5_edit(lambda f: f.attrs.__setitem__("shard", "{"))),
                            ["aggregate", "{path}"], "attribute 'shard'"),
    "shard units of floats": (shard_file(h5_edit(lambda f: (f.__delitem__("units"), f.create_dataset(
        "units", data=np.zeros((6, 4)))))), ["aggregate", "{path}"], "integer dataset"),
    "shard units claiming 320 GB": (shard_file(h5_edit(huge_units)), ["aggregate", "{path}"], "claims shape"),
    "shard negative counts": (shard_file(h5_edit(lambda f: f["counts"].__setitem__((0, 0), -1))),
                              ["aggregate", "{path}"], "unit row 0"),
    "shard counts overflowing int64": (shard_file(h5_edit(lambda f: f["counts"].__setitem__(
        (0, slice(0, 4)), [2**62] * 4))), ["aggregate", "{path}"], "unit row 0"),
    "shard a FIFO": (shard_file(replace_file(fifo)), ["aggregate", "{path}"], "FIFO"),
    "shard a device": (shard_file(replace_file(lambda p: os.symlink("/dev/null", p))), ["aggregate", "{path}"],
                       "character device"),
    "shard a folder": (shard_file(replace_file(os.mkdir)), ["aggregate", "{path}/shard-00000-of-00002.h5"],
                       "holds no shard"),
    # journals with a bad header: the shard job refuses them (resubmit runs it in this process)
    "journal header not JSON": (journal(b"not json"), ["resubmit", "{path}", "--executor", "debug"],
                                "shard journal"),
    "journal header a list": (journal(b"[1]"), ["resubmit", "{path}", "--executor", "debug"], "not a JSON object"),
    "journal num_classes a string": (journal(b'{"config_hash": "x", "num_classes": "a", "image_index": [], '
                                             b'"labels": []}'), ["resubmit", "{path}", "--executor", "debug"],
                                     "num_classes"),
    "journal num_classes huge": (journal(b'{"config_hash": "x", "num_classes": 1000000000000, "image_index": [], '
                                         b'"labels": []}'), ["resubmit", "{path}", "--executor", "debug"],
                                 "num_classes"),
    # network folders: config.json, scheduler config, cpcluster.json sidecar, weights
    "unet config deeply nested": (unet_file("config.json", DEEP), INSPECT + ["diffusers:{path}"], "config.json"),
    "unet config a list": (unet_file("config.json", "[1]"), INSPECT + ["diffusers:{path}"], "config.json"),
    "unet block_out_channels a string": (unet_file("config.json", change=update(block_out_channels="ab")),
                                         INSPECT + ["diffusers:{path}"], "block_out_channels"),
    "unet 10^6 layers": (unet_file("config.json", change=update(layers_per_block=10**6)),
                         INSPECT + ["diffusers:{path}"], "layers_per_block"),
    "unet norm_num_groups 0": (unet_file("config.json", change=update(norm_num_groups=0)),
                               INSPECT + ["diffusers:{path}"], "norm_num_groups"),
    "unet time embedding of 10^9": (unet_file("config.json", change=update(time_embedding_dim=10**9)),
                                    INSPECT + ["diffusers:{path}"], "time_embedding_dim"),
    "unet config a device": (unet_file("config.json", link="/dev/null"), INSPECT + ["diffusers:{path}"],
                             "character device"),
    "scheduler sigma_min a list": (unet_file("scheduler_config.json", change=update(sigma_min=[1])),
                                   INSPECT + ["diffusers:{path}"], "sigma_min"),
    "scheduler steps a string": (unet_file("scheduler_config.json", change=update(num_train_timesteps="x")),
                                 INSPECT + ["diffusers:{path}"], "num_train_timesteps"),
    "scheduler 10^12 steps": (unet_file("scheduler_config.json", change=update(num_train_timesteps=10**12)),
                              INSPECT + ["diffusers:{path}"], "num_train_timesteps"),
    "scheduler betas a string": (unet_file("scheduler_config.json", content=json.dumps(
        {"_class_name": "DDPMScheduler", "trained_betas": "abc"})), INSPECT + ["diffusers:{path}"], "betas"),
    "sidecar c_noise a list": (unet_file("cpcluster.json", '{"c_noise": ["jax"]}'), INSPECT + ["diffusers:{path}"],
                               "c_noise"),
    "sidecar betas a number": (unet_file("cpcluster.json", '{"kind": "ddpm", "betas": 5}'),
                               INSPECT + ["diffusers:{path}"], "betas"),
    "sidecar 10^10 timesteps": (unet_file("cpcluster.json", '{"kind": "ddpm", "timesteps": 10000000000}'),
                                INSPECT + ["diffusers:{path}"], "timesteps"),
    "sidecar sigma_data NaN": (unet_file("cpcluster.json", '{"kind": "edm", "sigma_data": "nan"}'),
                               INSPECT + ["diffusers:{path}", "--purifier", "pf-ode"], "sigma_data"),
    "sidecar deeply nested": (unet_file("cpcluster.json", DEEP), INSPECT + ["diffusers:{path}"], "cpcluster.json"),
    "weights a device": (unet_file("diffusion_pytorch_model.safetensors", link="/dev/null"),
                         INSPECT + ["diffusers:{path}"], "character device"),
    # datasets
    "cifar pickle of shared lists": (data_file("test_batch", cifar_pickle(
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [[list(range(100))] * 100] * 100})),
        ["inspect", "--dataset", "cifar10:{path}"], "expands"),
    "cifar pickle naming a global": (data_file("test_batch", lambda p: p.write_bytes(
        b"cos\nsystem\n(S'true'\ntR.")), ["inspect", "--dataset", "cifar10:{path}"], "refused global"),
    "cifar pickle truncated": (data_file("test_batch", lambda p: p.write_bytes(pickle.dumps(
        {b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)[:50])), ["inspect", "--dataset", "cifar10:{path}"],
        "test_batch"),
    "npz header claiming 24 TB": (data_file("val_data.npz", npz_claiming((2000000000, 12288))),
                                  ["inspect", "--dataset", "imagenet64:{path}"], "claims shape"),
    "npz not a zip": (data_file("x.npz", lambda p: p.write_bytes(b"PK nothing")),
                      ["inspect", "--dataset", "npz:{path}/x.npz"], "x.npz"),
    "npz of objects": (data_file("x.npz", lambda p: np.savez(p, x=np.array([{}], dtype=object), y=[0])),
                       ["inspect", "--dataset", "npz:{path}/x.npz"], "x.npz"),
    "npz a FIFO": (data_file("val_data.npz", fifo), ["inspect", "--dataset", "imagenet64:{path}"], "FIFO"),
    "image decompression bomb": (image_folder(big_png), ["inspect", "--dataset", "folder:{path}"], "5000x5000"),
    "image a device": (image_folder(lambda f: os.symlink("/dev/null", f / "1.png")),
                       ["inspect", "--dataset", "folder:{path}"], "character device"),
    # locations and options
    "status of an unknown protocol": (None, ["status", "foo://x/run"], "Protocol not known"),
    "aggregate of an unknown protocol": (None, ["aggregate", "foo://x/run"], "Protocol not known"),
    "aggregate into an unknown protocol": (lambda t, tmp: copy(t, "run", tmp),
                                           ["aggregate", "{path}", "--out", "foo://x"], "--out foo://x"),
    "dataset on a missing filesystem": (None, ["inspect", "--dataset", "cifar10:s3://bucket/cifar"], "s3fs"),
    "certify --purifier-label fixed:abc": (None, ["certify", "--sigma", "0.5", "--purifier-label", "fixed:abc",
                                                  "--dry-run"], "fixed:abc"),
    "inspect --purifier-label fixed:abc": (None, ["inspect", "--purifier-label", "fixed:abc", "--dataset", ""],
                                           "fixed:abc"),
    "certify --n beyond a unit": (None, ["certify", "--sigma", "0.5", "--n", str(10**19), "--dry-run"], "--n"),
    "certify --n of 2^62": (None, ["certify", "--sigma", "0.5", "--n", str(2**62), "--block-size", str(2**61),
                                   "--dry-run"], "--n"),
    "certify 5x10^9 units": (None, ["certify", "--sigma", "0.5", "--n", str(10**9), "--block-size", "100",
                                   "--denoiser", "demo-random", "--classifier", "demo-random", "--dry-run"],
                            "work units"),
    "certify --indices of 10^10": (None, ["certify", "--sigma", "0.5", "--indices", "0-10000000000", "--dry-run"],
                                   "--indices"),
    "certify --sigma nan": (None, ["certify", "--sigma", "nan", "--dry-run"], "--sigma"),
    "certify --name of 10^8 characters": (None, ["certify", "--sigma", "0.5", "--name", "{{sigma:>99999999}}",
                                                 "--dry-run"], "at most 255 characters"),
    "timm head of 10^7 classes": (None, ["inspect", "--classifier", "timm:resnet18?num_classes=10000000",
                                         "--dataset", ""], "num_classes=10000000"),
    "certify --out memory with local jobs": (None, ["certify", "--sigma", "0.5", "--out", "memory://r",
                                                    "--executor", "local"], "memory://r"),
    "inspect --sigma inf": (None, ["inspect", "--sigma", "inf", "--dataset", ""], "--sigma"),
    "finetune --lr inf": (None, ["finetune", "--model", "demo-random", "--data", "demo:train", "--out", "{tmp}/ft",
                                 "--lr", "inf", "--dry-run"], "--lr inf"),
    "finetune --sigmas inf": (None, ["finetune", "--model", "demo-random", "--data", "demo:train", "--out",
                                     "{tmp}/ft", "--sigma", "0.5,inf", "--dry-run"], "--sigma"),
    "finetune --grad-clip nan": (None, ["finetune", "--model", "demo-random", "--data", "demo:train", "--out",
                                        "{tmp}/ft", "--grad-clip", "nan", "--dry-run"], "--grad-clip"),
}


def _replace_run_json(t, tmp, make):
    run_dir = copy(t, "run", tmp)
    os.remove(os.path.join(run_dir, "run.json"))
    make(os.path.join(run_dir, "run.json"))
    return run_dir


def snapshot(root) -> dict:
    """Every path under ``root`` with its type, size and modification time (FIFOs and links as themselves;
    folders by their type only: a lock file made and removed again changes a folder's time, not its content)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_mode,) if name in dirs else (st.st_mode, st.st_size,
                                                                                 st.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_input_is_one_error_line_and_writes_nothing(case, templates, tmp_path, monkeypatch):
    setup, argv, needle = CASES[case]
    path = setup(templates, tmp_path) if setup is not None else ""
    monkeypatch.chdir(tmp_path)  # relative defaults (--out results) land in the snapshot
    args = [a.format(path=path, tmp=tmp_path) for a in argv]
    before = snapshot(tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{case}: {res.exception!r}"
    assert res.exit_code == 2, f"{case}: exit {res.exit_code}: {res.output}"
    lines = res.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in res.output, res.output
    assert needle in errors[0], (needle, errors[0])
    after = snapshot(tmp_path)
    logs = {p for p in set(after) - set(before) if p.split(os.sep)[-2:-1] == ["logs"] or p.endswith("logs")}
    assert {p: v for p, v in after.items() if p not in logs} == before, "something was written"
