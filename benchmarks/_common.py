"""
What the benchmarks share: reading a value out of a run's nested results,
units, and the table cell that shows the median of several runs with their
range.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable


def ms(value: float | None) -> float | None:
    """
    Seconds as milliseconds.
    """
    return None if value is None else 1000 * value


def mib(value: float | None) -> float | None:
    """
    Bytes as MiB.
    """
    return None if value is None else value / 2**20


def get(*keys: str, scale: Callable[[Any], Any] = lambda v: v) -> Callable[[dict], Any]:
    """
    A function that reads C{result[keys[0]][keys[1]]...}, scaled, or None if
    any step is missing.
    """
    def read(result: dict) -> Any:
        value: Any = result
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return None if value is None else scale(value)
    return read


def cell(values: list[Any], fmt: str, bound: bool = False) -> str:
    """
    The median of C{values} and, for several runs, their min..max (and how
    many runs had none); "<=" marks a median that is an upper bound.
    """
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    median = ("<=" if bound else "") + fmt.format(statistics.median(present))
    if len(values) == 1:
        return median
    spread = f"{fmt.format(min(present))}..{fmt.format(max(present))}"
    missing = f", {len(values) - len(present)} n/a" if len(present) < len(values) else ""
    return f"{median} ({spread}{missing})"
