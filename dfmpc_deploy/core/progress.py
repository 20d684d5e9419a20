"""Progress display on a terminal only (stderr is a TTY and not --quiet); silent otherwise."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Minimal, dependency-free progress lines: ``with Progress(enabled) as p: p.task("eval")(done, total)``."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = (self.stream.isatty() if enabled is None else enabled)
        self._last = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def say(self, message: str) -> None:
        """One status line (replaces the current one)."""
        if self.enabled:
            self.stream.write(f"\r{message:<70}")
            self.stream.flush()

    def task(self, label: str):
        """A callable ``(done, total, *extra)`` that redraws one status line at most 10 times a second."""
        def update(done: int, total: int, *extra) -> None:
            if not self.enabled:
                return
            now = time.monotonic()
            if done < total and now - self._last < 0.1:
                return
            self._last = now
            width = 30
            fill = int(width * done / max(1, total))
            tail = f" loss={extra[0]:.4f}" if extra else ""
            self.stream.write(f"\r{label:<22} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}{tail}   ")
            self.stream.flush()
        return update
