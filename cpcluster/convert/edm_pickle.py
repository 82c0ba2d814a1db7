"""Converter ``edm-pickle``: an NVlabs/edm network pickle -> a cpcluster network folder (``edm-precond``).

Reads ``edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl``, ``edm-imagenet-64x64-cond-adm.pkl``, the ``baseline-*``
pickles and a training run's ``network-snapshot-*.pkl`` with the restricted unpickler of
:mod:`cpcluster.convert.edm_unpickler` (nothing in the file runs), takes the network under ``which`` (``ema``),
and produces

* the flat state_dict with EDM's key names (``model.enc.32x32_conv.weight`` ...), from the recorded module tree
  (``_parameters`` and persistent ``_buffers`` of every module, children in order);
* the ``edm-precond`` config: the preconditioner's class and the arguments of it that change the denoiser, the
  inner network's class (SongUNet / DhariwalUNet) and its full constructor arguments (EDM's defaults filled in),
  both taken from the ``init_args`` / ``init_kwargs`` that ``torch_utils.persistence`` recorded;
* the metadata ``kind=edm``, ``preconditioned=true`` (the network is D(x; sigma) itself), ``num_classes`` =
  ``label_dim`` (None when unconditional) and, for EDMPrecond, ``sigma_data``.
"""
from __future__ import annotations

import json

from cpcluster.convert import Converted
from cpcluster.util.errors import InputError

DESCRIPTION = ("NVlabs/edm network pickle (edm-*.pkl, baseline-*.pkl, network-snapshot-*.pkl): EDM/VP/VE/iDDPM "
               "preconditioner around SongUNet (DDPM++, NCSN++) or DhariwalUNet (ADM); read without running it")
OPTIONS = {"which": "entry of the pickled snapshot dict to convert (default: ema)"}

# Upstream constructor signatures (positional order), for init_args, and each one's default inner network.
PRECOND_SIGNATURES = {
    "EDMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                   "sigma_data", "model_type"),
    "VPPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d", "beta_min", "M", "epsilon_t",
                  "model_type"),
    "VEPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "model_type"),
    "iDDPMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "C_1", "C_2", "M", "model_type"),
}
DEFAULT_MODEL_TYPE = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet",
                      "iDDPMPrecond": "DhariwalUNet"}
MAX_DEPTH = 32


def read_snapshot(source: str, what: str):
    """The unpickled top-level object of ``source`` (records in place of EDM's objects); one InputError if not."""
    import pickle

    import fsspec

    from cpcluster.convert.edm_unpickler import RefusedGlobal, load

    try:
        with fsspec.open(source, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            if fh.read(4) == b"PK\x03\x04":
                raise InputError(f"{what}: a torch.save zip archive (such as training-state-*.pt), not a network "
                                 "pickle; convert the run's network-snapshot-*.pkl instead")
            fh.seek(0)
            return load(fh, size)
    except RefusedGlobal as e:
        raise InputError(f"{what}: {e}: not part of an EDM network pickle, so the file is refused (nothing in it "
                         "was run)") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, RecursionError) as e:  # damaged or foreign pickles fail in many ways
        raise InputError(f"{what}: not a readable EDM network pickle ({type(e).__name__}: {str(e)[:160]})") from None


def _plain(value, what: str, depth: int = 0):
    """A constructor argument as JSON (tuples -> lists); anything else (objects, deep nesting) is an InputError."""
    if depth > 8:
        raise InputError(f"{what}: a constructor argument is nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, what, depth + 1) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, what, depth + 1) for k, v in value.items()}
    raise InputError(f"{what}: a constructor argument is a {type(value).__name__}, not a number, string or list")


def constructor_kwargs(record, signature: tuple, what: str) -> dict:
    """``init_args`` (named by ``signature``) and ``init_kwargs`` that persistence recorded for ``record``."""
    args, kwargs = record.state.get("_init_args"), record.state.get("_init_kwargs")
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise InputError(f"{what}: the {record.class_name} records no constructor arguments (init_args/kwargs)")
    if len(args) > len(signature) or set(signature[: len(args)]) & set(kwargs):
        raise InputError(f"{what}: the {record.class_name}'s recorded arguments do not fit its signature")
    return {**dict(zip(signature, args)), **kwargs}


def flat_state(record, what: str) -> dict:
    """``{dotted name: tensor}`` of a recorded module tree, in ``state_dict`` order (persistent buffers only)."""
    import torch

    from cpcluster.convert.edm_unpickler import ModuleRecord, PersistentRecord

    out: dict = {}

    def table(state, key, kind=dict):
        value = state.get(key) or kind()
        if not isinstance(value, kind):
            raise InputError(f"{what}: a module's {key} is a {type(value).__name__}")
        return value

    def walk(node, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH or not isinstance(getattr(node, "state", None), dict):
            raise InputError(f"{what}: {prefix or 'the network'} is not a recorded module")
        state = node.state
        skip = table(state, "_non_persistent_buffers_set", set)
        for key in ("_parameters", "_buffers"):
            for name, tensor in table(state, key).items():
                if tensor is None or (key == "_buffers" and name in skip):
                    continue
                if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                    raise InputError(f"{what}: {prefix}{name} is not a tensor")
                out[prefix + name] = tensor
        for name, child in table(state, "_modules").items():
            if child is None:
                continue
            if not isinstance(name, str) or not isinstance(child, (PersistentRecord, ModuleRecord)):
                raise InputError(f"{what}: {prefix}{name} is a {type(child).__name__}, not a module")
            walk(child, f"{prefix}{name}.", depth + 1)

    walk(record, "", 0)
    return out


def arch_config(net, what: str) -> tuple[dict, list]:
    """The ``edm-precond`` config of a recorded preconditioner, and notes on what was left out."""
    from cpcluster.convert.edm_unpickler import PersistentRecord
    from cpcluster.models.archs.edm_precond import COMMON_KWARGS, FORWARD_KWARGS
    from cpcluster.models.archs.edm_unets import UNETS

    precond = net.class_name
    given = constructor_kwargs(net, PRECOND_SIGNATURES[precond], what)
    model_type = given.pop("model_type", DEFAULT_MODEL_TYPE[precond])
    inner = net.state.get("_modules", {}).get("model") if isinstance(net.state.get("_modules"), dict) else None
    if not isinstance(inner, PersistentRecord) or inner.class_name != model_type or model_type not in UNETS:
        found = inner.class_name if isinstance(inner, PersistentRecord) else type(inner).__name__
        raise InputError(f"{what}: {precond}.model is a {found}; expected the {model_type} its arguments name "
                         f"(cpcluster knows {', '.join(UNETS)})")
    model_kwargs = {**UNETS[model_type][1], **constructor_kwargs(
        inner, ("img_resolution", "in_channels", "out_channels", *UNETS[model_type][1]), what)}
    own = {**COMMON_KWARGS, **FORWARD_KWARGS[precond]}
    for key, value in given.items():  # the preconditioner passes every other argument on to its network
        if key not in PRECOND_SIGNATURES[precond] and model_kwargs.get(key) != value:
            raise InputError(f"{what}: {precond} was given {key}={value!r} but its {model_type} records "
                             f"{model_kwargs.get(key)!r}")
    precond_kwargs = {k: given.get(k, default) for k, default in own.items()}
    dropped = sorted(k for k in given if k in PRECOND_SIGNATURES[precond] and k not in own)
    config = {"precond": precond, "precond_kwargs": _plain(precond_kwargs, what), "model_type": model_type,
              "model_kwargs": _plain(model_kwargs, what)}
    json.dumps(config)
    return config, dropped


def convert(source: str, options: dict, what: str) -> Converted:
    """See the module docstring. ``options``: ``which`` (the snapshot dict's key, default ``ema``)."""
    from cpcluster.convert.edm_unpickler import PersistentRecord
    from cpcluster.models.archs.edm_precond import PRECONDS

    which = options.get("which", "ema")
    top = read_snapshot(source, what)
    if not isinstance(top, dict):
        raise InputError(f"{what}: holds a {type(top).__name__}, not EDM's snapshot dict {{'ema': network, ...}}")
    if which not in top:
        keys = ", ".join(sorted(map(str, top))) or "none"
        raise InputError(f"{what}: the snapshot has no {which!r} entry (its keys: {keys}); choose one with "
                         "--set which=KEY")
    net = top[which]
    if not isinstance(net, PersistentRecord) or net.class_name not in PRECONDS:
        found = net.class_name if isinstance(net, PersistentRecord) else type(net).__name__
        raise InputError(f"{what}: {which!r} is a {found}, not one of EDM's networks ({', '.join(PRECONDS)})")
    config, dropped = arch_config(net, what)
    state = flat_state(net, what)
    pk, mk = config["precond_kwargs"], config["model_kwargs"]
    label_dim = pk["label_dim"]
    meta = {"kind": "edm", "preconditioned": True, "num_classes": label_dim or None}
    if "sigma_data" in pk:
        meta["sigma_data"] = pk["sigma_data"]
    notes = [f"{which}: {net.class_name} around {config['model_type']}, "
             + (f"class-conditional ({label_dim} classes, one-hot inside)" if label_dim else "unconditional")
             + "; its output is the denoiser D(x; sigma) (time input: sigma, model space)",
             f"the network's embedded source code (sha256 {net.module_src_sha256[:12]}...) was not run; "
             "cpcluster's own implementation with EDM's key names is used"]
    if pk.get("use_fp16"):
        notes.append("the pickle asks for float16 (use_fp16): cpcluster computes in float32 unless certify --dtype "
                     "says otherwise")
    if dropped:
        notes.append(f"not part of the denoiser, not recorded: {', '.join(dropped)} (the sampler's noise range)")
    if mk.get("augment_dim"):
        notes.append(f"augment_dim={mk['augment_dim']}: the augmentation-label input gets nothing, as in EDM's "
                     "sampler")
    info = {"which": which, "precond": net.class_name, "model_type": config["model_type"],
            "module_src_sha256": net.module_src_sha256, "snapshot_keys": sorted(map(str, top))}
    return Converted(state=state, architecture="edm-precond", arch_config=config, meta=meta, notes=notes,
                     source_info=info)
