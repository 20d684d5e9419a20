"""Progress on a terminal only (stderr is a TTY and not --quiet), drawn by ``rich``; silent otherwise.

Each task is one row: label, bar, done/total, time elapsed, **time left** (from rich's speed estimate over the last
30 s) and an optional extra such as ``loss=0.1234``. A :meth:`Progress.say` message is a row with a spinner and its
elapsed time (for steps without counts, e.g. building a TensorRT engine). Rows stay on screen, so the finished display
shows how long each stage took.

Cost: rich redraws from its own thread at most 10 times a second, and ``update`` hands a value to rich at most
20 times a second per task (the last value always: a task's final ``done == total`` is never dropped), so a tight
loop calling ``update`` pays about a ``time.monotonic()`` call per step.

Without ``rich`` (the ``ui`` extra) the display falls back to plain lines: one when a task finishes (with its time),
one for each :meth:`Progress.say`, and at most every 10 s a line with the counts and the time left.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["Progress", "Update"]

Update = Callable[..., None]  # update(done, total, *extra)

_MIN_UPDATE_S = 0.05  # hand rich at most 20 values a second per task
_PLAIN_EVERY_S = 10.0


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _extra_text(extra: tuple) -> str:
    """``loss=0.1234`` for a number (the callers pass a loss), the text itself for a string."""
    parts = []
    for v in extra:
        parts.append(str(v) if isinstance(v, str) else f"loss={float(v):.4f}")
    return " ".join(parts)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Progress rows for the stages of a build: ``with Progress() as p: p.task("eval")(done, total)``.

    Args:
        enabled: ``None`` (default) = only when ``stream`` is a terminal; ``False`` (``--quiet``) = never; ``True`` =
            always, as if ``stream`` were a terminal.
        stream: where to draw (default ``sys.stderr``).

    Example::

        with Progress() as p:
            update = p.task("eval fp32")
            for i in range(n):
                ...
                update(i + 1, n)          # or update(i + 1, n, loss) to show loss=...
            p.say("building TensorRT engine")
    """

    def __init__(self, enabled: bool | None = None, stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else bool(enabled)
        self._rich: Any = None  # rich.progress.Progress while active
        self._plain = False
        self._say_id: Any = None
        self._flush: list[Callable[[], None]] = []
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        self._own_file: IO[str] | None = None

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        try:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
        except ImportError:
            self._plain = True
            return self
        # stderr prints (the CLI's warnings) and log lines go above the rows instead of through them; stdout is left
        # alone, since it may be a pipe (--json)
        own = self.stream is sys.stderr
        # drawn on a copy of stderr's descriptor: a step that captures descriptor 2 (TensorRT's native messages,
        # deploy/trt.py) must not capture the rows too
        self._own_file = _dup_stream(self.stream) if own else None
        console = Console(file=self._own_file or self.stream, force_terminal=True)
        self._rich = RichProgress(*_columns(), console=console, refresh_per_second=10, transient=False,
                                  redirect_stdout=False, redirect_stderr=own)
        self._rich.start()
        if own:
            self._handlers = [(h, h.setStream(sys.stderr)) for h in _stream_handlers(self.stream)]
        return self

    def __exit__(self, *exc: object) -> None:
        for flush in self._flush:
            flush()
        self._flush.clear()
        for handler, old in self._handlers:
            handler.setStream(old)
        self._handlers = []
        if self._rich is not None:
            self._end_say()
            self._rich.stop()
            self._rich = None
        if self._own_file is not None:
            self._own_file.close()
            self._own_file = None

    def say(self, message: str) -> None:
        """A status row for a step without counts (spinner and elapsed time); ends the previous one."""
        if not self.enabled:
            return
        if self._plain:
            self.stream.write(f"{message}\n")
            self.stream.flush()
        elif self._rich is not None:
            self._end_say()
            self._say_id = self._rich.add_task(message, total=None, extra="", say=True)

    def task(self, label: str) -> Update:
        """A new row; returns ``update(done, total, *extra)`` to call as the work advances.

        Args:
            label: what the task does, e.g. ``"eval fp32"``.

        Returns:
            ``update(done, total, *extra)``: ``done`` of ``total`` units finished; ``extra`` values are shown after the
            times (a number as ``loss=<value>``, a string as it is).
        """
        if not self.enabled:
            return _ignore
        if self._plain:
            return self._plain_task(label)
        if self._rich is None:
            return _ignore
        self._end_say()
        rich, task_id = self._rich, self._rich.add_task(label, total=None, extra="", say=False)
        last = [0.0]
        pending: list[tuple] = []

        def push() -> None:
            if pending:
                done, total, extra = pending.pop()
                rich.update(task_id, completed=done, total=total, extra=_extra_text(extra))

        def update(done: int, total: int, *extra: object) -> None:
            now = time.monotonic()
            pending[:] = [(done, total, extra)]
            if done >= total or now - last[0] >= _MIN_UPDATE_S:
                last[0] = now
                push()

        self._flush.append(push)
        return update

    def _end_say(self) -> None:
        if self._say_id is not None and self._rich is not None:
            self._rich.update(self._say_id, total=1, completed=1)
            self._say_id = None

    def _plain_task(self, label: str) -> Update:
        start = time.monotonic()
        last = [start]

        def update(done: int, total: int, *extra: object) -> None:
            now = time.monotonic()
            tail = f" {_extra_text(extra)}" if extra else ""
            if done >= total:
                self.stream.write(f"{label}: {done}/{total} in {now - start:.1f} s{tail}\n")
            elif now - last[0] >= _PLAIN_EVERY_S:
                left = (now - start) * (total - done) / done if done > 0 else None
                self.stream.write(f"{label}: {done}/{total}, {_clock(now - start)} elapsed, "
                                  f"{_clock(left)} left{tail}\n")
            else:
                return
            last[0] = now
            self.stream.flush()
        return update


def _dup_stream(stream: IO[str]) -> IO[str] | None:
    """A text stream on a duplicate of ``stream``'s file descriptor, or None when it has none."""
    try:
        return os.fdopen(os.dup(stream.fileno()), "w", encoding=getattr(stream, "encoding", None) or "utf-8",
                         errors="replace")
    except (AttributeError, OSError, ValueError):  # no descriptor (a StringIO, a capture object), or closed
        return None


def _stream_handlers(stream: IO[str]) -> list[logging.StreamHandler]:
    """Logging handlers (root's and ours) that write to ``stream``."""
    found = []
    for logger in (logging.getLogger(), logging.getLogger("dfmpc_deploy")):
        found += [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and h.stream is stream]
    return found


def _ignore(*args: object) -> None:
    return None


def _columns() -> list:
    """label, bar, done/total, elapsed, time left, extra; say rows show only label, spinner and elapsed."""
    from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class _Spinner(SpinnerColumn):
        def render(self, task: Any) -> Any:
            return super().render(task) if task.fields.get("say") else Text(" ")

    class _Counts(ProgressColumn):
        def render(self, task: Any) -> Text:
            if task.fields.get("say") or task.total is None:
                return Text("")
            return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")

    class _Left(ProgressColumn):
        max_refresh = 0.5  # the estimate would flicker at every redraw

        def render(self, task: Any) -> Text:
            if task.fields.get("say"):
                return Text("")
            if task.finished:
                return Text("done", style="progress.remaining")
            return Text(f"{_clock(task.time_remaining)} left", style="progress.remaining")

    return [_Spinner(finished_text=" "), TextColumn("{task.description}"), BarColumn(bar_width=30), _Counts(),
            TimeElapsedColumn(), _Left(), TextColumn("{task.fields[extra]}")]
