"""The output of ``cpcluster finetune``: a self-contained network folder, and the spec kind ``finetuned:<folder>``.

A finished run leaves ``<out>/final/`` (any fsspec URL), a network folder (:mod:`cpcluster.models.netfolder`):
``model.safetensors`` (the EMA of the weights when the run kept one, else the raw weights) and ``cpcluster.json``
(written last) with the architecture and its config, the network ``meta``, ``finetuned`` (base spec and sha256,
step, which weights) and ``finetune_run`` (the run's configuration, its hash and the last held-out evaluation).

Loading never goes back to the base spec: the architecture is rebuilt from the record, so a results folder shared
on a cluster cannot make cpcluster import anything. A base that only its own code can rebuild (a ``python:``
factory) is exported with ``architecture: null`` and a ``load_with`` spec that the user must type on the command
line (``--denoiser python:MOD:FACTORY:<folder>/model.safetensors``). ``finetuned:DIR`` is ``net:DIR`` with the
error messages of this module; both load any network folder.
"""
from __future__ import annotations

from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.netfolder import WEIGHTS_FILE, encode_network, load_network_folder, write_network_folder
from cpcluster.util.errors import InputError

# Network metadata a fine-tuned consistency / EDM network keeps (what the purifiers read).
EXPORTED_META = ("c_noise", "grid_steps", "num_classes", "preconditioned", "sigma_data")


def weights_module(base: LoadedDenoiser):
    """The module whose state_dict the base's own spec loads: a ``python:`` network inside its channel-crop wrapper."""
    from cpcluster.models.adapters import CropChannels

    return base.module.net if isinstance(base.module, CropChannels) else base.module


def export_finetuned(folder: str, state: dict, base: LoadedDenoiser, which: str, step: int, config: dict,
                     extra: dict | None = None) -> dict:
    """Write the network folder of fine-tuned ``state`` (a state_dict of ``base.module``); returns its record.

    ``which``: ``"ema"`` or ``"raw"``; ``config``: the run's configuration (``FinetuneConfig.to_dict()``); ``extra``:
    more of the run (``run_hash``, ``eval``). Exporting the same weights twice gives the same weight bytes.
    """
    meta = {"kind": base.kind, **{k: base.meta[k] for k in EXPORTED_META if k in base.meta}}
    finetuned = {"base": base.spec, "base_sha256": base.sha256, "step": int(step), "weights": which}
    run = {"config": config, **(extra or {})}
    source = {"finetuned_from": {"spec": base.spec, "sha256": base.sha256}}
    if base.architecture is not None:
        raw, record = encode_network(state, base.architecture["name"], base.architecture["config"], meta, source,
                                     extra={"finetuned": finetuned, "finetune_run": run})
    else:
        prefix = "net." if weights_module(base) is not base.module else ""
        state = {k[len(prefix):]: v for k, v in state.items()}
        body, mark, query = base.spec.partition("?")
        load_with = None
        if body.startswith("python:") and body.count(":") >= 2:  # python:MODULE:FACTORY[:WEIGHTS] -> these weights
            load_with = ":".join(body.split(":")[:3]) + f":{folder.rstrip('/')}/{WEIGHTS_FILE}" + mark + query
        raw, record = encode_network(state, None, None, meta, source,
                                     extra={"finetuned": finetuned, "finetune_run": run, "load_with": load_with})
    write_network_folder(folder, raw, record)
    return record


def load_finetuned(argument: str) -> LoadedDenoiser:
    """``finetuned:<folder>``: a fine-tuning export (any network folder), rebuilt from its own record."""
    from cpcluster.models.transforms import split_options
    from cpcluster.models.unet_folder import META_KEYS

    what = f"--denoiser finetuned:{argument}"
    folder, options = split_options(argument, what, META_KEYS)
    if not folder:
        raise InputError("--denoiser finetuned: needs a folder, e.g. finetuned:runs/ft/final")
    return load_network_folder(folder, options, what)
