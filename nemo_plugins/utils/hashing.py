"""Short content keys for cache entries: what every cached artefact (tiny world, trained library,
training runs, evaluations) is stored under, so a changed input never reuses another's result."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

KEY_VERSION = 1  # bump when anything cached changes meaning, so stale entries are not reused


def config_hash(*parts) -> str:
    """12 hex digits of SHA-256 over the JSON of `parts` (keys sorted; other objects by str)."""
    blob = json.dumps([KEY_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


PACKAGE_DIR = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def source_digest(*parts: str) -> str:
    """12 hex digits over the source of the package's `parts` (sub-packages such as "data" or
    files such as "utils/training.py"; names and bytes, in path order). Caches shared across
    runs (the tiny world, the tiny parent, a trained block library) put it in their keys, so a
    change to the code that made an entry is a new entry, not a silent reuse of the old one."""
    h = hashlib.sha256()
    for part in parts:
        path = PACKAGE_DIR / part
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"source_digest: {path} holds no Python source")
        for f in files:
            h.update(str(f.relative_to(PACKAGE_DIR)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]
