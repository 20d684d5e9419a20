"""OutputDir / check_out_dir in-process: refusals before anything exists, lock, leftovers, commit, modes, signals."""
import logging
import os
import signal
import time
from pathlib import Path

import pytest

import dfmpc_deploy
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.io import atomic
from dfmpc_deploy.io import outdir as od
from dfmpc_deploy.io.atomic import atomic_write_text, current_umask
from dfmpc_deploy.io.outdir import (
    OutputDir,
    Terminated,
    interrupt_status,
    remove_leftovers,
    terminate_as_interrupt,
)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(out, *, force=False, match: str) -> str:
    with pytest.raises(DfmpcError) as info:
        with OutputDir(out, force=force):
            raise AssertionError("the work must not start")
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


# --- refusals: one line naming the value, nothing created ------------------------------------------------------------

def _cases(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "file").write_text("x")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    (tmp / "dangling").symlink_to(tmp / "nowhere")
    return {
        "dot": (".", "ends in '.'"),
        "dotdot": ("..", "ends in '..'"),
        "trailing dot": (f"{tmp}/real/.", "ends in '.'"),
        "root": ("/", "ends in '/'"),
        "empty": ("", "--out is empty"),
        "file": (str(tmp / "file"), "exists and is not a directory"),
        "non-empty": (str(tmp / "full"), "pass --force"),
        "missing parent": (str(tmp / "no" / "o"), "parent directory"),
        "parent is a file": (str(tmp / "file" / "o"), "is not a directory"),
        "symlink": (str(tmp / "link"), f"pass the directory itself (--out {tmp / 'real'})"),
        "dangling symlink": (str(tmp / "dangling"), "which does not exist; remove the link"),
        "long name": (str(tmp / ("n" * 250)), "choose a shorter name"),
        "newline": (f"{tmp}/a\nb", "contains control characters"),
        "tilde": ("~/o", "which the shell did not expand"),
    }


@pytest.mark.parametrize("case", ["dot", "dotdot", "trailing dot", "root", "empty", "file", "non-empty",
                                  "missing parent", "parent is a file", "symlink", "dangling symlink", "long name",
                                  "newline", "tilde"])
def test_bad_out_is_refused_before_anything_is_created(tmp_path, case):
    out, match = _cases(tmp_path)[case]
    before = _tree(tmp_path)
    msg = _refused(out, match=match)
    assert (repr(out) if case == "newline" else out) in msg or case == "empty"
    assert _tree(tmp_path) == before
    assert os.readlink(tmp_path / "link") == str(tmp_path / "real")  # the user's link is never replaced


def test_force_does_not_make_a_symlink_acceptable(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _refused(tmp_path / "link", force=True, match="symbolic link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "keep").read_text() == "mine"


def test_current_directory_and_its_ancestors_are_refused(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    _refused("../b", force=True, match="is the current directory")
    _refused(tmp_path / "a", force=True, match="which contains the current directory")
    assert (tmp_path / "a" / "b").is_dir()


def test_home_environment_and_package_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that the checks below are not answered by "is the current directory"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    _refused(tmp_path / "home", force=True, match="is your home directory")
    pkg = Path(dfmpc_deploy.__file__).resolve().parent
    _refused(pkg, force=True, match="the installed package 'dfmpc_deploy'")
    # the checkout holds the package, and in a source checkout often the Python environment (.venv) too
    msg = _refused(pkg.parent, force=True, match="which contains the ")
    assert "installed package" in msg or "Python environment" in msg, msg
    _refused(pkg / "out", match="is inside the installed package")
    import sys
    _refused(sys.prefix, force=True, match="the Python environment")
    assert not (pkg / "out").exists()


def test_symlinks_in_the_parent_are_resolved(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with OutputDir(tmp_path / "link" / "o") as work:
        assert work.parent == tmp_path / "real"  # beside the real target: the final rename stays on one filesystem
        (work / "f").write_text("x")
    assert (tmp_path / "real" / "o" / "f").read_text() == "x" and (tmp_path / "link").is_symlink()


# --- commit and cleanup ----------------------------------------------------------------------------------------------

def test_success_moves_the_work_into_place_and_leaves_no_sibling(tmp_path):
    with OutputDir(tmp_path / "o") as work:
        assert work.parent == tmp_path and work.name.startswith(".o.partial-")
        assert (tmp_path / ".o.lock").read_text().strip() == str(os.getpid())
        (work / "report.json").write_text("{}")
    assert _tree(tmp_path) == ["o", "o/report.json"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, DfmpcError])
def test_failure_leaves_previous_out_intact_and_nothing_else(tmp_path, exc):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("old")
    with pytest.raises(exc):
        with OutputDir(tmp_path / "o", force=True) as work:
            (work / "new.txt").write_text("new")
            raise exc("boom")
    assert _tree(tmp_path) == ["o", "o/old.txt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_replaces_the_previous_out(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(od, "_renameat2", lambda: None)
    elif od._renameat2() is None:
        pytest.skip("renameat2 not available here")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("old")
    with OutputDir(tmp_path / "o", force=True) as work:
        (work / "new.txt").write_text("new")
        inode = work.stat().st_ino
    assert _tree(tmp_path) == ["o", "o/new.txt"] and (tmp_path / "o").stat().st_ino == inode


def test_out_created_by_someone_else_during_the_build_is_not_replaced(tmp_path):
    with pytest.raises(DfmpcError, match="created by someone else during the build"):
        with OutputDir(tmp_path / "o") as work:
            (work / "new.txt").write_text("new")
            (tmp_path / "o").mkdir()
            (tmp_path / "o" / "theirs.txt").write_text("theirs")
    assert _tree(tmp_path) == ["o", "o/theirs.txt"]


def test_out_turned_into_a_symlink_during_the_build_is_not_replaced(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DfmpcError, match="replaced by a file or link during the build"):
        with OutputDir(tmp_path / "o", force=True):
            (tmp_path / "o").symlink_to(tmp_path / "elsewhere")
    assert (tmp_path / "o").is_symlink() and _tree(tmp_path) == ["elsewhere", "o"]


# --- lock and leftovers ----------------------------------------------------------------------------------------------

def test_second_build_of_the_same_out_fails_at_once_naming_the_holder(tmp_path):
    with OutputDir(tmp_path / "o") as work:
        (work / "f").write_text("x")
        msg = _refused(tmp_path / "o", force=True, match="is in use by another dfmpc-deploy build")
        assert f"(pid {os.getpid()})" in msg and "wait for it or choose another --out" in msg
        assert (work / "f").exists()  # the live build's work is not a leftover
        with OutputDir(tmp_path / "other") as other:  # another target is independent
            (other / "g").write_text("y")
    assert _tree(tmp_path) == ["o", "o/f", "other", "other/g"]


def test_out_filled_between_the_check_and_the_lock_is_caught(tmp_path, monkeypatch):
    real = od._acquire_lock

    def lock_then_someone_finishes(target, given):  # a build that held the lock committed just before we got it
        fd = real(target, given)
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "theirs").write_text("x")
        return fd

    monkeypatch.setattr(od, "_acquire_lock", lock_then_someone_finishes)
    _refused(tmp_path / "o", match="already exists and is not empty; pass --force")
    assert _tree(tmp_path) == ["o", "o/theirs"]  # lock released and removed, no partial


def test_lock_is_released_after_a_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with OutputDir(tmp_path / "o"):
            raise RuntimeError
    with OutputDir(tmp_path / "o") as work:
        (work / "f").write_text("x")
    assert (tmp_path / "o" / "f").exists()


def test_a_lock_on_a_removed_lock_file_blocks_nobody(tmp_path):
    import fcntl

    path = tmp_path / ".o.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that removed its file while still holding it (see _release_lock)
    path.unlink()
    try:
        with OutputDir(tmp_path / "o"):
            pass
    finally:
        os.close(fd)
    assert (tmp_path / "o").is_dir()


def test_leftovers_of_the_same_target_only_are_removed(tmp_path):
    mine = [".o.partial-abc123_x", ".o.old-1733000000000000000"]
    theirs = [".o2.partial-abc", ".o.partial-x.partial-abc", ".xo.partial-abc", ".o.partial-", "o.partial-abc"]
    for name in mine + theirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("x")
    assert sorted(remove_leftovers(tmp_path / "o")) == sorted(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)
    with OutputDir(tmp_path / "o2"):  # entering removes its own leftovers
        pass
    assert not (tmp_path / ".o2.partial-abc").exists() and (tmp_path / ".xo.partial-abc").exists()


# --- modes -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, fmode, dmode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o027, 0o640, 0o750)])
def test_modes_follow_the_umask(tmp_path, umask, mask, fmode, dmode):
    umask(mask)
    assert current_umask() == mask
    with OutputDir(tmp_path / "o") as work:
        atomic_write_text(work / "report.md", "x")
        (work / "sub").mkdir()
        atomic_write_text(work / "sub" / "a.json", "{}")
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {"o": dmode, "o/report.md": fmode, "o/sub": dmode, "o/sub/a.json": fmode}, \
        {k: oct(v) for k, v in modes.items()}


def test_umask_fallback_without_proc(monkeypatch, umask):
    umask(0o027)

    def no_proc(*a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr(atomic, "open", no_proc, raising=False)
    assert current_umask() == 0o027
    monkeypatch.undo()
    assert current_umask() == 0o027  # and the fallback restored it


# --- signals ---------------------------------------------------------------------------------------------------------

def test_sigterm_raises_terminated_inside_and_default_is_restored():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(Terminated) as info:
        with terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once by the handler; without it the test fails after 5 s
    assert isinstance(info.value, KeyboardInterrupt) and interrupt_status(info.value) == ("SIGTERM", 143)
    assert interrupt_status(KeyboardInterrupt()) == ("SIGINT", 130)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_signal_stays_ignored():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with terminate_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, old)


def test_interrupt_during_the_final_swap_waits_for_it(tmp_path, monkeypatch, caplog):
    # Ctrl-C's handler as in a terminal, whatever started the tests (`&` and nohup pass SIGINT on ignored)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "old.txt").write_text("old")
        real = od._exchange

        def interrupted_exchange(a, b):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the commit
            return real(a, b)

        monkeypatch.setattr(od, "_exchange", interrupted_exchange)
        with caplog.at_level(logging.WARNING, logger="dfmpc_deploy"):
            try:
                with OutputDir(tmp_path / "o", force=True) as work:
                    (work / "new.txt").write_text("new")
            except KeyboardInterrupt:
                pytest.fail(f"interrupted half-way through the commit: {_tree(tmp_path)}")
        assert _tree(tmp_path) == ["o", "o/new.txt"]  # committed whole, no KeyboardInterrupt half-way
        assert "SIGINT arrived while --out was being moved into place" in caplog.text
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, old)
