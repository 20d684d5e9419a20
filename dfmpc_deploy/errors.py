"""Exceptions. A :class:`DfmpcError` is a user error: the CLI prints its one-line message and exits 1."""
from __future__ import annotations

__all__ = ["DfmpcError", "MissingDependencyError", "UsageError", "BadFileError"]


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
