"""Value checks for config dataclasses, with one message shape: the full key, the value given and
what was expected (`parent.lr=nan: expected a finite number > 0`).

Call them from `__post_init__` with the section's prefix, e.g.
`checks.positive_ints(self, "parent", "steps", "batch_size")`.
"""

from __future__ import annotations

import math


def _fail(obj, prefix: str, name: str, expected: str):
    raise ValueError(f"{prefix}.{name}={getattr(obj, name)!r}: expected {expected}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_ints(obj, prefix: str, *names: str) -> None:
    for name in names:
        if not (_is_int(getattr(obj, name)) and getattr(obj, name) > 0):
            _fail(obj, prefix, name, "a positive integer")


def non_negative_ints(obj, prefix: str, *names: str) -> None:
    for name in names:
        if not (_is_int(getattr(obj, name)) and getattr(obj, name) >= 0):
            _fail(obj, prefix, name, "an integer >= 0")


def positive_numbers(obj, prefix: str, *names: str) -> None:
    for name in names:
        if not (_is_number(getattr(obj, name)) and getattr(obj, name) > 0):
            _fail(obj, prefix, name, "a finite number > 0")


def non_negative_numbers(obj, prefix: str, *names: str) -> None:
    for name in names:
        if not (_is_number(getattr(obj, name)) and getattr(obj, name) >= 0):
            _fail(obj, prefix, name, "a finite number >= 0")


def fractions(obj, prefix: str, *names: str) -> None:
    for name in names:
        if not (_is_number(getattr(obj, name)) and 0 <= getattr(obj, name) <= 1):
            _fail(obj, prefix, name, "a number in [0, 1]")


def non_empty(obj, prefix: str, *names: str) -> None:
    for name in names:
        if not getattr(obj, name):
            _fail(obj, prefix, name, "a non-empty list")
