"""Wall time and peak memory per stage, and handing freed memory back to the OS between stages.

Peak RSS is the process's high-water mark (`getrusage`), so a stage's figure is the largest the
process has been by the end of that stage; the largest over a run is the run's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import time
from contextlib import contextmanager


def peak_rss_gb() -> float:
    """The process's peak resident set size so far, in GB (10^9 bytes)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024) / 1e9


def release_memory() -> None:
    """Collect reference cycles (Lightning keeps finished trainers' models and optimizer state
    in them) and return glibc's free heap pages to the OS, so the next stage starts lean instead
    of growing the high-water mark on top of the last stage's fragments."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


@contextmanager
def measured(into: dict):
    """Fill `into` with wall_s and peak_rss_gb of the block it wraps."""
    start = time.perf_counter()
    try:
        yield into
    finally:
        into["wall_s"] = round(time.perf_counter() - start, 2)
        into["peak_rss_gb"] = round(peak_rss_gb(), 3)
