"""Atomic file writes: write to a temp file in the target directory, fsync, then rename over the target.

Files get the mode an ordinary ``open()`` would give them (``0o666 & ~umask``: 0644 under umask 022, 0600 under
077), not the 0600 that :func:`tempfile.mkstemp` creates them with.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DfmpcError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_with", "current_umask",
           "file_mode", "dir_mode"]


def current_umask() -> int:
    """The process umask, e.g. ``0o022``.

    Read from ``/proc/self/status`` (Linux >= 4.7), which changes nothing; elsewhere through ``os.umask`` set and
    restored at once, which is racy only against another thread creating files in that instant.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def file_mode() -> int:
    """Mode of a new regular file under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new directory under the current umask (``0o777 & ~umask``)."""
    return 0o777 & ~current_umask()


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` then rename ``tmp_path`` to ``path``; on any failure nothing is left behind.

    The file ends with mode ``0o666 & ~umask`` (``writer`` may replace ``tmp_path``; its mode is then its own).

    Raises:
        DfmpcError: on permission problems or a full disk (one clear line instead of an OSError traceback).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise DfmpcError(f"could not write {path}: {err.strerror or err}") from err
    tmp_path = Path(tmp)
    try:
        try:
            os.fchmod(fd, file_mode())  # mkstemp makes 0600; give the file the mode open() would
        finally:
            os.close(fd)
        writer(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise DfmpcError(f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write_with(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (keys in insertion order, trailing newline).

    Raises:
        ValueError: ``obj`` holds NaN or infinity, which JSON cannot represent (``allow_nan=False``).
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
