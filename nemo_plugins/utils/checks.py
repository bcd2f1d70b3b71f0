"""Value checks for config dataclasses, with one message shape: the full key, the value given and
what was expected (`parent.lr=nan: expected a finite number > 0`).

Call them from `__post_init__` with the section's prefix, e.g.
`checks.positive_ints(self, "parent", "steps", "batch_size")`.
"""

from __future__ import annotations

import math


def _require(obj, prefix: str, names, ok, expected: str) -> None:
    for name in names:
        if not ok(getattr(obj, name)):
            raise ValueError(f"{prefix}.{name}={getattr(obj, name)!r}: expected {expected}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_ints(obj, prefix: str, *names: str) -> None:
    _require(obj, prefix, names, lambda v: _is_int(v) and v > 0, "a positive integer")


def non_negative_ints(obj, prefix: str, *names: str) -> None:
    _require(obj, prefix, names, lambda v: _is_int(v) and v >= 0, "an integer >= 0")


def positive_numbers(obj, prefix: str, *names: str) -> None:
    _require(obj, prefix, names, lambda v: _is_number(v) and v > 0, "a finite number > 0")


def non_negative_numbers(obj, prefix: str, *names: str) -> None:
    _require(obj, prefix, names, lambda v: _is_number(v) and v >= 0, "a finite number >= 0")


def fractions(obj, prefix: str, *names: str) -> None:
    _require(obj, prefix, names, lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")


def non_empty(obj, prefix: str, *names: str) -> None:
    _require(obj, prefix, names, bool, "a non-empty list")
