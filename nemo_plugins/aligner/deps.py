"""Lazy imports of NeMo-Aligner, NeMo and PyTriton with a message that says how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = (
    "install the `aligner` extra in a venv of its own (NeMo-Aligner 0.7.0 needs NeMo 2.3.3): "
    "see the README section 'NeMo-Aligner plugins' and constraints-aligner.txt"
)


def require(module: str, needed_for: str) -> ModuleType:
    """`module` imported, or ImportError naming what needs it and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{needed_for} needs {module!r} ({e}); {INSTALL_HINT}") from e
