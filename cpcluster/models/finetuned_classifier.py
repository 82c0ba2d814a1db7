"""The output of ``cpcluster finetune-classifier`` and its classifier spec kind ``finetuned:<folder>[|BASE]``.

A finished run leaves ``<out>/final/`` (any fsspec URL) holding

* ``classifier.safetensors`` -- the state_dict of the whole classifier module (every weight: loading it never reads
  the base classifier's checkpoint), the EMA when the run kept one;
* ``cpcluster.json`` -- ``format`` ``cpcluster-finetuned-classifier``, the ``base`` classifier spec (and sha256)
  whose *architecture and input transform* the weights belong to, ``num_classes``, ``transform``, the ``weights``
  file with its sha256, the ``purifier`` it was trained behind, the training ``step`` and ``config``. Written last.

A file may name data and weights, never code, so the base spec rebuilds the architecture only when it is data:

* ``demo``, ``demo-random`` -- the built-in :class:`~cpcluster.demo.nets.DemoClassifier`;
* ``timm:NAME[:CKPT][?options]`` -- ``timm.create_model(NAME, pretrained=False)`` with the spec's options; the
  checkpoint it names is not read;
* ``hf-vit:DIR[?options]`` -- the export carries the released folder's ``config.json`` and
  ``preprocessor_config.json`` in ``base/`` (their sha256 in ``base_files``), so the ViT and its input transform are
  rebuilt from the export alone: the released folder need not exist where the export is certified.

A ``python:`` or ``torchscript:`` base is code: the folder cannot choose to run it, so the user repeats it on the
command line, ``--classifier 'finetuned:DIR|python:my.module:factory'``, and it must equal the recorded spec.
"""
from __future__ import annotations

import datetime
import json

from cpcluster.models.archs import assign_state
from cpcluster.models.loaded import LoadedClassifier
from cpcluster.models.specs import load_classifier
from cpcluster.models.weights import apply_state_dict, load_state_dict, read_json_object, sha256_bytes
from cpcluster.util.errors import InputError

FORMAT = "cpcluster-finetuned-classifier"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "cpcluster.json"
WHAT = "--classifier finetuned:"
CODE_KINDS = ("python", "torchscript")
BASE_FOLDER = "base"  # hf-vit bases: the released folder's small JSON files, copied into the export
BASE_FILES = ("config.json", "preprocessor_config.json")


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
    from cpcluster.util.fileio import write_bytes_atomic

    write_bytes_atomic(_join(folder, weights_file), raw)
    write_bytes_atomic(_join(folder, META_FILE), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return meta


def export_record(fmt: str, base: dict, weights: dict, step: int, config: dict, extra: dict | None) -> dict:
    """The common part of a ``cpcluster.json``: format, base, weights, step, config, code version, time."""
    from cpcluster import __version__

    return {"format": fmt, "version": 1, "base": base, "weights": weights, "step": int(step), "config": config,
            "code_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}


def read_export_meta(folder: str, fmt: str, what: str, kind: str) -> dict:
    """The ``cpcluster.json`` of an export folder, checked for the format ``fmt``; :class:`InputError` otherwise."""
    meta = read_json_object(_join(folder, META_FILE), f"{what}{folder}:")
    if meta.get("format") != fmt or not isinstance(meta.get("base"), dict) or not isinstance(meta.get("weights"), dict):
        raise InputError(f"{what}{folder}: {META_FILE} is not a cpcluster {kind} result")
    return meta


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


def _timm_architecture(spec: str) -> str:
    """``timm:NAME[:CKPT][?options]`` -> ``timm:NAME[?options]`` (same architecture and transform, no file read)."""
    argument = spec.partition(":")[2]
    body, mark, query = argument.rpartition("?") if "?" in argument else (argument, "", "")
    return f"timm:{body.partition(':')[0]}" + (f"?{query}" if mark else "")


# Explicit registry: base spec kind -> the spec that rebuilds its architecture without reading a weights file.
ARCHITECTURES = {"demo": lambda spec: spec, "demo-random": lambda spec: spec, "timm": _timm_architecture,
                 "hf-vit": lambda spec: spec}  # hf-vit: a released folder (data); its weights are then replaced


def root_base(classifier: LoadedClassifier) -> tuple[str, str | None]:
    """``(spec, sha256)`` of the classifier whose architecture ``classifier`` has (itself, unless it was fine-tuned)."""
    if classifier.finetuned is not None:
        return classifier.finetuned["base"], classifier.finetuned["base_sha256"]
    return classifier.spec, classifier.sha256


def export_finetuned_classifier(folder: str, state: dict, base: LoadedClassifier, which: str, step: int,
                                config: dict, purifier: dict, extra: dict | None = None) -> dict:
    """Write ``folder/classifier.safetensors`` then ``folder/cpcluster.json`` (atomically); returns the JSON.

    ``state``: the classifier module's state_dict; ``base``: the classifier the run started from; ``purifier``:
    what it was trained behind (denoiser spec and sha256, purifier kind, sigmas).
    """
    spec, digest = root_base(base)
    base_files = _copy_base_files(folder, base, spec)
    raw = state_bytes(state, f"{FORMAT}/{which}")
    meta = export_record(FORMAT, {"spec": spec, "sha256": digest, "kind": spec.partition(":")[0],
                                  "started_from": base.spec},
                         {"file": WEIGHTS_FILE, "sha256": sha256_bytes(raw), "which": which}, step, config,
                         {"num_classes": int(base.num_classes),
                          "transform": {k: v for k, v in base.transform.items() if k != "random_init"},
                          "purifier": purifier, **({"base_files": base_files} if base_files else {}),
                          **(extra or {})})
    return write_export(folder, WEIGHTS_FILE, raw, meta)


def _copy_base_files(folder: str, base: LoadedClassifier, spec: str) -> dict:
    """hf-vit roots: copy ``config.json`` (and ``preprocessor_config.json`` when present) into ``folder/base/``, from
    the released folder or from the export ``base`` was loaded from; ``{name: sha256}``. Other kinds: ``{}``."""
    from cpcluster.models.transforms import TRANSFORM_KEYS, split_options
    from cpcluster.util.fileio import MAX_JSON_BYTES, exists, read_regular, write_bytes_atomic

    if spec.partition(":")[0] != "hf-vit":
        return {}
    if base.finetuned is not None and base.finetuned.get("folder"):
        source = _join(base.finetuned["folder"], BASE_FOLDER)
    else:
        source = split_options(spec.partition(":")[2], f"--classifier {spec}", TRANSFORM_KEYS)[0].rstrip("/")
    copied = {}
    for name in BASE_FILES:
        url = _join(source, name)
        if exists(url):
            raw = read_regular(url, f"--classifier {spec}", MAX_JSON_BYTES)
            write_bytes_atomic(_join(_join(folder, BASE_FOLDER), name), raw)
            copied[name] = sha256_bytes(raw)
    return copied


def _recorded_vit(folder: str, meta: dict, base_spec: str):
    """``(module, num_classes)``: the ViT of an hf-vit export rebuilt from ``folder/base/`` (each file read once and
    sha256-checked before it is parsed), its input transform from those files and the base spec's options; the ViT
    is on the meta device until the export's weights are assigned."""
    from cpcluster.models.hf_vit import vit_from_records
    from cpcluster.models.transforms import TRANSFORM_KEYS, split_options
    from cpcluster.util.fileio import MAX_JSON_BYTES, parse_json, read_regular

    files = meta["base_files"]
    if not isinstance(files, dict) or "config.json" not in files or not set(files) <= set(BASE_FILES):
        raise InputError(f"{WHAT}{folder}: {META_FILE} base_files must name config.json (and "
                         "preprocessor_config.json); re-export it")
    base = _join(folder, BASE_FOLDER)
    records = {}
    for name, recorded in files.items():
        url = _join(base, name)
        raw = read_regular(url, f"{WHAT}{folder}", MAX_JSON_BYTES)
        if sha256_bytes(raw) != recorded:
            raise InputError(f"{WHAT}{folder}: {url} differs from the sha256 in {META_FILE}; the folder was altered, "
                             "re-export it")
        records[name] = parse_json(raw, url)
    what = f"{WHAT}{folder} (base {base_spec})"
    options = split_options(base_spec.partition(":")[2], what, TRANSFORM_KEYS)[1]
    module, kwargs, _ = vit_from_records(records["config.json"], records.get("preprocessor_config.json"), base,
                                         options, what)
    return module, kwargs["num_classes"]


def architecture_spec(folder: str, base_spec: str, repeated: str) -> str:
    """The spec to build the architecture from: the repeated spec (which must be the recorded one) or a data spec."""
    kind = base_spec.partition(":")[0]
    if repeated:
        if repeated != base_spec:
            raise InputError(f"{WHAT}{folder}|{repeated}: the run was trained from {base_spec!r}, not {repeated!r}; "
                             f"give --classifier 'finetuned:{folder}|{base_spec}'")
        return repeated
    if kind in CODE_KINDS:
        raise InputError(f"{WHAT}{folder}: its base classifier {base_spec!r} is code, which a file may not choose to "
                         f"run; repeat it on the command line: --classifier 'finetuned:{folder}|{base_spec}'")
    if kind not in ARCHITECTURES:
        raise InputError(f"{WHAT}{folder}: base classifier kind {kind!r} cannot be rebuilt from a record (known: "
                         f"{', '.join(sorted(ARCHITECTURES))}); repeat it: 'finetuned:{folder}|{base_spec}'")
    return ARCHITECTURES[kind](base_spec)


def load_finetuned_classifier(argument: str) -> LoadedClassifier:
    """``finetuned:<folder>[|BASE]``: the base architecture (see the module docstring), the export's weights strictly."""
    folder, _, repeated = argument.partition("|")
    if not folder:
        raise InputError(f"{WHAT} needs a folder, e.g. --classifier finetuned:runs/cls-ft/final")
    meta = read_export_meta(folder, FORMAT, WHAT, "classifier fine-tuning")
    base_spec = meta["base"].get("spec")
    if not isinstance(base_spec, str) or not base_spec:
        raise InputError(f"{WHAT}{folder}: cpcluster.json names no base classifier spec")
    recorded = not repeated and base_spec.partition(":")[0] == "hf-vit" and "base_files" in meta
    build = None if recorded else architecture_spec(folder, base_spec, repeated)
    state, digest, url = load_checked_weights(folder, meta, WHAT)
    if recorded:
        module, num_classes = _recorded_vit(folder, meta, base_spec)
    else:
        base = load_classifier(build)
        module, num_classes = base.module, base.num_classes
    if num_classes != meta.get("num_classes"):
        raise InputError(f"{WHAT}{folder}: {build or base_spec} has {num_classes} classes, the export "
                         f"{meta.get('num_classes')}")
    if recorded:
        assign_state(module, state, f"{WHAT}{folder}: {url}")
    else:
        apply_state_dict(module, state, url, f"{WHAT} weights")
    module.eval().requires_grad_(False)
    info = {"base": base_spec, "base_sha256": meta["base"].get("sha256"), "step": meta.get("step"),
            "weights": meta["weights"].get("which"), "purifier": meta.get("purifier"), "folder": folder}
    return LoadedClassifier(module, num_classes, sha256=digest, transform=meta.get("transform") or {},
                            finetuned=info)
