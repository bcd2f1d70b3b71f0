"""Write files and directories so that a crash never leaves a half-written result in place.

Files go to a temporary name in the same directory and are `os.replace`d into place.
Directories are built under a temporary sibling `.<name>.*.tmp` and swapped in: on Linux with one
atomic exchange (`renameat2(RENAME_EXCHANGE)`), so the target never goes missing; elsewhere, or
on a file system without it, with two renames through `.<name>.*.old`. A process killed between
those two renames leaves the target missing and its previous content in `.old`:
`recover_directory` (run by the next `atomic_directory` on that target) puts it back and removes
the debris a killed writer leaves, its temporaries included. Two processes must not write the same
target at once.

Results get the permissions a plain `open()` / `mkdir()` would give (0666 / 0777 less the umask),
not the owner-only ones of `mkstemp` / `mkdtemp`, so a shared group can read exported models.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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


def write_jsonl_atomic(path: str | os.PathLike, records) -> int:
    """One JSON object a line (each record's `to_json()`), written atomically; returns the count."""
    lines = [json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records]
    write_text_atomic(path, "".join(lines))
    return len(lines)


# ----------------------------------------------------------------------------- directories


def _siblings(path: Path, suffix: str) -> list[Path]:
    """`.<name>.*<suffix>` entries beside `path`, oldest first."""
    found = path.parent.glob(f".{glob.escape(path.name)}.*{suffix}")
    return sorted(found, key=lambda p: p.lstat().st_mtime_ns)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_directory(path: str | os.PathLike) -> bool:
    """Undo what a writer of `path` killed mid-swap left: when `path` is missing, its newest
    `.old` copy is renamed back; leftover `.old` copies and `.tmp` temporaries are removed.
    True when a previous directory was restored."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    olds, restored = _siblings(path, ".old"), False
    if olds and not os.path.lexists(path):
        os.rename(olds.pop(), path)
        restored = True
    for debris in olds + _siblings(path, ".tmp"):
        _remove(debris)
    return restored


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    platform or the file system cannot, so the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path` and remove what was there."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if exchange_paths(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # it now holds the previous directory
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if not os.path.lexists(path):
            os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
