"""The output of ``cpcluster finetune`` and its denoiser spec kind ``finetuned:<folder>``.

A finished run leaves ``<out>/final/`` (any fsspec URL) holding

* ``denoiser.safetensors`` -- the network's state_dict (the EMA of the weights when the run kept one, else the raw
  weights; ``cpcluster.json`` says which);
* ``cpcluster.json`` -- ``format``, the ``base`` model spec and sha256 the run started from, the network ``meta``
  (c_noise, grid_steps, num_classes), the ``weights`` file with its sha256, the training ``step``, and the
  ``config`` that produced it. It is written last, so a folder with a ``cpcluster.json`` is complete.

``finetuned:<folder>`` rebuilds the architecture by loading the base spec (``load_denoiser``), then applies the
weights strictly after checking their sha256 against ``cpcluster.json``.
"""
from __future__ import annotations

import datetime
import json
import warnings

from cpcluster.errors import InputError
from cpcluster.models.loaded import LoadedDenoiser
from cpcluster.models.specs import load_denoiser, register
from cpcluster.models.weights import apply_state_dict, load_state_dict, read_bytes, sha256_bytes

FORMAT = "cpcluster-finetuned"
WEIGHTS_FILE = "denoiser.safetensors"
META_FILE = "cpcluster.json"
META_KEYS = ("c_noise", "grid_steps", "num_classes")


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def state_bytes(state: dict, tag: str) -> bytes:
    """``state`` (tensors, any device) as safetensors bytes with the single metadata entry ``format: tag``.

    One metadata key only: safetensors writes a metadata map in random order, so two keys would make the bytes (and
    the sha256 that certify runs record) differ between exports of the same weights.
    """
    from safetensors.torch import save as save_safetensors

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return save_safetensors(tensors, metadata={"format": tag})


def write_export(folder: str, weights_file: str, raw: bytes, meta: dict) -> dict:
    """Write the weights, then ``cpcluster.json`` (last: a folder holding it is complete), each atomically."""
    from cpcluster.shards import write_bytes_atomic

    write_bytes_atomic(_join(folder, weights_file), raw)
    write_bytes_atomic(_join(folder, META_FILE), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return meta


def export_record(fmt: str, base: dict, weights: dict, step: int, config: dict, extra: dict | None) -> dict:
    """The common part of a ``cpcluster.json``: format, base, weights, step, config, code version, time."""
    from cpcluster import __version__

    return {"format": fmt, "version": 1, "base": base, "weights": weights, "step": int(step), "config": config,
            "code_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}


def export_finetuned(folder: str, state: dict, base: LoadedDenoiser, which: str, step: int, config: dict,
                     extra: dict | None = None) -> dict:
    """Write ``folder/denoiser.safetensors`` then ``folder/cpcluster.json``, each atomically; returns the JSON.

    ``state``: the state_dict to export (tensors, any device); ``which``: ``"ema"`` or ``"raw"``; ``config``: the
    run's configuration (``FinetuneConfig.to_dict()``).
    """
    raw = state_bytes(state, f"{FORMAT}/{which}")
    meta = export_record(FORMAT, {"spec": base.spec, "sha256": base.sha256, "kind": base.kind},
                         {"file": WEIGHTS_FILE, "sha256": sha256_bytes(raw), "which": which}, step, config,
                         {"meta": {k: base.meta.get(k) for k in META_KEYS}, **(extra or {})})
    return write_export(folder, WEIGHTS_FILE, raw, meta)


def read_export_meta(folder: str, fmt: str, what: str, kind: str) -> dict:
    """The ``cpcluster.json`` of an export folder, checked for the format ``fmt``; :class:`InputError` otherwise."""
    url = _join(folder, META_FILE)
    try:
        meta = json.loads(read_bytes(url, what))
    except json.JSONDecodeError:
        raise InputError(f"{what}{folder}: {META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or not isinstance(meta.get("base"), dict) \
            or not isinstance(meta.get("weights"), dict):
        raise InputError(f"{what}{folder}: {META_FILE} is not a cpcluster {kind} result")
    return meta


def read_finetuned_meta(folder: str) -> dict:
    """The ``cpcluster.json`` of a fine-tuned folder, checked for the format; :class:`InputError` otherwise."""
    return read_export_meta(folder, FORMAT, "--denoiser finetuned:", "fine-tuning")


def load_checked_weights(folder: str, meta: dict, what: str) -> tuple[dict, str, str]:
    """``(state_dict, sha256, url)`` of the export's weights file, refused unless its sha256 is the recorded one."""
    name = meta["weights"].get("file")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise InputError(f"{what}{folder}: {META_FILE} names no weights file inside the folder")
    url = _join(folder, name)
    state, digest = load_state_dict(url, f"{what} weights")
    if digest != meta["weights"].get("sha256"):
        raise InputError(f"{what}{folder}: {url} has sha256 {digest[:12]}..., but {META_FILE} records "
                         f"{str(meta['weights'].get('sha256'))[:12]}...; the folder was altered, re-export it")
    return state, digest, url


@register("denoiser", "finetuned")
def load_finetuned(folder: str) -> LoadedDenoiser:
    """``finetuned:<folder>``: base architecture from ``cpcluster.json``'s base spec, weights applied strictly."""
    if not folder:
        raise InputError("--denoiser finetuned: needs a folder, e.g. finetuned:runs/ft/final")
    meta = read_finetuned_meta(folder)
    state, digest, url = load_checked_weights(folder, meta, "--denoiser finetuned:")
    base = load_denoiser(meta["base"]["spec"])
    if base.sha256 != meta["base"]["sha256"]:
        # The architecture is what matters here (the weights are replaced), but say that the base changed.
        warnings.warn(f"finetuned:{folder}: base {meta['base']['spec']} now has sha256 {base.sha256}; the run "
                      f"started from {meta['base']['sha256']}")
    apply_state_dict(base.module, state, url, "--denoiser finetuned: weights")
    info = {k: v for k, v in base.meta.items() if k != "random_init"}
    info.update({k: v for k, v in meta["meta"].items() if v is not None or k == "num_classes"})
    info["finetuned"] = {"base": meta["base"]["spec"], "base_sha256": meta["base"]["sha256"],
                         "step": meta["step"], "weights": meta["weights"]["which"]}
    return LoadedDenoiser(base.module.eval(), base.kind, info, sha256=digest)
