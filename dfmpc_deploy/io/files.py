"""The one bounded reader for every input file, what a file is by its content, and OS errors as one line.

Every file the tool reads (weights, labels, grid TOML, ``report.json`` for ``build --from-report``, images, CIFAR
batches) goes through :func:`read_regular_file` or :func:`open_regular`: only a regular file is opened (a FIFO,
device, socket or directory is refused without blocking: ``O_NONBLOCK`` + ``fstat`` before the first read), its size
is checked against the caller's limit *before* anything is allocated, a file that grows while being read is refused,
and every ``OSError`` (ENOENT, EACCES, ENAMETOOLONG, ELOOP, EISDIR, ...) becomes one :class:`DfmpcError` line
naming the file (:func:`os_error_line`). A sparse file (holes that read as zeros: ``st_size`` far above the blocks
the disk holds) is refused where its bytes would be loaded whole (:func:`check_not_sparse`): a file of a few KB on
disk may not make the reader allocate hundreds of MB.

:func:`sniff` says what a file is from its first bytes, whatever its name: a ``.pth`` that is safetensors, or a
``.dfmpc`` given as ``--weights``, is named as what it is.
"""
from __future__ import annotations

import errno
import os
import stat
import struct

from ..errors import DfmpcError

__all__ = ["read_regular_file", "open_regular", "file_kind", "os_error_line", "sniff", "check_not_sparse", "emit",
           "silence_stdout",
           "SPARSE_SLACK", "printable_path"]

#: bytes a file's ``st_size`` may exceed what its disk blocks hold before it counts as sparse (filesystems allocate
#: in blocks and may store a short tail inline; a written file never has holes this large)
SPARSE_SLACK = 1 << 20


def printable_path(path: str | os.PathLike, limit: int = 200) -> str:
    """``path`` safe for a terminal: control characters escaped, long paths shortened in the middle."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    out = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape", "backslashreplace")
                  .decode("ascii") for c in text)
    return out if len(out) <= limit else out[: limit // 2 - 2] + "..." + out[-(limit // 2 - 1):]


def os_error_line(err: OSError, what: str = "", path: str | os.PathLike | None = None) -> str:
    """One line for an ``OSError``: ``cannot read weights file 'x': File name too long; shorten the path``.

    Args:
        err: the error.
        what: what the file is ("weights file"; empty: only the path).
        path: the file (default: the error's own ``filename``).
    """
    name = path if path is not None else err.filename
    reason = err.strerror or (errno.errorcode.get(err.errno, "") if err.errno else "") or type(err).__name__
    hint = {errno.ENAMETOOLONG: "; shorten the path", errno.ENOSPC: "; free some disk space",
            errno.EACCES: "; check its permissions", errno.ELOOP: "; a symbolic link loops"}.get(err.errno or 0, "")
    where = f" {what}" if what else ""
    target = f" '{printable_path(name)}'" if name is not None else ""
    if err.errno == errno.ENOENT and target:
        return f"{what or 'file'}{target} does not exist"
    return f"cannot read{where}{target}: {reason}{hint}"


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_not_sparse(st: os.stat_result, what: str, path: str | os.PathLike) -> None:
    """Refuse a file whose size is far above the bytes its disk blocks hold (a sparse file: its holes would be
    allocated as zeros on reading). Filesystems that report no block count are not checked."""
    blocks = getattr(st, "st_blocks", None)
    if blocks is None or st.st_size <= SPARSE_SLACK:
        return
    on_disk = blocks * 512
    if on_disk + SPARSE_SLACK < st.st_size // 2:
        raise DfmpcError(f"{what} '{printable_path(path)}' is a sparse file: {st.st_size:,} bytes long but only "
                         f"{on_disk:,} on disk (the rest are holes); no file this tool writes has holes: copy it "
                         f"without them (cp --sparse=never) if it is genuine")


def open_regular(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None,
                 sparse_ok: bool = True) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking and check it is a regular file (of at most ``max_bytes``).

    Returns:
        ``(fd, stat)``; the caller closes ``fd``.

    Raises:
        DfmpcError: one line naming the file: missing, unreadable, not a regular file, too large, or sparse.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as err:  # ValueError: an embedded NUL byte
        if isinstance(err, OSError):
            raise DfmpcError(os_error_line(err, what, path)) from None
        raise DfmpcError(f"cannot read {what} '{printable_path(path)}': {err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DfmpcError(f"{what} '{printable_path(path)}' is {file_kind(st.st_mode)}, not a regular file; give "
                             f"the path of a file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise DfmpcError(f"{what} '{printable_path(path)}' is {_size(st.st_size)}, more than the "
                             f"{_size(max_bytes)} limit for such a file; remove or shrink it")
        if not sparse_ok:
            check_not_sparse(st, what, path)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n:,} bytes"


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """Read a whole regular file of at most ``max_bytes`` bytes (see the module docstring).

    Raises:
        DfmpcError: missing, unreadable, not a regular file, larger than ``max_bytes``, sparse, or grown past the
            limit while being read.
    """
    fd, st = open_regular(path, what, max_bytes, sparse_ok=False)
    try:
        chunks, total = [], 0
        while total <= max_bytes:  # the file may grow after fstat: never read past the limit
            chunk = os.read(fd, min(1 << 22, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise DfmpcError(f"{what} '{printable_path(path)}' grew past the {_size(max_bytes)} limit while being "
                             f"read")
        return b"".join(chunks)
    except OSError as err:
        raise DfmpcError(os_error_line(err, what, path)) from None
    finally:
        os.close(fd)


def sniff(head: bytes) -> str:
    """What a file is, from its first bytes (16 are enough): ``zip`` (a torch checkpoint), ``pickle`` (a legacy
    torch file or another pickle), ``safetensors``, ``dfmpc`` (a packed model); anything else is ``unknown``."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"DFMPC") or head.startswith(b"\x89DFMPC"):
        return "dfmpc"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def silence_stdout() -> None:
    """Point descriptor 1 at /dev/null, so the interpreter's own flush of a stdout that failed (closed pipe, full
    disk) at exit raises nothing."""
    import sys

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def emit(text: str, end: str = "\n") -> None:
    """Write ``text`` to stdout and flush: the one way the CLI prints results (JSON included, so ``--json`` output
    is only JSON). A reader that closed the pipe (``| head -1``) ends the output quietly; any other write error
    (``> /dev/full``: ENOSPC, EIO) is one line.

    Raises:
        DfmpcError: stdout cannot be written (naming why).
    """
    import sys

    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    except OSError as err:
        silence_stdout()
        raise DfmpcError(f"cannot write the output to stdout: {err.strerror or err}") from None
