"""Hostile --out values, concurrent builds and signals, through the real CLI and real processes.

Each case: one line naming the bad value and the fix, exit 1, no traceback, no hang, no partial output, nothing run.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dfmpc_deploy.cli import main
from dfmpc_deploy.io.outdir import OutputDir
from tests.hostile.conftest import default_sigint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
BUILD = ["build", "resnet20_cifar10_optA", "--weights", "random"]


def _cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --out "), err
    return lines[0]


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if the build gets as far as loading the model (the check must come first)."""
    import dfmpc_deploy.zoo.models as models

    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(models, "load_model", forbidden)


@pytest.mark.parametrize("case", ["symlink same fs", "symlink other fs", "dangling symlink", "dot", "dotdot", "root",
                                  "cwd ancestor", "existing file", "missing parent", "non-empty"])
def test_bad_out_one_line_exit_1_nothing_created(capsys, tmp_path, monkeypatch, no_work, case):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "real").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    shm = Path("/dev/shm").is_dir()  # another filesystem (tmpfs) where there is one
    other_fs = Path(tempfile.mkdtemp(dir="/dev/shm")) if shm else tmp_path / "real"
    try:
        links = {"symlink same fs": tmp_path / "real", "symlink other fs": other_fs,
                 "dangling symlink": other_fs / "no"}
        if case in links:
            (tmp_path / "link").symlink_to(links[case])
        out, expect = {
            "symlink same fs": (tmp_path / "link", "is a symbolic link"),
            "symlink other fs": (tmp_path / "link", "is a symbolic link"),
            "dangling symlink": (tmp_path / "link", "which does not exist"),
            "dot": (".", "does not name a new directory"),
            "dotdot": ("..", "does not name a new directory"),
            "root": ("/", "does not name a new directory"),
            "cwd ancestor": (tmp_path, "contains the current directory"),
            "existing file": (tmp_path / "file", "exists and is not a directory"),
            "missing parent": (tmp_path / "no" / "o", "does not exist; create it first"),
            "non-empty": (tmp_path / "full", "pass --force"),
        }[case]
        before = _listing(tmp_path), _listing(other_fs)
        t0 = time.monotonic()
        code, stdout, err = _cli(capsys, *BUILD, "--out", str(out), *(["--force"] if case != "non-empty" else []))
        assert code == 1 and time.monotonic() - t0 < 10
        line = _one_error_line(err)
        assert f"--out '{out}'" in line and expect in line, line
        assert (_listing(tmp_path), _listing(other_fs)) == before  # nothing created, nothing replaced
        assert stdout == ""
    finally:
        if shm:
            shutil.rmtree(other_fs, ignore_errors=True)


def _run_cli(args: list[str], prefix: list[str] = (), cwd=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "dfmpc_deploy", *args], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_unwritable_parent(tmp_path):
    if os.geteuid() == 0:  # root may write anywhere: run the CLI as nobody in a folder nobody can reach
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        base = Path(tempfile.mkdtemp())
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        base, prefix = tmp_path, []
    try:
        base.chmod(0o755)
        (base / "ro").mkdir(mode=0o555)
        (base / "ro").chmod(0o555)
        r = _run_cli([*BUILD, "--out", str(base / "ro" / "o")], prefix, cwd=base)
        assert r.returncode == 1, r.stderr
        line = _one_error_line(r.stderr)
        assert "no permission to write in the parent directory" in line and str(base / "ro") in line
        assert _listing(base) == ["ro"]
    finally:
        (base / "ro").chmod(0o755)
        if base != tmp_path:
            shutil.rmtree(base)


def test_parent_on_a_read_only_filesystem(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*unshare, "mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                           capture_output=True)
    if not shutil.which("unshare") or probe.returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here (unshare/mount not permitted)")
    cmd = f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && exec \"$@\""
    r = _run_cli([*BUILD, "--out", str(ro / "o")], [*unshare, "sh", "-c", cmd, "sh"], cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    line = _one_error_line(r.stderr)
    assert "is on a read-only filesystem" in line and str(ro) in line


def _wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = pred()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_build_leaves_nothing_and_a_second_build_is_refused_meanwhile(capsys, tmp_path, sig, code):
    out = tmp_path / "o"
    a = subprocess.Popen([sys.executable, "-m", "dfmpc_deploy", *BUILD, "--synth-steps", "2000", "--out", str(out)],
                         env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=default_sigint)
    try:
        partial = _wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".o.partial-")], 60,
                            "the build to start")[0]
        # a second build into the same --out, started while the first runs: refused at once, naming the first
        t0 = time.monotonic()
        c2, _, err2 = _cli(capsys, *BUILD, "--out", str(out), "--force")
        assert c2 == 1 and time.monotonic() - t0 < 10
        line = _one_error_line(err2)
        assert f"is in use by another dfmpc-deploy build (pid {a.pid}); wait for it or choose another --out" in line
        assert partial.is_dir()  # the refused build did not take the live build's work for a leftover
        time.sleep(0.5)  # into the work (model load / synthesis)
        assert a.poll() is None, a.communicate()
        a.send_signal(sig)
        stdout, stderr = a.communicate(timeout=10)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted ({signal.Signals(sig).name}): nothing was written"
    assert list(tmp_path.iterdir()) == []  # no --out, no partial, no lock file


_HOLDER = """
import os, sys, time
from pathlib import Path
from dfmpc_deploy.io.outdir import OutputDir
out, release = sys.argv[1], Path(sys.argv[2])
with OutputDir(out, force=True) as work:
    (work / "winner").write_text(str(os.getpid()))
    print("locked", flush=True)
    end = time.monotonic() + 30
    while not release.exists() and time.monotonic() < end:
        time.sleep(0.02)
"""


def _holder(out: Path, release: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), str(release)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_started_together_one_wins_one_is_refused(tmp_path):
    out, release = tmp_path / "o", tmp_path / "release"
    procs = [_holder(out, release), _holder(out, release)]  # started together, same --out, both with --force
    try:
        loser = _wait_for(lambda: [p for p in procs if p.poll() is not None], 30, "one of them to be refused")[0]
        winner = procs[1 - procs.index(loser)]
        assert winner.poll() is None  # still holding the lock
        _, err = loser.communicate()
        assert loser.returncode == 1, err  # DfmpcError (uncaught in this bare script) at once, before any work
        assert f"is in use by another dfmpc-deploy build (pid {winner.pid})" in err
        release.touch()
        w_out, w_err = winner.communicate(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert winner.returncode == 0 and w_out.strip() == "locked", w_err
    assert (out / "winner").read_text() == str(winner.pid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "release"]


def test_after_sigkill_the_lock_is_free_and_leftovers_are_removed(tmp_path):
    out, release = tmp_path / "o", tmp_path / "release"
    other = tmp_path / ".o2.partial-abc"  # another target's leftover
    other.mkdir()
    p = _holder(out, release)
    try:
        assert p.stdout.readline().strip() == "locked"
        p.kill()  # SIGKILL: no cleanup can run
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    left = sorted(q.name for q in tmp_path.iterdir())
    assert ".o.lock" in left and any(n.startswith(".o.partial-") for n in left)  # what a killed build leaves
    t0 = time.monotonic()
    with OutputDir(out) as work:  # the next build of that target: not blocked, and cleans up
        assert time.monotonic() - t0 < 5
        assert sorted(q.name for q in tmp_path.iterdir()) == sorted([".o.lock", work.name, ".o2.partial-abc"])
        (work / "f").write_text("x")
    assert sorted(q.name for q in tmp_path.iterdir()) == [".o2.partial-abc", "o"]


def test_build_output_modes_follow_the_umask(capsys, tmp_path):
    saved = os.umask(0o027)
    try:
        code, _, err = _cli(capsys, *BUILD, "--recal", "none", "--rounding", "nearest", "--out", str(tmp_path / "o"))
    finally:
        os.umask(saved)
    assert code == 0, err
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes and modes.pop("o") == 0o750
    assert set(modes.values()) == {0o640}, {k: oct(v) for k, v in modes.items()}
