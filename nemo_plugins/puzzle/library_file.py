"""The MIP's input file: a block library as plain JSON, read and checked.

    {group: {variant: {"stats": {key: number, ...}, "metrics": {key: number, ...}}}}

A group is what the search fills with exactly one variant: a layer ("0", "1", ...) or, in
decoupled mode, a sub-block ("0.attention", "0.ffn"). "stats" are costs (params, memory, runtime,
KV cache, ...), "metrics" are quality scores (e.g. kl_div). Keys are named `stats.KEY` or
`metrics.KEY`; a bare `KEY` is accepted when it names exactly one of the two.

Every problem is reported as a `LibraryError` naming the group, the variant and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

SECTIONS = ("stats", "metrics")
_PLAIN = frozenset((int, float))


class MipError(ValueError):
    """Base class of the MIP's user-facing errors (bad library, bad bounds, infeasible budget)."""


class LibraryError(MipError):
    """The library (file or dict) is malformed; the message names the group, variant and key."""


class InfeasibleBudgetError(MipError):
    """No choice meets the bounds. `key`/`sense`/`bound`: the binding constraint;
    `best_value`: the smallest (sense "max") or largest (sense "min") value it can take."""

    def __init__(self, message: str, *, key: str, sense: str, bound: float, best_value: float | None):
        super().__init__(message)
        self.key, self.sense, self.bound, self.best_value = key, sense, bound, best_value


class MipTimeoutError(MipError):
    """The time limit passed before any feasible choice was found."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def resolve_key(library: dict, key: str) -> tuple[str, str]:
    """`"stats.memory_mib"` -> `("stats", "memory_mib")`; a bare key is looked up in the first variant."""
    if not isinstance(key, str) or not key:
        raise LibraryError(f"key {key!r}: expected 'stats.KEY' or 'metrics.KEY'")
    section, dot, name = key.partition(".")
    if dot and section in SECTIONS and name:
        return section, name
    first = next((v for g in library.values() if isinstance(g, dict) for v in g.values()), None)
    found = [s for s in SECTIONS if isinstance(first, dict) and isinstance(first.get(s), dict) and key in first[s]]
    if len(found) == 1:
        return found[0], key
    if len(found) == 2:
        raise LibraryError(f"key {key!r} is ambiguous: write stats.{key} or metrics.{key}")
    raise LibraryError(f"key {key!r}: no variant has stats.{key} or metrics.{key} (write 'stats.KEY' or 'metrics.KEY')")


def canonical_key(library: dict, key: str) -> str:
    """`key` as "stats.KEY" or "metrics.KEY" (see `resolve_key`)."""
    return ".".join(resolve_key(library, key))


def _explain(where: str, entry, needed) -> None:
    """Raise the LibraryError for one variant that failed the fast check (if it is really bad)."""
    if not isinstance(entry, dict):
        raise LibraryError(f"{where}: expected an object with 'stats' and 'metrics', got {type(entry).__name__}")
    for section in SECTIONS:
        values = entry.get(section)
        if values is None:
            raise LibraryError(f"{where}: missing {section!r}")
        if not isinstance(values, dict):
            raise LibraryError(f"{where}: {section!r} must be an object of numbers, got {type(values).__name__}")
        for k, v in values.items():
            if not _is_number(v):
                raise LibraryError(f"{where}: {section}.{k} = {v!r} is not a finite number")
            if section == "stats" and v < 0:
                raise LibraryError(f"{where}: stats.{k} = {v!r} is negative; stats are costs (parameters, memory, "
                                   "time, ...) and must be >= 0")  # fmt: skip
    for key, section, k in needed:
        if k not in entry[section]:
            raise LibraryError(f"{where}: has no {section}.{k} (needed for {key!r})")


def validate_library(library, keys: Iterable[str] = (), *, source: str = "library") -> dict:
    """Check the structure and return `library` unchanged.

    Every group is a non-empty dict of variants; every variant has "stats" and "metrics" dicts of
    finite numbers, the stats (costs) >= 0; every key in `keys` (objective and constraint keys) is present in every variant.
    """
    scan_library(library, keys, source=source)
    return library


def scan_library(library, keys: Iterable[str] = (), *, source: str = "library") -> list[list[float]]:
    """`validate_library`, also returning, for each key, its value in every variant (library order)."""
    if not isinstance(library, dict):
        raise LibraryError(f"{source}: expected a JSON object {{group: {{variant: ...}}}}, got {type(library).__name__}")
    if not library:
        raise LibraryError(f"{source}: has no groups")
    needed = [(k, *resolve_key(library, k)) for k in keys]
    try:  # fast path: a few C-level passes, checks at the end; the slow one finds and names a problem
        if not all(type(variants) is dict and variants for variants in library.values()):
            raise TypeError
        entries = [entry for variants in library.values() for entry in variants.values()]
        stats: list = []
        metrics: list = []
        for entry in entries:
            stats.extend(entry["stats"].values())
            metrics.extend(entry["metrics"].values())
        columns = [[entry[section][k] for entry in entries] for _, section, k in needed]
        values = stats + metrics
        if _PLAIN.issuperset(map(type, values)) and math.isfinite(sum(values)) and min(stats, default=0) >= 0:
            return columns
    except Exception:
        pass
    _explain_library(library, needed, source)  # raises, unless only the fast check was too strict
    entries = [entry for variants in library.values() for entry in variants.values()]
    return [[entry[section][k] for entry in entries] for _, section, k in needed]


def _explain_library(library: dict, needed, source: str) -> None:
    for group, variants in library.items():
        if not isinstance(variants, dict):
            raise LibraryError(f"{source}: group {group!r}: expected an object of variants, got {type(variants).__name__}")
        if not variants:
            raise LibraryError(f"{source}: group {group!r} has no variants")
        for name, entry in variants.items():
            _explain(f"{source}: group {group!r}, variant {name!r}", entry, needed)


def load_library(path: str | Path) -> dict:
    """Read and validate a library JSON file (LibraryError on any problem, naming the file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LibraryError(f"cannot read library file {str(path)!r}: {e.strerror or e}") from None
    try:
        library = json.loads(text)
    except json.JSONDecodeError as e:
        raise LibraryError(f"library file {str(path)!r} is not valid JSON: {e}") from None
    return validate_library(library, source=f"library file {str(path)!r}")
