"""Reference data for cpcluster's EDM support, produced by NVlabs/edm's own code (development time only).

Usage::

    python scripts/dev/make_edm_reference.py EDM_REPO_DIR tests/data/edm [--pickles /tmp/edm-pickles]

``EDM_REPO_DIR`` is a checkout of https://github.com/NVlabs/edm; its ``dnnlib``, ``torch_utils`` and ``training``
are imported from there (nothing of it is copied here). For each case in :data:`CASES` the script builds a small
random network exactly as EDM's ``train.py`` / training loop do (``construct_class_by_name`` of the
preconditioner, ``deepcopy(net).eval().requires_grad_(False)``), perturbs every parameter so that zero-initialised
layers matter, rounds the parameters to float16-representable values (so they can be stored as float16 without
changing the network), runs EDM's forward on fixed inputs, and writes

* ``NAME.safetensors`` -- the network's state_dict with EDM's key names (parameters float16, buffers float32);
* ``NAME.json`` -- the persistence tree: for every module in ``named_modules()`` order its class, whether it is a
  persistent class, its own attributes, ``init_args`` / ``init_kwargs``, parameter / buffer / child names; plus the
  ``loss_fn`` object and ``dataset_kwargs`` of the snapshot dict. numpy scalars, tuples and infinities are tagged;
* ``NAME.npz`` -- ``x`` (B, C, R, R), ``sigma`` (B,), ``labels`` (B,) int64, ``out`` = EDM's D(x; sigma, one-hot
  labels) and, for conditional networks, ``out_nolabel`` = D with ``class_labels=None``.

With ``--pickles DIR`` it also writes the real snapshot pickle ``DIR/NAME.pkl`` (``pickle.dump(dict(ema=...,
loss_fn=..., augment_pipe=None, dataset_kwargs=...))``, as ``training_loop.py`` does). Those embed EDM's source
code: keep them out of the repository; they serve to compare the layout of the tests' stand-in pickles with the
real one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pickle
import sys

import numpy as np
import torch

DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1])
NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
SMALL = dict(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[4], dropout=0.13, use_fp16=False)
# name -> (preconditioner class, loss class, constructor kwargs beyond SMALL). Kept tiny (the files are committed):
# DhariwalUNet's attention needs 64 channels per head, so at this width its blocks have none (SongUNet's has one).
CASES = {
    "ddpmpp-cond": ("EDMPrecond", "EDMLoss", dict(DDPMPP, label_dim=10, augment_dim=9)),
    "adm-cond": ("EDMPrecond", "EDMLoss", dict(model_type="DhariwalUNet", label_dim=10)),
    "vp-skip": ("VPPrecond", "VPLoss", dict(DDPMPP, encoder_type="skip", decoder_type="skip")),
    "ve-ncsnpp": ("VEPrecond", "VELoss", dict(NCSNPP)),
    "iddpm-adm": ("iDDPMPrecond", "EDMLoss", dict(model_type="DhariwalUNet")),
}
SIGMAS = [0.002, 0.3, 2.0, 80.0]
LABELS = [3, 0, 9, 1]


def encode(value):
    """JSON form of an attribute or constructor argument; numpy scalars, tuples and non-finite floats tagged."""
    if isinstance(value, np.generic):
        return {"__numpy__": value.dtype.str, "value": encode(value.item())}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        assert all(isinstance(k, str) for k in value), value
        return {k: encode(v) for k, v in value.items()}
    assert value is None or isinstance(value, (bool, int, float, str)), (type(value), value)
    return value


def describe_tree(net: torch.nn.Module, persistence) -> list:
    """One entry per module (``named_modules`` order): what a pickle of it holds, minus the tensors' values."""
    internals = set(torch.nn.Module().__dict__)
    tree = []
    for path, module in net.named_modules():
        own = {k: v for k, v in module.__dict__.items() if k not in internals}
        persistent = persistence.is_persistent(module)
        cls = type(module)
        tree.append({
            "path": path,
            "class": cls.__name__ if persistent else f"{cls.__module__}.{cls.__qualname__}",
            "persistent": persistent,
            "attrs": [[k, encode(v)] for k, v in own.items() if k not in ("_init_args", "_init_kwargs")],
            "init_args": encode(own.get("_init_args")) if persistent else None,
            "init_kwargs": encode(own.get("_init_kwargs")) if persistent else None,
            "training": module.training,
            "parameters": [[k, v is not None] for k, v in module._parameters.items()],
            "buffers": [[k, v is not None] for k, v in module._buffers.items()],
            "non_persistent_buffers": sorted(module._non_persistent_buffers_set),
            "children": [k for k, v in module._modules.items() if v is not None],
        })
    return tree


def make_case(name: str, out: str, pickles: str | None, dnnlib, persistence) -> dict:
    precond, loss, kwargs = CASES[name]
    kwargs = {**SMALL, **kwargs}
    seed = sorted(CASES).index(name)
    torch.manual_seed(seed)
    net = dnnlib.util.construct_class_by_name(class_name=f"training.networks.{precond}", **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())  # exactly representable in float16
    ema = copy.deepcopy(net).eval().requires_grad_(False).cpu()
    loss_fn = dnnlib.util.construct_class_by_name(class_name=f"training.loss.{loss}")
    dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip",
                          use_labels=bool(kwargs.get("label_dim")), xflip=False, cache=True,
                          resolution=kwargs["img_resolution"], max_size=1000)
    if pickles:
        with open(os.path.join(pickles, f"{name}.pkl"), "wb") as fh:
            pickle.dump(dict(ema=ema, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=dataset_kwargs), fh)

    from safetensors.torch import save_file

    buffers = {k for k, _ in ema.named_buffers()}
    state = {k: (v if k in buffers else v.half()).contiguous() for k, v in ema.state_dict().items()}
    save_file(state, os.path.join(out, f"{name}.safetensors"))

    gen = torch.Generator().manual_seed(100 + seed)
    res, ch = kwargs["img_resolution"], kwargs["img_channels"]
    sigma = torch.tensor(SIGMAS)
    x = (torch.rand(len(SIGMAS), ch, res, res, generator=gen) * 2 - 1
         + sigma.reshape(-1, 1, 1, 1) * torch.randn(len(SIGMAS), ch, res, res, generator=gen))
    labels = torch.tensor(LABELS) % max(kwargs.get("label_dim", 0), 1)
    arrays = {"x": x.numpy(), "sigma": sigma.numpy(), "labels": labels.numpy()}
    with torch.no_grad():
        if kwargs.get("label_dim"):
            one_hot = torch.nn.functional.one_hot(labels, kwargs["label_dim"]).float()
            arrays["out"] = ema(x, sigma, one_hot).numpy()
            arrays["out_nolabel"] = ema(x, sigma, None).numpy()
        else:
            arrays["out"] = ema(x, sigma).numpy()
    np.savez(os.path.join(out, f"{name}.npz"), **arrays)

    record = {
        "case": name, "precond": precond, "constructor_kwargs": encode(kwargs), "tree": describe_tree(ema, persistence),
        "loss_fn": {"class": type(loss_fn).__name__, "attrs": [[k, encode(v)] for k, v in loss_fn.__dict__.items()
                                                               if k not in ("_init_args", "_init_kwargs")],
                    "init_args": encode(loss_fn._init_args), "init_kwargs": encode(loss_fn._init_kwargs)},
        "dataset_kwargs": encode(dataset_kwargs), "edm_commit": os.environ.get("EDM_COMMIT"),
        "torch": torch.__version__, "parameters": int(sum(p.numel() for p in ema.parameters())),
    }
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(record, fh, separators=(",", ":"))
        fh.write("\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("edm_repo", help="checkout of NVlabs/edm (imported, never copied)")
    parser.add_argument("out", help="output folder, e.g. tests/data/edm")
    parser.add_argument("--pickles", default=None, help="also write the real snapshot pickles here (not committed)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.edm_repo))
    import dnnlib  # noqa: E402  (from EDM_REPO_DIR)
    from torch_utils import persistence  # noqa: E402

    os.makedirs(args.out, exist_ok=True)
    if args.pickles:
        os.makedirs(args.pickles, exist_ok=True)
    torch.set_num_threads(1)
    for name in args.cases.split(","):
        record = make_case(name, args.out, args.pickles, dnnlib, persistence)
        print(f"{name}: {record['precond']} / {record['tree'][1]['class']}, {record['parameters']:,} parameters")


if __name__ == "__main__":
    main()
