"""Every fixed choice list of cpcluster, and the checks of a choice, defined once (commands, configs and jobs import
them from here). The purifier names are the keys of their registry (:data:`cpcluster.models.purifiers.PURIFIERS`);
a spec's kinds are the keys of its table in :mod:`cpcluster.models.specs`.
"""
from __future__ import annotations

from cpcluster.util.errors import InputError

MODES = ("certify", "predict")  # CERTIFY (selection + estimation) or PREDICT (estimation only)
DTYPES = ("float32", "bfloat16", "float16")  # forward precision of certification (autocast)
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when the job sees a GPU, else CPU
TIME_RULES = ("nearest", "exact")  # t_sigma: the training-grid point nearest 2 sigma, or 2 sigma itself
EXECUTORS = ("auto", "local", "slurm", "debug")  # where jobs run (cpcluster.orchestrate.submit)
AGGREGATE_FORMATS = ("md", "latex", "csv")
FINETUNE_LOSSES = ("lpips", "l2", "l1")
LPIPS_NETS = ("vgg", "alex")
OPTIMIZERS = ("sgd", "radam")
SCHEDULES = ("constant", "cosine", "step")
BATCHNORM_MODES = ("train", "frozen", "sync")


def check_label_policy(text) -> str:
    """``--purifier-label``: ``random`` or ``fixed:K`` with K a non-negative integer; InputError otherwise."""
    kind, _, value = str(text).partition(":")
    if not isinstance(text, str) or (text != "random" and not (kind == "fixed" and value.isascii()
                                                                and value.isdigit() and len(value) <= 9)):
        raise InputError(f"--purifier-label {text!r}: use 'random' or 'fixed:K' with K a class index, e.g. fixed:0")
    return text


SOLVER_STEPS_GRID = "grid"  # pf-ode: walk the rest of the network's training grid from t_sigma (the paper's PF-ODE)


def check_solver_steps(value, flag: str = "--solver-steps"):
    """pf-ode solver steps: None (the purifier's default), an integer >= 1, or ``"grid"``; InputError otherwise."""
    if value is None or value == SOLVER_STEPS_GRID:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{flag} {value!r}: give a number of steps >= 1, or 'grid' (the rest of the training grid)")
    return value


def check_choice(option: str, value, allowed) -> None:
    """:class:`InputError` naming ``option`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise InputError(f"{option} {value!r}: use one of {', '.join(allowed)}")


def check_choices(cfg, choices: dict, flags: dict | None = None) -> None:
    """:class:`InputError` naming the option when a field of ``cfg`` is not one of its ``choices[field]``; the option
    is ``--field-name`` unless ``flags`` names it."""
    for name, allowed in choices.items():
        check_choice((flags or {}).get(name, "--" + name.replace("_", "-")), getattr(cfg, name), allowed)
