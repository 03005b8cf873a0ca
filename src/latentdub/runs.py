"""Runs of equal values in 1-D arrays: the one helper behind render windows, pass-through
ranges and face-selection runs."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def runs(values: np.ndarray | list[Any], *also: np.ndarray) -> list[tuple[int, int, Any]]:
    """``[(start, stop, value), …]`` for each maximal stretch of equal ``values`` (stop exclusive).

    Arrays in ``also`` (same length) split runs too, wherever any of them changes; ``value`` is
    always taken from ``values``.
    """
    arr = np.asarray(values)
    n = len(arr)
    if n == 0:
        return []
    changed = arr[1:] != arr[:-1]
    for other in also:
        other = np.asarray(other)
        if len(other) != n:
            raise ValueError("runs: all arrays must have the same length")
        changed = changed | (other[1:] != other[:-1])
    bounds = np.concatenate([[0], np.flatnonzero(changed) + 1, [n]])
    return [(int(a), int(b), _plain(arr[a])) for a, b in itertools.pairwise(bounds)]


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` of the True stretches of a boolean array."""
    return [(a, b) for a, b, value in runs(np.asarray(mask, dtype=bool)) if value]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
