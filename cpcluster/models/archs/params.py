"""Typed reads of an architecture config (a JSON object), for the builders in :mod:`cpcluster.models.archs`.

Every reader takes the config, a key, ``what`` (for the error) and bounds, and raises :class:`InputError` naming the
key, the value and the allowed range. Bounds keep a tiny config from asking for an impossible network (10^6 layers,
10^9 channels) before anything is allocated.
"""
from __future__ import annotations

from cpcluster.util.errors import InputError

_MISSING = object()


def _get(config: dict, key: str, what: str, default):
    value = config.get(key, default)
    if value is _MISSING:
        raise InputError(f"{what}: the architecture config lacks {key!r}")
    return value


def get_int(config: dict, key: str, what: str, lo: int, hi: int, default=_MISSING) -> int:
    """An int in [lo, hi] (bools are refused)."""
    value = _get(config, key, what, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{what}: architecture config {key}={value!r}; expected an integer in [{lo}, {hi}]")
    return value


def get_optional_int(config: dict, key: str, what: str, lo: int, hi: int) -> int | None:
    """None (absent or null) or an int in [lo, hi]."""
    return None if config.get(key) is None else get_int(config, key, what, lo, hi)


def get_float(config: dict, key: str, what: str, lo: float, hi: float, default=_MISSING) -> float:
    """A finite number in [lo, hi]."""
    value = _get(config, key, what, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise InputError(f"{what}: architecture config {key}={value!r}; expected a number in [{lo}, {hi}]")
    return float(value)


def get_bool(config: dict, key: str, what: str, default=_MISSING) -> bool:
    value = _get(config, key, what, default)
    if not isinstance(value, bool):
        raise InputError(f"{what}: architecture config {key}={value!r}; expected true or false")
    return value


def get_choice(config: dict, key: str, what: str, choices: tuple, default=_MISSING) -> str:
    value = _get(config, key, what, default)
    if value not in choices:
        raise InputError(f"{what}: architecture config {key}={value!r}; expected one of {', '.join(map(str, choices))}")
    return value


def get_int_list(config: dict, key: str, what: str, lo: int, hi: int, max_len: int, default=_MISSING,
                 min_len: int = 0) -> tuple[int, ...]:
    """A list of ints, each in [lo, hi], of length in [min_len, max_len]."""
    value = _get(config, key, what, default)
    if (not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len
            or any(isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi for v in value)):
        raise InputError(f"{what}: architecture config {key}={value!r}; expected {min_len}..{max_len} integers in "
                         f"[{lo}, {hi}]")
    return tuple(value)


def check_keys(config: dict, known, what: str) -> None:
    """Refuse keys the builder does not know (a typo would otherwise silently build another network)."""
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise InputError(f"{what}: unknown architecture config key(s) {unknown}; known: {', '.join(sorted(known))}")
