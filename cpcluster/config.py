"""Frozen dataclass configs, one per job kind. They are what gets pickled, hashed and written beside results."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cpcluster.errors import InputError


# ------------------------------------------------------------------------------------------------------ aggregate
AGGREGATE_FORMATS = ("md", "latex", "csv")
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class AggregateOptions:
    """One ``cpcluster aggregate`` run (DESIGN.md section 5, ``aggregate/pipeline.py``).

    ``paths`` are shard files, globs, directories or fsspec URLs; ``radii`` are pixel-space L2 radii for the table;
    ``out`` is the output folder (None: ``<deepest folder holding every input>/aggregate``). Invalid values raise
    :class:`InputError` at construction.
    """

    paths: tuple
    alpha: float = 0.001
    radii: tuple = DEFAULT_RADII
    out: str | None = None
    allow_partial: bool = False
    format: str = "md"
    plot: bool = True

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "radii", tuple(float(r) for r in self.radii))
        if not self.paths:
            raise InputError("no PATHS given: name shard files, globs or run folders, e.g. results/*.h5")
        if not 0.0 < float(self.alpha) < 1.0:  # also refuses NaN
            raise InputError(f"--alpha {self.alpha}: must lie strictly between 0 and 1, e.g. 0.001")
        if not self.radii or any(not (0.0 <= r < float("inf")) for r in self.radii):
            raise InputError(f"--radii {','.join(map(str, self.radii)) or '(empty)'}: give finite radii >= 0, "
                             "e.g. --radii 0,0.25,0.5,0.75,1.0")
        if len(set(self.radii)) != len(self.radii) or list(self.radii) != sorted(self.radii):
            raise InputError(f"--radii {','.join(f'{r:g}' for r in self.radii)}: list each radius once, "
                             "in increasing order")
        if self.format not in AGGREGATE_FORMATS:
            raise InputError(f"--format {self.format!r}: use one of {', '.join(AGGREGATE_FORMATS)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["paths"], d["radii"] = list(self.paths), list(self.radii)
        return d
