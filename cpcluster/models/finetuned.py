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


def export_finetuned(folder: str, state: dict, base: LoadedDenoiser, which: str, step: int, config: dict,
                     extra: dict | None = None) -> dict:
    """Write ``folder/denoiser.safetensors`` then ``folder/cpcluster.json``, each atomically; returns the JSON.

    ``state``: the state_dict to export (tensors, any device); ``which``: ``"ema"`` or ``"raw"``; ``config``: the
    run's configuration (``FinetuneConfig.to_dict()``).
    """
    from safetensors.torch import save as save_safetensors

    from cpcluster import __version__
    from cpcluster.shards import write_bytes_atomic

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    # One metadata key only: safetensors writes a metadata map in random order, so two keys would make the
    # bytes (and the sha256 that certify runs record) differ between exports of the same weights.
    raw = save_safetensors(tensors, metadata={"format": f"{FORMAT}/{which}"})
    meta = {
        "format": FORMAT,
        "version": 1,
        "base": {"spec": base.spec, "sha256": base.sha256, "kind": base.kind},
        "meta": {k: base.meta.get(k) for k in META_KEYS},
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_bytes(raw), "which": which},
        "step": int(step),
        "config": config,
        "code_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    write_bytes_atomic(_join(folder, WEIGHTS_FILE), raw)
    write_bytes_atomic(_join(folder, META_FILE), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return meta


def read_finetuned_meta(folder: str) -> dict:
    """The ``cpcluster.json`` of a fine-tuned folder, checked for the format; :class:`InputError` otherwise."""
    url = _join(folder, META_FILE)
    try:
        meta = json.loads(read_bytes(url, "--denoiser finetuned:"))
    except json.JSONDecodeError:
        raise InputError(f"--denoiser finetuned:{folder}: {META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "base" not in meta:
        raise InputError(f"--denoiser finetuned:{folder}: {META_FILE} is not a cpcluster fine-tuning result")
    return meta


@register("denoiser", "finetuned")
def load_finetuned(folder: str) -> LoadedDenoiser:
    """``finetuned:<folder>``: base architecture from ``cpcluster.json``'s base spec, weights applied strictly."""
    if not folder:
        raise InputError("--denoiser finetuned: needs a folder, e.g. finetuned:runs/ft/final")
    meta = read_finetuned_meta(folder)
    url = _join(folder, meta["weights"]["file"])
    state, digest = load_state_dict(url, "--denoiser finetuned: weights")
    if digest != meta["weights"]["sha256"]:
        raise InputError(f"--denoiser finetuned:{folder}: {url} has sha256 {digest[:12]}..., but {META_FILE} "
                         f"records {meta['weights']['sha256'][:12]}...; the folder was altered, re-export it")
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
