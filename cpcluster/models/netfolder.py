"""Network folders: cpcluster's own self-contained format for a denoising network, and the spec kind ``net:DIR``.

``cpcluster convert`` writes one from a released checkpoint (a Flax msgpack, an EDM pickle, an OpenAI ``.pt``), and
``cpcluster finetune`` exports one. A folder holds

* ``model.safetensors`` -- the state_dict of the architecture's module (float32);
* ``cpcluster.json`` (written last: a folder with it is complete) -- ``format`` ("cpcluster-network"), ``version``,
  ``architecture`` (a name from :data:`cpcluster.models.archs.ARCHITECTURES`, or null with a ``load_with`` spec for
  weights of a ``python:`` network, which the user must type) and ``arch_config``, the network
  ``meta`` (``kind`` and what the purifiers need: ``c_noise``, ``grid_steps``, ``num_classes``, DDPM ``betas`` ...),
  ``weights`` (file name and sha256), ``source`` (what it was made from: file, sha256, converter or fine-tuning
  run) and free-form ``notes``.

Loading builds the named architecture (a file names one of the registered architectures, never code), checks the
weights' sha256 against the record and assigns them strictly; nothing is unpickled. Spec options after ``?`` may
override the metadata keys (``net:DIR?grid_steps=18``), as for ``diffusers:`` folders.
"""
from __future__ import annotations

import datetime
import json

from cpcluster.models.archs import ARCHITECTURES, assign_state, build_architecture, first_mismatch, image_channels
from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.weights import load_state_dict, read_json_object, sha256_bytes
from cpcluster.util.errors import InputError

FORMAT = "cpcluster-network"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "cpcluster.json"


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def encode_network(state: dict, architecture: str, arch_config: dict, meta: dict, source: dict,
                   notes: list | None = None, extra: dict | None = None) -> tuple[bytes, dict]:
    """``(safetensors bytes, cpcluster.json dict)`` of a network folder, checked, without writing anything.

    ``state`` must fit the architecture exactly (checked on the meta device); a mismatch is an :class:`InputError`
    naming the first mismatching tensor.
    """
    from safetensors.torch import save as save_safetensors

    from cpcluster import __version__

    what = f"architecture {architecture}"
    if architecture is not None:  # None: weights of a network only its own code (a python: factory) rebuilds
        module = build_architecture(architecture, arch_config, what, meta_device=True)
        problem = first_mismatch(module, state)
        if problem:
            raise InputError(f"{what}: the weights do not fit: {problem}")
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().to("cpu").contiguous().clone()
               for k, v in state.items()}
    raw = save_safetensors(tensors, metadata={"format": FORMAT})  # one key: the bytes are reproducible
    record = {
        "format": FORMAT, "version": VERSION, "architecture": architecture, "arch_config": arch_config,
        "meta": meta, "weights": {"file": WEIGHTS_FILE, "sha256": sha256_bytes(raw)}, "source": source,
        "notes": list(notes or []), "code_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(extra or {}),
    }
    json.dumps(record)  # everything in it must be JSON
    return raw, record


def write_network_folder(folder: str, raw: bytes, record: dict) -> None:
    """Write the weights, then ``cpcluster.json``, each atomically (temp + rename): a reader sees a whole folder."""
    from cpcluster.util.fileio import write_bytes_atomic

    write_bytes_atomic(_join(folder, WEIGHTS_FILE), raw)
    write_bytes_atomic(_join(folder, META_FILE), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def read_network_record(folder: str, what: str) -> dict:
    """The checked ``cpcluster.json`` of a network folder (format, architecture name, types)."""
    record = read_json_object(_join(folder, META_FILE), what)
    if record.get("format") != FORMAT:
        raise InputError(f"{what}: {_join(folder, META_FILE)} is not a cpcluster network folder "
                         f"(format {record.get('format')!r}); make one with `cpcluster convert`")
    if record.get("version") != VERSION:
        raise InputError(f"{what}: network folder version {record.get('version')!r} is not supported "
                         f"(this cpcluster reads version {VERSION})")
    if record.get("architecture") is None and "load_with" in record:
        spec = record["load_with"]
        how = f"--denoiser {spec}" if isinstance(spec, str) else "the python: spec of its base with these weights"
        raise InputError(f"{what}: its network is built by code that cpcluster does not run from a file; load it "
                         f"by typing {how}")
    if record.get("architecture") not in ARCHITECTURES:
        raise InputError(f"{what}: unknown architecture {record.get('architecture')!r}; "
                         f"known: {', '.join(sorted(ARCHITECTURES))}")
    for key, kind in (("arch_config", dict), ("meta", dict), ("weights", dict)):
        if not isinstance(record.get(key), kind):
            raise InputError(f"{what}: {META_FILE} lacks a valid {key!r} object")
    weights = record["weights"]
    if weights.get("file") != WEIGHTS_FILE or not isinstance(weights.get("sha256"), str):
        raise InputError(f"{what}: {META_FILE} must name weights file {WEIGHTS_FILE} with its sha256")
    return record


def load_network_folder(folder: str, options: dict, what: str) -> LoadedDenoiser:
    """The :class:`LoadedDenoiser` of a network folder; ``options`` override metadata keys (strings)."""
    from cpcluster.models.unet_folder import META_KEYS, merge_meta, normalize_meta

    record = read_network_record(folder, what)
    raw_meta = {k: v for k, v in record["meta"].items() if k in META_KEYS}
    meta = normalize_meta(merge_meta(raw_meta, options), what)
    module = build_architecture(record["architecture"], record["arch_config"], what, meta_device=True)
    url = _join(folder, WEIGHTS_FILE)
    state, digest = load_state_dict(url, what)
    if digest != record["weights"]["sha256"]:
        raise InputError(f"{what}: {url} has sha256 {digest[:12]}..., but {META_FILE} records "
                         f"{record['weights']['sha256'][:12]}...; the folder was altered, convert or export it again")
    assign_state(module, state, what)
    info = {**meta, "in_channels": image_channels(record["architecture"], record["arch_config"]),
            "architecture": record["architecture"]}
    for key in ("source", "finetuned"):  # small identity records; they go into every run config
        if isinstance(record.get(key), dict):
            info[key] = record[key]
    return LoadedDenoiser(module.eval().requires_grad_(False), info.pop("kind"), info, sha256=digest,
                          architecture={"name": record["architecture"], "config": record["arch_config"]})


def load_net(argument: str) -> LoadedDenoiser:
    from cpcluster.models.transforms import split_options
    from cpcluster.models.unet_folder import META_KEYS

    what = f"--denoiser net:{argument}"
    folder, options = split_options(argument, what, META_KEYS)
    if not folder:
        raise InputError("--denoiser net: needs a folder written by `cpcluster convert` or `cpcluster finetune`")
    return load_network_folder(folder, options, what)
