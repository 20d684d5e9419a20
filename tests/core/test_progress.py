"""Progress rows (rich): shown only on a terminal, with counts, elapsed and time left; cheap in a tight loop."""
import io
import logging
import re
import sys
import time

import pytest

from dfmpc_deploy.core import progress as progress_mod
from dfmpc_deploy.core.progress import Progress

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tty(io.StringIO):
    """A terminal as far as the code can tell; counts the writes (rich writes one chunk per redraw)."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def isatty(self):
        return True

    def write(self, s):
        self.writes += 1
        return super().write(s)


def _text(stream) -> str:
    return _ANSI.sub("", stream.getvalue())


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "140")  # rich's width for a non-real terminal; keeps every column on the row
    monkeypatch.delenv("NO_COLOR", raising=False)


def test_nothing_is_written_when_not_a_terminal():
    pipe = io.StringIO()
    with Progress(stream=pipe) as p:
        p.task("eval")(5, 10)
        p.say("building engine")
        p.task("eval")(10, 10, 0.5)
    assert pipe.getvalue() == ""


def test_quiet_overrides_terminal():
    tty = _Tty()
    with Progress(enabled=False, stream=tty) as p:
        p.task("synthesise")(1, 2, 0.5)
        p.say("x")
    assert tty.getvalue() == ""


def test_terminal_rows_show_label_counts_elapsed_time_left_and_loss():
    tty = _Tty()
    with Progress(stream=tty) as p:
        update = p.task("eval fp32")
        for i in range(1, 8):  # ~0.8 s: several redraws while the task runs, with a speed to estimate from
            update(i, 20, 0.123456)
            time.sleep(0.12)
        mid = _text(tty)
        update(20, 20, 0.1)
        p.say("building TensorRT engine")
    out = _text(tty)
    assert "eval fp32" in mid and re.search(r"\b[1-7]/20\b", mid), mid[-400:]
    assert re.search(r"\d:\d\d:\d\d left", mid), f"no time-left field in {mid[-400:]!r}"
    assert re.search(r"\d:\d\d:\d\d", mid.split("eval fp32")[-1]), "no elapsed field"
    assert "loss=0.1235" in mid
    assert "20/20" in out and "done" in out and "building TensorRT engine" in out


def test_time_left_estimate_tracks_the_rate():
    tty = _Tty()
    with Progress(stream=tty) as p:
        update = p.task("steps")
        for i in range(1, 6):
            update(i, 105)  # ~0.1 s a step, 100 steps to go: about 10 s left
            time.sleep(0.1)
        time.sleep(0.15)
        lefts = re.findall(r"0:00:(\d\d) left", _text(tty))
    assert lefts, _text(tty)[-300:]
    assert 5 <= int(lefts[-1]) <= 25, f"time left {lefts[-1]} s for 100 steps of ~0.1 s"


def test_tight_loop_is_rate_limited_and_cheap():
    tty = _Tty()
    n = 200_000
    with Progress(stream=tty) as p:
        update = p.task("tight")
        t0 = time.perf_counter()
        for i in range(n):
            update(i + 1, n)
        elapsed = time.perf_counter() - t0
        writes = tty.writes
    assert writes <= 10 * elapsed + 4, f"{writes} redraws in {elapsed:.2f} s (more than 10 a second)"
    assert elapsed / n < 5e-6, f"{elapsed / n * 1e6:.1f} us per update (a build step is >= 1 ms)"
    assert f"{n}/{n}" in _text(tty)


def test_last_value_is_shown_even_when_rate_limited():
    tty = _Tty()
    with Progress(stream=tty) as p:
        update = p.task("early stop")
        for i in range(1, 8):  # all within one rate-limit interval: only the first is handed over at once
            update(i, 10)
    assert "7/10" in _text(tty)


def test_log_lines_and_stderr_prints_are_drawn_above_the_rows(capsys):
    stream = sys.stderr  # pytest's capture: Progress treats it as the process's stderr
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("dfmpc_deploy")
    logger.addHandler(handler)
    try:
        with Progress(enabled=True, stream=stream) as p:
            p.task("work")(1, 2)
            assert handler.stream is not stream and sys.stderr is not stream  # both go through rich meanwhile
            logger.warning("hello from the log")
            print("warning: printed", file=sys.stderr)
        assert handler.stream is stream and sys.stderr is stream
    finally:
        logger.removeHandler(handler)
    err = _ANSI.sub("", capsys.readouterr().err)
    assert err.count("hello from the log") == 1 and err.count("warning: printed") == 1


def test_custom_stream_leaves_sys_stderr_alone():
    before = sys.stderr
    with Progress(stream=_Tty()):
        assert sys.stderr is before


def test_without_rich_plain_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails as if rich were not installed
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    monkeypatch.setattr(progress_mod, "_PLAIN_EVERY_S", 0.0)
    tty = _Tty()
    with Progress(stream=tty) as p:
        update = p.task("eval")
        update(0, 10)
        time.sleep(0.01)
        update(4, 10, 0.25)
        update(10, 10)
        p.say("building engine")
    lines = tty.getvalue().splitlines()
    assert "\x1b" not in tty.getvalue()
    assert re.fullmatch(r"eval: 4/10, 0:00:00 elapsed, 0:00:00 left loss=0\.2500", lines[-3]), lines
    assert re.fullmatch(r"eval: 10/10 in \d+\.\d s", lines[-2]) and lines[-1] == "building engine", lines
