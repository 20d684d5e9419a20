"""One cell on a worker: the same ``run_build`` as ``dfmpc-deploy build``, into ``DIR/cells/<cell id>/``.

:func:`run_cell` never raises for a failed build: it returns an *outcome* (a small dict the driver records), so a
bad cell costs only itself. A :class:`~dfmpc_deploy.errors.DfmpcError` is the user's problem (its one line is the
error); any other exception is a bug and also carries its traceback (``detail``). ``KeyboardInterrupt`` (an
interrupted sweep) is not caught: the build's output folder is then removed as for an interrupted ``build``.
"""
from __future__ import annotations

import socket
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DfmpcError
from .grid import build_config

if TYPE_CHECKING:
    from ..report import Report

__all__ = ["CellTask", "run_cell", "outcome_from_report", "failed_outcome", "one_line"]


@dataclass(frozen=True)
class CellTask:
    """What a worker needs to run a cell (plain values: pickled to a process, shipped to a Ray node).

    Attributes:
        id: the cell id.
        settings: the cell's settings (``model`` + flag keys, TOML values, absolute paths).
        out: the cell's folder, ``DIR/cells/<id>``, a path the worker can write (shared filesystem).
        cpus: CPUs reserved for the cell; torch runs on that many threads unless ``settings`` sets ``threads``.
        gpus: GPUs reserved (1 with ``device = "cuda"``).
    """

    id: str
    settings: Mapping[str, Any]
    out: str
    cpus: int = 1
    gpus: int = 0


def one_line(text: str) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(text).split())


def failed_outcome(error: str, detail: str | None = None, seconds: float | None = None) -> dict[str, Any]:
    """The outcome of a cell that did not finish: its one-line ``error`` and, for a bug, the traceback."""
    return {"ok": False, "error": one_line(error) or "failed without a message", "detail": detail,
            "seconds": seconds, "host": socket.gethostname()}


def outcome_from_report(rep: Report) -> dict[str, Any]:
    """The store's result columns (dfmpc_deploy.sweep.store) read from a build's typed report."""
    acc = rep.accuracy
    top1 = {k: v.top1 for k, v in acc.results.items()} if acc is not None else None
    top5 = {k: v.top5 for k, v in acc.results.items()} if acc is not None else None
    key = rep.method if top1 is not None and rep.method in top1 else "quantized_uncompensated"
    packed = rep.size_bytes.packed
    return {"ok": True, "method": rep.method,
            "top1": top1.get(key) if top1 else None, "top5": top5.get(key) if top5 else None,
            "top1_variants": top1, "top5_variants": top5, "images": acc.n if acc is not None else None,
            "size_bytes": packed.packed if packed is not None else None, "fp32_bytes": rep.size_bytes.fp32,
            "bits": rep.bits.display(), "avg_code_bits": rep.bits.avg_code_bits,
            "data_used": rep.recipe.data_used, "fine_tuning": rep.recipe.fine_tuning,
            "compensate_seconds": rep.timings_s.get("compensate"), "error": None, "detail": None}


def run_cell(task: CellTask) -> dict[str, Any]:
    """Build one cell into ``task.out`` (replacing it) and return its outcome.

    Args:
        task: the cell.

    Returns:
        ``{"ok": True, "top1": ..., "size_bytes": ..., "seconds": ..., ...}`` (see
        :func:`outcome_from_report`) or ``{"ok": False, "error": one line, "detail": traceback or None, ...}``.
    """
    from ..build import run_build  # lazy: build imports torch; the sweep package (grids, store, pages) does not

    t0 = time.perf_counter()
    try:
        cfg = build_config(task.settings, task.out, threads=task.cpus)
        rep = run_build(cfg, progress=None, warn=lambda m: None)  # the report's notes keep every warning
        outcome = outcome_from_report(rep)
    except DfmpcError as err:
        return failed_outcome(str(err), seconds=round(time.perf_counter() - t0, 3))
    except Exception as err:  # a bug in one cell must not stop the sweep: recorded with its traceback
        return failed_outcome(f"{type(err).__name__}: {err}", traceback.format_exc(),
                              round(time.perf_counter() - t0, 3))
    return {**outcome, "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname()}
