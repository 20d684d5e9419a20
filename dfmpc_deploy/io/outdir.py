"""The build's output directory (``--out``): checked before any work, locked, filled aside, swapped in at the end.

``with OutputDir(out, force=...) as work:`` is the whole contract. What it guarantees:

* **Checked first.** :func:`check_out_dir` runs before anything is created and refuses, with one
  :class:`DfmpcError` line naming the value and the fix: a path ending in ``.``/``..`` or ``/``; the current
  directory, the home directory, the Python environment (``sys.prefix``) or the installed ``dfmpc_deploy`` /
  ``calib_free`` packages, or any folder above one of them (``--force`` would replace them); a folder inside those
  packages; a mount point; an existing file; a non-empty directory without ``--force``; a missing, unreadable or
  unwritable parent, or one on a read-only filesystem; a name too long to have hidden siblings; control characters;
  a leading ``~`` that the shell did not expand.
* **Symbolic links are refused, never followed or replaced.** ``--out`` is replaced by a new directory at the end,
  which would turn the user's link into a directory; the message names the link's target to pass instead. Links in
  the *parent* path are resolved: the work happens in the real parent.
* **Locked.** ``.<name>.lock`` beside ``--out`` is held with ``flock(LOCK_EX | LOCK_NB)`` for the whole build, so a
  second build into the same ``--out`` fails at once naming the holder's pid. The kernel releases the lock when the
  holder dies (SIGKILL included), so a leftover lock file never blocks anyone; each build removes it at the end
  (it is harmless if it stays). Linux emulates ``flock`` with POSIX locks on NFS, so the lock also holds there.
  Without ``fcntl`` (not POSIX) there is no lock.
* **Filled aside.** The build writes into ``.<name>.partial-XXXXXXXX`` in the same parent (same filesystem, so the
  final rename is atomic). Success: with ``--force`` the old ``--out`` and the new one are swapped in one step
  (Linux ``renameat2(RENAME_EXCHANGE)``, two renames elsewhere) and the old one is removed; without ``--force``, a
  plain rename, which the kernel refuses if a non-empty ``--out`` appeared meanwhile. Failure, exception, SIGINT or
  SIGTERM: the work directory is removed and the previous ``--out`` is untouched.
* **Leftovers of killed builds.** ``.<name>.partial-*`` and ``.<name>.old-*`` beside ``--out`` (what a SIGKILLed
  build of the *same* target leaves) are removed at the start of the next build, under the lock, so never while a
  live build uses them; other targets' leftovers are never touched (the suffix must be ``[A-Za-z0-9_]+``).
* **Modes follow the umask**: the directory ends ``0o777 & ~umask`` (``mkdtemp`` makes it 0700).

Signals: :func:`terminate_as_interrupt` (installed by ``cli.main``) turns SIGTERM and SIGHUP into
:class:`Terminated`, a ``KeyboardInterrupt``, so the same cleanup runs as for Ctrl-C; :func:`interrupt_status` gives
the signal's name and exit code (130 SIGINT, 143 SIGTERM, 129 SIGHUP). The few renames that create or swap in
``--out`` are not interruptible: a signal arriving then is acted on right after them.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType

from ..errors import DfmpcError
from .atomic import dir_mode, file_mode

__all__ = ["OutputDir", "check_out_dir", "remove_leftovers", "terminate_as_interrupt", "interrupt_status",
           "Terminated", "locked_dir"]

log = logging.getLogger("dfmpc_deploy")

_LONGEST_SUFFIX = len(".old-") + 20  # the longest hidden sibling is .NAME.old-<time_ns>
_DEFERRED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as a ``KeyboardInterrupt`` so that every ``Ctrl-C`` cleanup also runs for it.

    Attributes:
        signum: the signal number (``signal.SIGTERM`` ...).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_status(err: BaseException) -> tuple[str, int]:
    """Name and exit code of an interrupt: ``("SIGTERM", 143)`` for :class:`Terminated`, else ``("SIGINT", 130)``."""
    signum = getattr(err, "signum", signal.SIGINT)
    return signal.Signals(signum).name, 128 + int(signum)


#: signals raised as :class:`Terminated` that the command has not yet acted on (see :func:`_raise_terminated`)
_PENDING: list[int] = []
#: seconds between re-deliveries of a termination signal nobody acted on
REDELIVER_SECONDS = 2.0


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    """Raise :class:`Terminated`, and send the signal again every :data:`REDELIVER_SECONDS` until
    :func:`terminate_as_interrupt` ends: an exception raised in a signal handler can be swallowed (the handler may
    run inside a weakref callback of the import system, or under a library's ``except``), and a SIGTERM must still
    end the command."""
    _PENDING.append(signum)

    def again() -> None:
        if _PENDING:
            os.kill(os.getpid(), signum)

    timer = threading.Timer(REDELIVER_SECONDS, again)
    timer.daemon = True
    timer.start()
    raise Terminated(signum)


@contextmanager
def terminate_as_interrupt(names: tuple[str, ...] = ("SIGTERM", "SIGHUP")) -> Iterator[None]:
    """Within the block, the signals ``names`` raise :class:`Terminated` in the main thread; restored afterwards.

    A signal whose handler is not the default one is left alone: ignored on purpose (``nohup`` ignores SIGHUP) or
    handled by the program embedding us. Outside the main thread this does nothing (Python runs handlers there only).

    Args:
        names: signal names, e.g. ``("SIGTERM",)``.
    """
    installed: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for name in names:
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                installed[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        _PENDING.clear()  # acted on (the block has ended): no re-delivery
        for signum, old in installed.items():
            signal.signal(signum, old)  # type: ignore[arg-type]


@contextmanager
def _signals_held(reraise: bool = True, drop_note: str = "") -> Iterator[None]:
    """Record SIGINT/SIGTERM/SIGHUP instead of acting on them inside the block; act on them right after it.

    Swapping the Python handlers (rather than blocking the signals) also catches a signal whose C handler already ran
    but whose Python handler has not yet. With ``reraise=False`` a recorded signal whose handler is a Python one is
    dropped (with ``drop_note`` logged, if any); one left to the default action (SIGTERM outside ``cli.main``) is
    always re-delivered, so the process still ends.
    """
    caught: list[int] = []
    old: dict[int, object] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in _DEFERRED:
                if signal.getsignal(signum) is not None:  # None: set outside Python, could not be restored
                    old[signum] = signal.signal(signum, lambda s, f: caught.append(s))
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        for signum in dict.fromkeys(caught):
            if reraise or old[signum] is signal.SIG_DFL:
                signal.raise_signal(signum)
            elif drop_note:
                log.warning("%s arrived %s", signal.Signals(signum).name, drop_note)


def _fail(given: str, what: str) -> DfmpcError:
    return DfmpcError(f"--out '{given}' {what}")


def _parent_of(given: str) -> tuple[Path, str]:
    """The real parent directory and the last component of ``given`` (which must name a directory)."""
    last = given.rstrip("/").rsplit("/", 1)[-1] if given.rstrip("/") else ""
    if last in ("", ".", ".."):
        example = os.path.join(given, "out") if given else "out"
        raise _fail(given, f"does not name a new directory (it ends in '{last or '/'}'); name the folder to create, "
                           f"e.g. --out {example}")
    shown = os.path.dirname(given.rstrip("/")) or "."
    try:
        parent = Path(shown).resolve(strict=True)
        st = os.stat(parent)
    except FileNotFoundError:
        raise _fail(given, f"cannot be created: its parent directory '{shown}' does not exist; create it first "
                           f"(mkdir -p {shown}) or choose another --out") from None
    except (OSError, RuntimeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise _fail(given, f"cannot be created: its parent directory '{shown}' cannot be reached ({reason}); "
                           "choose another --out") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _fail(given, f"cannot be created: '{shown}' is not a directory; choose another --out")
    return parent, last


def _protected() -> list[tuple[Path, str]]:
    """Folders that ``--out`` may neither be nor contain (``--force`` would replace them), with their description."""
    places: list[tuple[Path, str]] = []
    for what, get in (("the current directory", Path.cwd), ("your home directory", Path.home),
                      ("the Python environment", lambda: Path(sys.prefix))):
        try:
            places.append((get().resolve(), what))
        except (OSError, RuntimeError, KeyError):
            pass  # no cwd (deleted) or no HOME: nothing to protect there
    return places + [(p, f"the installed package '{p.name}'") for p in _packages()]


def _packages() -> list[Path]:
    here = Path(__file__).resolve().parents[1]  # .../dfmpc_deploy
    return [p for p in (here, here.parent / "calib_free") if p.is_dir()]


def check_out_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Check that ``out`` can be created (or replaced with ``force``) without touching anything.

    Args:
        out: the ``--out`` value as given.
        force: whether an existing non-empty directory may be replaced.

    Returns:
        The absolute path to create or replace: the real (resolved) parent joined with the last component of ``out``.

    Raises:
        DfmpcError: one line naming the bad value and the fix (see the module docstring for the cases).
    """
    given = os.fspath(out)
    if not given:
        raise DfmpcError("--out is empty; name the output directory, e.g. --out out/resnet20")
    if any(ord(c) < 32 or ord(c) == 127 for c in given):
        raise DfmpcError(f"--out {given!r} contains control characters (a newline?); choose a plain name")
    if given.startswith("~"):
        raise _fail(given, "starts with '~', which the shell did not expand (as in --out=~/x); write the full "
                           "path, e.g. --out $HOME/...")
    parent, name = _parent_of(given)
    target = parent / name
    try:
        st: os.stat_result | None = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise _fail(given, f"cannot be inspected ({err.strerror}); choose another --out") from None

    if st is not None and stat.S_ISLNK(st.st_mode):
        dest = os.readlink(target)
        if not os.path.exists(target):
            raise _fail(given, f"is a symbolic link to '{dest}', which does not exist; remove the link or choose "
                               "another --out")
        raise _fail(given, f"is a symbolic link (to '{dest}'); the build replaces --out by a new directory and would "
                           f"replace your link, so pass the directory itself (--out {os.path.realpath(target)}) "
                           "or another path")
    for place, what in _protected():
        if target == place or target in place.parents:
            inside = "" if target == place else f", which contains {what}"
            is_what = what if target == place else f"'{target}'{inside}"
            raise _fail(given, f"is {is_what}; the build would replace it, choose a new folder, e.g. "
                               f"--out {os.path.join(given, 'out')}")
    for pkg in _packages():
        if pkg in target.parents:
            raise _fail(given, f"is inside the installed package '{pkg}'; choose a folder outside it")
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise _fail(given, "exists and is not a directory; remove that file or choose another --out")
        if os.path.ismount(target):
            raise _fail(given, f"is a mount point, which cannot be replaced by a rename; choose a folder inside it, "
                               f"e.g. --out {os.path.join(given, 'out')}")
        if not force:
            try:
                with os.scandir(target) as entries:
                    nonempty = next(entries, None) is not None
            except OSError as err:
                raise _fail(given, f"cannot be read ({err.strerror}); choose another --out") from None
            if nonempty:
                raise _fail(given, "already exists and is not empty; pass --force to replace it")
    _check_parent_writable(given, parent, name, st)
    return target


def _check_parent_writable(given: str, parent: Path, name: str, st: os.stat_result | None) -> None:
    try:
        vfs = os.statvfs(parent)
    except OSError:
        vfs = None
    if vfs is not None and vfs.f_flag & os.ST_RDONLY:
        raise _fail(given, f"cannot be created: '{parent}' is on a read-only filesystem; choose a --out on a "
                           "writable disk")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _fail(given, f"cannot be created: no permission to write in the parent directory '{parent}'; "
                           "choose a writable location")
    name_max = vfs.f_namemax if vfs is not None and vfs.f_namemax else 255
    if len(os.fsencode(name)) + _LONGEST_SUFFIX + 1 > name_max:
        raise _fail(given, f"has a name of {len(os.fsencode(name))} bytes; the build needs hidden siblings "
                           f".NAME.partial-*, so at most {name_max - _LONGEST_SUFFIX - 1} bytes: choose a shorter name")
    pst = os.stat(parent)
    if (st is not None and pst.st_mode & stat.S_ISVTX and os.geteuid() not in (0, st.st_uid, pst.st_uid)):
        raise _fail(given, f"belongs to another user in the sticky directory '{parent}', so it cannot be replaced; "
                           "choose another --out")


def _leftover_pattern(name: str) -> re.Pattern[str]:
    # mkdtemp suffixes and time_ns are [A-Za-z0-9_]: another target's ".NAME.partial-x.partial-y" never matches
    return re.compile(rf"\.{re.escape(name)}\.(?:partial|old)-[A-Za-z0-9_]+")


def remove_leftovers(target: Path) -> list[str]:
    """Remove ``.<name>.partial-*`` and ``.<name>.old-*`` beside ``target``; call only while holding its lock.

    Args:
        target: the absolute ``--out`` path (as returned by :func:`check_out_dir`).

    Returns:
        The names removed.
    """
    pattern = _leftover_pattern(target.name)
    removed = []
    with os.scandir(target.parent) as entries:
        names = [e.name for e in entries if pattern.fullmatch(e.name)]
    for leftover in names:
        _remove(target.parent / leftover)
        removed.append(leftover)
    if removed:
        log.info("removed %d leftover(s) of an earlier interrupted build: %s", len(removed), ", ".join(removed))
    return removed


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _holder_pid(fd: int, wait: float = 0.5) -> str:
    """The pid the lock holder wrote into the lock file, or "" if none appears within ``wait`` seconds (the holder
    writes it just after taking the lock, so a build started at the same moment can look in between)."""
    end = time.monotonic() + wait
    while True:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if holder.isdigit() or time.monotonic() >= end:
            return holder if holder.isdigit() else ""
        time.sleep(0.01)


def _acquire_lock(target: Path, given: str) -> int:
    """Open and ``flock`` ``.<name>.lock`` beside ``target``; write our pid in it; return the open descriptor.

    ``O_NOFOLLOW``: a symbolic link planted at the lock path is refused, never followed (it could point anywhere).
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock (documented limitation)
        return -1
    path = _lock_path(target)
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, file_mode())
        except OSError as err:
            raise _fail(given, f"cannot be locked: cannot create '{path}' ({err.strerror}); choose another "
                               "--out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            pid = f"pid {holder}" if holder else "pid unknown"
            raise _fail(given, f"is in use by another dfmpc-deploy build ({pid}); wait for it or choose another "
                               "--out") from None
        except OSError as err:
            os.close(fd)
            raise _fail(given, f"cannot be locked ({err.strerror}); choose a --out on a local filesystem") from None
        try:  # the previous holder removes the file when done: a lock on that orphaned inode guards nothing
            current = os.lstat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as err:  # a full disk (ENOSPC), a quota: leave no lock file behind
                _release_lock(target, fd)
                raise _fail(given, f"cannot be locked: cannot write '{path}' ({err.strerror}); free some space or "
                                   f"choose another --out") from None
            return fd
        os.close(fd)
    raise _fail(given, f"cannot be locked: '{path}' keeps being replaced; choose another --out")


def _release_lock(target: Path, fd: int) -> None:
    if fd < 0:
        return
    path = _lock_path(target)
    try:
        if os.path.samestat(os.fstat(fd), os.lstat(path)):
            os.unlink(path)  # while still holding it: see _acquire_lock
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def locked_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock that :class:`OutputDir` takes for ``path`` (``.<name>.lock`` beside it) inside the block, for a
    folder that is added to in place rather than replaced (a sweep's ``--out``).

    Yields:
        ``path`` with its parent resolved.

    Raises:
        DfmpcError: another process holds the lock (the message names its pid), or it cannot be taken.
    """
    given = os.fspath(path)
    parent, name = _parent_of(given)
    target = parent / name
    with _signals_held():
        fd = _acquire_lock(target, given)
    try:
        yield target
    finally:
        with _signals_held():
            _release_lock(target, fd)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None  # glibc < 2.28 or another libc
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the system cannot (the caller falls back)."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    import ctypes

    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


class OutputDir:
    """``with OutputDir(out, force) as work:`` checks and locks ``out``, yields a work directory beside it, and
    replaces ``out`` by that directory on success; on any failure or interrupt nothing is left.

    Args:
        out: the ``--out`` value as given (a path to create, or to replace with ``force``).
        force: replace an existing non-empty directory.

    Example::

        with OutputDir("out/r20", force=False) as work:
            (work / "report.json").write_text("{}")
        # out/r20/report.json now exists; out/.r20.partial-* and out/.r20.lock do not

    Raises:
        DfmpcError: on entry when ``out`` is refused or in use by another build (see the module docstring); on exit
            when the finished directory cannot be moved into place (the work is then removed, ``out`` untouched).
    """

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.given = os.fspath(out)
        self.force = force
        self.target: Path | None = None
        self.work: Path | None = None
        self._lock: int | None = None

    def __enter__(self) -> Path:
        target = check_out_dir(self.given, self.force)
        self.target = target
        try:
            with _signals_held():
                self._lock = _acquire_lock(target, self.given)
            check_out_dir(self.given, self.force)  # again: a build that held the lock may just have created it
            remove_leftovers(target)
            with _signals_held():
                self.work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
                os.chmod(self.work, dir_mode())
        except OSError as err:
            self._cleanup(committed=False)
            raise _fail(self.given, f"cannot be created: cannot write in '{target.parent}' ({err.strerror}); "
                                    "choose another --out") from None
        except BaseException:
            self._cleanup(committed=False)
            raise
        return self.work

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:  # an interrupt already on its way makes a second one redundant
            self._cleanup(committed=False, reraise=not issubclass(exc_type, KeyboardInterrupt))
            return
        try:
            with _signals_held(reraise=False, drop_note="while --out was being moved into place; the build is "
                                                        "complete, so it was ignored"):
                self._commit()
        except BaseException:
            self._cleanup(committed=False)
            raise
        self._cleanup(committed=True)

    def _cleanup(self, committed: bool, reraise: bool = True) -> None:
        """Remove the work directory (unless committed) and release the lock; signals wait until both are done."""
        with _signals_held(reraise=reraise):
            try:
                if not committed and self.work is not None:
                    _remove(self.work)
                self.work = None
            finally:
                if self._lock is not None and self.target is not None:
                    _release_lock(self.target, self._lock)
                self._lock = None

    def _commit(self) -> None:
        assert self.target is not None and self.work is not None
        target, work = self.target, self.work
        try:
            st: os.stat_result | None = os.lstat(target)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise _fail(self.given, "was replaced by a file or link during the build; nothing was replaced, "
                                    "choose another --out")
        exists = st is not None
        try:
            if not exists or not self.force:
                os.rename(work, target)  # refuses a non-empty directory created by someone else meanwhile
                self.work = None
                return
            if _exchange(work, target):
                self.work = None
                _remove(work)  # now holds the previous output
                return
            trash = target.with_name(f".{target.name}.old-{time.time_ns()}")
            os.rename(target, trash)
            try:
                os.rename(work, target)
            except OSError:
                os.rename(trash, target)
                raise
            self.work = None
            _remove(trash)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _fail(self.given, "was created by someone else during the build and is not empty; nothing "
                                        "was replaced (pass --force to replace it)") from None
            raise _fail(self.given, f"could not be replaced by the finished build ({err.strerror}); nothing was "
                                    "replaced") from None
