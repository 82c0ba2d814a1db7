"""Which runs are one *method*: a readable name, an identity that names the whole smoothed classifier, short labels.

A table row is one method at one sigma, and the best-over-sigma row takes a maximum over one method's sigmas, so a
method must be one smoothed classifier up to its noise level, certified one way. Its identity (:func:`identity`)
is the run config without what varies with sigma or only with how the work was cut or skipped: ``sigma``, the
purifier's sigma-dependent parameters (:data:`SIGMA_DEPENDENT`), ``mode`` (a separate key of the row),
``block_size`` (units, not draws) and ``early_stop`` (certified accuracy and ACR are exact under it). Everything
else is in it: classifier and denoiser (spec and weights' sha256), dataset and subset, ``n``, ``n0``, ``seed``,
``draw_batch``, ``dtype``, purifier parameters, the noise scheme and the code version. An unknown config key is
part of the identity, so a key added later splits rows rather than silently merging them.

:func:`method_name` is the readable name (purifier and denoiser, e.g. ``consistency(demo)``); where two
identities share it, :func:`method_labels` appends a short suffix naming what tells them apart
(``none [classifier=demo-random]``); a name no other identity shares stays as it is.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping

from cpcluster.aggregate.finetuning import finetuning_label

# Purifier parameters that tell methods apart in the readable name.
NAME_KEYS = ("time_rule", "steps", "solver", "label_policy")
NAME_DEFAULTS = {"time_rule": "nearest"}
# Run-config keys outside a method's identity, and the purifier parameters derived from sigma.
NOT_IDENTITY = ("sigma", "mode", "block_size", "early_stop")
SIGMA_DEPENDENT = ("t_sigma", "times", "timestep", "abar_t", "model_sigma_t")
# Order in which differing keys are named in a label suffix (others follow alphabetically).
SUFFIX_ORDER = ("classifier", "dataset", "subset", "n", "n0", "seed", "dtype", "denoiser", "purifier",
                "draw_batch", "noise", "code_version")
SUFFIX_KEYS = 2  # at most this many keys named; the rest as "+k"
_VALUE_CHARS = 24


def method_name(config: dict) -> str:
    """Readable method name from ``config["purifier"]`` and ``config["denoiser"]``.

    ``"none"`` for the identity purifier; else ``"kind(denoiser spec[, key=value ...])"`` with the non-default
    values of :data:`NAME_KEYS`, e.g. ``"consistency(demo)"`` or ``"pf-ode(edm:/ckpt/x.pkl, steps=4)"``; then
    :func:`~cpcluster.aggregate.finetuning.finetuning_label` in brackets when anything was fine-tuned, e.g.
    ``"consistency(demo) [CLS-FT: SPEC]"``. Raises ValueError when the config has no purifier kind.
    """
    pur = config.get("purifier")
    kind = pur.get("kind") if isinstance(pur, dict) else pur
    if not isinstance(kind, str) or not kind:
        raise ValueError("config key 'purifier' must be an object with a 'kind' string")
    label = finetuning_label(config)
    suffix = f" [{label}]" if label else ""
    if kind == "none":
        return "none" + suffix
    den = config.get("denoiser")
    spec = den.get("spec") if isinstance(den, dict) else den
    parts = [str(spec)] if spec else []
    if isinstance(pur, dict):
        parts += [f"{k}={pur[k]}" for k in NAME_KEYS if pur.get(k) not in (None, NAME_DEFAULTS.get(k))]
    return (f"{kind}({', '.join(parts)})" if parts else kind) + suffix


def identity(config: dict) -> dict:
    """The part of a run config that names its smoothed classifier and its certification (module docstring).

    In predict mode ``n0`` is dropped too: PREDICT has no selection draws (see :func:`predict_partners`).
    """
    out = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    if config.get("mode", "certify") == "predict":
        out.pop("n0", None)
    pur = out.get("purifier")
    if isinstance(pur, dict):
        out["purifier"] = {k: v for k, v in pur.items() if k not in SIGMA_DEPENDENT}
    return out


def identity_hash(config: dict) -> str:
    """Hex sha256 of the canonical JSON of :func:`identity`: equal exactly when two runs are one method."""
    text = json.dumps(identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def predict_partners(methods: Mapping[str, tuple]) -> dict:
    """``{predict identity hash: certify identity hash}`` for PREDICT methods that are a CERTIFY method but n0.

    ``methods`` maps identity hashes to ``(readable name, identity dict, mode)``. A PREDICT run has no ``n0``; when
    exactly one CERTIFY method equals it in everything else, the two are one method (a CERTIFY row and a PREDICT
    row under one label).
    """
    def key(ident):
        return json.dumps({k: v for k, v in ident.items() if k != "n0"}, sort_keys=True)

    certify: dict = {}
    for mid, (_, ident, mode) in methods.items():
        if mode == "certify":
            certify.setdefault(key(ident), []).append(mid)
    out = {}
    for mid, (_, ident, mode) in methods.items():
        match = certify.get(key(ident), []) if mode == "predict" else []
        if len(match) == 1:
            out[mid] = match[0]
    return out


def _flat(value, prefix: str = "") -> dict:
    """``{"a.b": leaf}`` for nested dicts; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def _text(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS - 1] + "…"


def _describe(key: str, paths: list, flat: dict) -> str:
    """``key=value`` for one differing top-level key: its ``spec`` when that differs, else its first leaf."""
    leaf = f"{key}.spec" if f"{key}.spec" in paths else paths[0]
    name = key if leaf in (key, f"{key}.spec") else leaf
    return f"{name}={_text(flat.get(leaf, '(absent)'))}"


def _suffixes(members: Mapping[str, dict]) -> dict:
    """``{id: "[k=v, ...]"}`` naming the top-level keys in which the identities ``members`` differ."""
    flats = {mid: _flat(ident) for mid, ident in members.items()}
    paths = sorted({p for f in flats.values() for p in f})
    differ = [p for p in paths if len({json.dumps(f.get(p, "\0absent"), sort_keys=True)
                                       for f in flats.values()}) > 1]
    by_key: dict = {}
    for p in differ:
        by_key.setdefault(p.split(".", 1)[0], []).append(p)
    rank = {k: i for i, k in enumerate(SUFFIX_ORDER)}
    keys = sorted(by_key, key=lambda k: (rank.get(k, len(rank)), k))
    out = {}
    for mid, flat in flats.items():
        parts = [_describe(k, by_key[k], flat) for k in keys[:SUFFIX_KEYS]]
        more = f", +{len(keys) - SUFFIX_KEYS}" if len(keys) > SUFFIX_KEYS else ""
        out[mid] = f"[{', '.join(parts)}{more}]"
    return out


def method_labels(methods: Mapping[str, tuple]) -> dict:
    """Table labels of methods ``{identity hash: (readable name, identity dict)}``: ``{identity hash: label}``.

    A name held by one identity is its label. Names held by several get a suffix naming the keys they differ in
    (at most :data:`SUFFIX_KEYS`, values shortened); where two suffixes still coincide, the identity hash's first
    8 characters are added, so labels are always distinct.
    """
    by_name: dict = {}
    for mid, (name, ident) in methods.items():
        by_name.setdefault(name, {})[mid] = ident
    labels = {}
    for name, members in by_name.items():
        if len(members) == 1:
            labels[next(iter(members))] = name
            continue
        suffix = _suffixes(members)
        for mid in members:
            labels[mid] = f"{name} {suffix[mid]}"
        clash = [mid for mid in members if sum(labels[o] == labels[mid] for o in members) > 1]
        for mid in clash:
            labels[mid] = f"{labels[mid][:-1]}, #{mid[:8]}]"
    return labels
