"""Job-array chunking: SLURM refuses arrays larger than ``MaxArraySize`` (default 1001), and submitit does not split.

:func:`split_array` cuts ``n`` array tasks into consecutive ranges of at most ``max_size`` tasks; each range is
submitted as its own array (task ``t`` of chunk ``c`` is item ``c * max_size + t``). Same contract as
``cpcluster.sharding.arrays.split_array``, which submits the chunks.
"""
from __future__ import annotations

from cpcluster.util.errors import InputError

DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize: array indices 0..1000


def split_array(n: int, max_size: int = DEFAULT_MAX_ARRAY_SIZE) -> list[range]:
    """Consecutive ranges covering ``range(n)``, each of at most ``max_size`` (all full except maybe the last).

    ``split_array(12, 5) == [range(0, 5), range(5, 10), range(10, 12)]``; ``split_array(0, k) == []``.
    Raises :class:`InputError` for ``n < 0`` or ``max_size < 1``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"number of array tasks must be an integer >= 0, got {n!r}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise InputError(f"maximum array size must be a positive integer (SLURM MaxArraySize), got {max_size!r}")
    return [range(a, min(a + max_size, n)) for a in range(0, n, max_size)]
