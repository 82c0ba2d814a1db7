"""Converters: a released checkpoint in a foreign format -> a cpcluster network folder (``net:DIR``).

``cpcluster convert KIND SOURCE OUT`` is an explicit, one-time step the user runs knowingly; ``certify`` and
``finetune`` then load ``net:OUT`` (safetensors + JSON, :mod:`cpcluster.models.netfolder`) and never read the
foreign format. Each converter module in :data:`CONVERTERS` has

* ``DESCRIPTION`` -- one line for ``cpcluster convert --help``;
* ``OPTIONS`` -- ``{key: help}`` of the ``--set KEY=VALUE`` options it accepts (architecture presets, overrides);
* ``convert(source: str, options: dict[str, str], what: str) -> Converted`` -- reads ``source`` (a local path or
  fsspec URL) without running code from it, maps its tensors onto a registered architecture and says how.

Converters needing packages outside cpcluster's core (``msgpack`` for Flax checkpoints) import them inside
``convert`` and raise one :class:`InputError` naming the extra to install (``pip install 'cpcluster[convert]'``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from cpcluster.util.errors import InputError

# Explicit registry: converter name -> module.
CONVERTERS: dict[str, str] = {
    "openai-unet": "cpcluster.convert.openai_unet",
    "edm-pickle": "cpcluster.convert.edm_pickle",
    "flax-ncsnpp": "cpcluster.convert.flax_ncsnpp",
}


@dataclass
class Converted:
    """What a converter produced: tensors named for ``architecture`` built from ``arch_config``, and the metadata."""

    state: dict
    architecture: str
    arch_config: dict
    meta: dict
    notes: list = field(default_factory=list)
    source_info: dict = field(default_factory=dict)


def converter(kind: str):
    """The converter module ``kind``; :class:`InputError` listing the known ones otherwise."""
    if kind not in CONVERTERS:
        known = ", ".join(sorted(CONVERTERS)) or "(none)"
        raise InputError(f"cpcluster convert {kind!r}: unknown format; known formats: {known}")
    return importlib.import_module(CONVERTERS[kind])


def parse_set_options(items, allowed: dict, what: str) -> dict[str, str]:
    """``("key=value", ...)`` -> dict; unknown or repeated keys are an :class:`InputError` listing the known ones."""
    options: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InputError(f"{what}: --set {item!r} is not KEY=VALUE")
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "(none)"
            raise InputError(f"{what}: unknown --set key {key!r}; this format knows: {known}")
        if key in options:
            raise InputError(f"{what}: --set {key} given twice")
        options[key] = value
    return options


def run_conversion(kind: str, source: str, out: str, set_items=(), overwrite: bool = False) -> dict:
    """Convert ``source`` into the network folder ``out``; returns a report (sha256 of both, tensors, notes).

    Nothing is written unless the whole conversion succeeded; ``out`` holding a network folder is refused
    unless ``overwrite``.
    """
    from cpcluster.models.netfolder import META_FILE, WEIGHTS_FILE, encode_network, write_network_folder
    from cpcluster.models.weights import sha256_file
    from cpcluster.util.fileio import exists, join_url

    module = converter(kind)
    what = f"cpcluster convert {kind} {source}"
    options = parse_set_options(set_items, module.OPTIONS, what)
    if exists(join_url(out, META_FILE)) and not overwrite:
        raise InputError(f"{out} already holds a network folder; choose another OUT or add --overwrite")
    source_sha = sha256_file(source, what)  # regular files only: a FIFO or a device is refused before reading
    result = module.convert(source, options, what)
    source_record = {"file": source, "sha256": source_sha, "format": kind, "options": options,
                     **result.source_info}
    raw, record = encode_network(result.state, result.architecture, result.arch_config, result.meta,
                                 source_record, result.notes)
    write_network_folder(out, raw, record)
    params = sum(int(t.numel()) for t in result.state.values())
    return {"source": source, "source_sha256": source_sha, "out": out,
            "weights": join_url(out, WEIGHTS_FILE), "weights_sha256": record["weights"]["sha256"],
            "architecture": result.architecture, "tensors": len(result.state), "parameters": params,
            "meta": record["meta"], "notes": result.notes, "spec": f"net:{out}"}
