"""Exceptions. A :class:`DfmpcError` is a user error: the CLI prints its one-line message and exits 1."""
from __future__ import annotations

__all__ = ["DfmpcError", "MissingDependencyError", "UsageError", "BadFileError", "one_line"]


class DfmpcError(Exception):
    """A problem with the user's input or environment (not a bug): printed as one line, exit code 1."""

    exit_code = 1


class UsageError(DfmpcError):
    """A malformed command line value (exit code 2, like argparse's own usage errors)."""

    exit_code = 2


class MissingDependencyError(DfmpcError):
    """An optional dependency is needed for the requested step but is not installed."""


class BadFileError(DfmpcError):
    """A packed model file is corrupt, truncated, of an unknown version or otherwise unreadable."""


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one terminal-safe line: line breaks joined with ``" / "``, other control characters (terminal
    escape sequences included) escaped, at most ``limit`` characters. Every message the CLI prints goes through it,
    so a library's multi-line message or a file name holding ``ESC[2J`` cannot break or clear the screen."""
    parts = [p.strip() for p in str(text).replace("\r", "\n").split("\n") if p.strip()]
    flat = " / ".join(parts)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in flat)
    return out if len(out) <= limit else out[: limit - 3] + "..."
