"""NeMo 2 adapter: megatron-core layer specs and model classes for Puzzle children, checkpoint
conversion with registered HF importer/exporter, and NeMo-Run recipes and executors.

Everything under `nemo_plugins.nemo` needs the `nemo` extra (nemo-toolkit 2.7.3, nemo-run,
megatron-core). The core package never imports it; modules here import NeMo lazily through
`require_nemo`, so a missing extra fails with one clear message instead of an ImportError deep
inside NeMo.
"""

from __future__ import annotations

import importlib

INSTALL_HINT = 'pip install -c constraints.txt -e ".[nemo]"  (nemo-toolkit[llm]==2.7.3, nemo-run, megatron-core)'


class NemoNotInstalled(ImportError):
    """The `nemo` extra is missing."""


def require_nemo(module: str = "nemo.collections.llm"):
    """Import `module` (a NeMo, NeMo-Run or megatron-core module) or fail naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise NemoNotInstalled(
            f"nemo_plugins.nemo needs the `nemo` extra ({module} could not be imported: {e}). Install it with: "
            f"{INSTALL_HINT}"
        ) from e


def nemo_available() -> bool:
    """True when nemo-toolkit's LLM collection, NeMo-Run and megatron-core all import."""
    for module in ("megatron.core", "nemo_run", "nemo.collections.llm"):
        try:
            importlib.import_module(module)
        except ImportError:
            return False
    return True


def refuse_in_spawned_import(what: str) -> None:
    """Raise a RuntimeError naming `what` when called while a process started with "spawn"
    imports the main script: the script has no `if __name__ == "__main__":` guard and its
    top-level code runs again in that helper process, where a conversion would hang or clash
    with the parent's."""
    import multiprocessing
    import sys

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        script = getattr(sys.modules.get("__mp_main__"), "__file__", None) or "the main script"
        raise RuntimeError(
            f"{what} was called while a helper process (multiprocessing 'spawn') imports {script}: put the "
            "script's top-level code under `if __name__ == \"__main__\":`"
        )
