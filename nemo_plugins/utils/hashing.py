"""Short content keys for cache entries: what every cached artefact (tiny world, trained library,
training runs, evaluations) is stored under, so a changed input never reuses another's result."""

from __future__ import annotations

import hashlib
import json

KEY_VERSION = 1  # bump when anything cached changes meaning, so stale entries are not reused


def config_hash(*parts) -> str:
    """12 hex digits of SHA-256 over the JSON of `parts` (keys sorted; other objects by str)."""
    blob = json.dumps([KEY_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
