"""Write files and directories so that a crash never leaves a half-written result in place.

Files go to a temporary name in the same directory and are `os.replace`d into place.
Directories are built under a temporary sibling and swapped in with two renames; until
the first rename the previous directory is untouched, and a failure cleans up the temporary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render a matplotlib figure (format from the suffix, PNG by default) and write it atomically."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data, **kwargs) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, **kwargs) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        # Put the previous directory back (if it was moved aside) and drop the temporary.
        if old is not None and old.exists() and not path.exists():
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
