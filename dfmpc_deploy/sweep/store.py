"""``DIR/results.sqlite``: one row per cell, written by the sweep's driver only.

Table ``cells`` (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`):

========================  ==============================================================================
``id``                    the cell id (:func:`dfmpc_deploy.sweep.grid.cell_id`), primary key
``model``                 model name
``settings``              the cell's settings, canonical JSON
``status``                ``'pending'`` (not run, or interrupted), ``'done'`` or ``'failed'``
``method``                ``--method``
``top1`` / ``top5``       the method's top-1 / top-5 % (the uncompensated model's for ``rtn``), NULL without data
``top1_variants``         JSON ``{variant: top-1 %}``: ``fp32``, ``quantized_uncompensated``, the method, exports
``top5_variants``         the same for top-5
``images``                evaluation images
``size_bytes``            the packed ``model.dfmpc`` file, NULL with ``no_pack``
``fp32_bytes``            the FP32 state dict
``bits``                  ``2/6`` or ``mixed 2..6 (...)``; ``avg_code_bits`` the packed code bits per weight
``data_used``             what the method reads (``none``, ``synthetic``, ``real``); ``fine_tuning`` 0/1
``seconds``               the cell's wall time on its worker (the build, from config to report)
``compensate_seconds``    the compensation alone (the report's ``timings_s.compensate``)
``error``                 one line for a failed cell; ``detail`` its traceback when the failure was a bug
``engine`` / ``host``     what ran it last; ``runs`` how many times it ran; ``added`` / ``finished`` UTC times
========================  ==============================================================================

Every change is one transaction, so an interrupted driver leaves each row as it was before or after the change.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DfmpcError

__all__ = ["Store", "Row", "SCHEMA_VERSION", "STATUSES"]

SCHEMA_VERSION = 1
STATUSES = ("pending", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    settings TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    method TEXT,
    top1 REAL,
    top5 REAL,
    top1_variants TEXT,
    top5_variants TEXT,
    images INTEGER,
    size_bytes INTEGER,
    fp32_bytes INTEGER,
    bits TEXT,
    avg_code_bits REAL,
    data_used TEXT,
    fine_tuning INTEGER,
    seconds REAL,
    compensate_seconds REAL,
    error TEXT,
    detail TEXT,
    engine TEXT,
    host TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    added TEXT NOT NULL,
    finished TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: Result columns a finished cell sets (the keys of a cell outcome, see dfmpc_deploy.sweep.cell).
RESULT_COLUMNS = ("method", "top1", "top5", "top1_variants", "top5_variants", "images", "size_bytes", "fp32_bytes",
                  "bits", "avg_code_bits", "data_used", "fine_tuning", "seconds", "compensate_seconds", "error",
                  "detail", "host")
_JSON_COLUMNS = ("top1_variants", "top5_variants")


@dataclass(frozen=True)
class Row:
    """One row of ``cells``; ``settings`` and the ``*_variants`` columns decoded."""

    id: str
    model: str
    settings: dict[str, Any]
    status: str
    method: str | None
    top1: float | None
    top5: float | None
    top1_variants: dict[str, float] | None
    top5_variants: dict[str, float] | None
    images: int | None
    size_bytes: int | None
    fp32_bytes: int | None
    bits: str | None
    avg_code_bits: float | None
    data_used: str | None
    fine_tuning: int | None
    seconds: float | None
    compensate_seconds: float | None
    error: str | None
    detail: str | None
    engine: str | None
    host: str | None
    runs: int
    added: str
    finished: str | None

    def to_json(self) -> dict[str, Any]:
        """The cell as ``sweep.json`` lists it."""
        return {"id": self.id, "settings": self.settings, "status": self.status, "top1": self.top1,
                "size_bytes": self.size_bytes, "seconds": self.seconds, "error": self.error}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    """The results store of one sweep folder.

    Args:
        path: ``DIR/results.sqlite``.
        create: create the file (and the table) when missing; False opens an existing store read-only and
            refuses a missing one.

    Raises:
        DfmpcError: the file is not a sweep store (another schema version, not SQLite), or cannot be opened.
    """

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        try:
            if create:
                self._db = sqlite3.connect(self.path, timeout=30)
            else:
                self._db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and create:
                with self._db:
                    self._db.executescript(_SCHEMA)
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise DfmpcError(f"'{self.path}' is not a results store of this version (schema {version}, "
                                 f"expected {SCHEMA_VERSION}); use a new sweep --out folder")
        except sqlite3.DatabaseError as err:
            raise DfmpcError(f"'{self.path}' cannot be used as the sweep's results store ({err}); use a new sweep "
                             "--out folder") from None
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, cells: Iterable[tuple[str, str, Mapping[str, Any]]]) -> int:
        """Insert ``(id, model, settings)`` rows as pending; rows already there keep their status and results.

        Returns:
            How many rows were new.
        """
        now = _now()
        with self._db:
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO cells (id, model, settings, status, added) VALUES (?, ?, ?, 'pending', ?)",
                [(cid, model, json.dumps(dict(settings)), now) for cid, model, settings in cells])
            return self._db.total_changes - before

    def statuses(self) -> dict[str, str]:
        """``{id: status}`` of every row."""
        return {r["id"]: r["status"] for r in self._db.execute("SELECT id, status FROM cells")}

    def finish(self, cid: str, outcome: Mapping[str, Any], engine: str) -> str:
        """Record a finished cell: ``done`` when ``outcome["ok"]``, else ``failed`` with its error.

        Args:
            cid: the cell id (must be in the store).
            outcome: what :func:`dfmpc_deploy.sweep.cell.run_cell` returned.
            engine: ``local`` or ``ray``.

        Returns:
            The new status.
        """
        status = "done" if outcome.get("ok") else "failed"
        values = {k: outcome.get(k) for k in RESULT_COLUMNS}
        for k in _JSON_COLUMNS:
            if values[k] is not None:
                values[k] = json.dumps(values[k], sort_keys=True)
        if values["fine_tuning"] is not None:
            values["fine_tuning"] = int(bool(values["fine_tuning"]))
        sets = ", ".join(f"{k} = :{k}" for k in values)
        with self._db:
            cur = self._db.execute(f"UPDATE cells SET status = :status, {sets}, engine = :engine, runs = runs + 1, "
                                   "finished = :finished WHERE id = :id",
                                   {**values, "status": status, "engine": engine, "finished": _now(), "id": cid})
            if cur.rowcount != 1:
                raise KeyError(f"cell {cid} is not in {self.path}")
        return status

    def set_pending(self, ids: Iterable[str]) -> None:
        """Mark cells pending again (a done cell whose report is gone runs again)."""
        with self._db:
            self._db.executemany("UPDATE cells SET status = 'pending' WHERE id = ?", [(i,) for i in ids])

    def set_meta(self, key: str, value: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def rows(self) -> list[Row]:
        """Every row, in the order the cells were first added."""
        out = []
        for r in self._db.execute("SELECT * FROM cells ORDER BY rowid"):
            d = dict(r)
            d["settings"] = json.loads(d["settings"])
            for k in _JSON_COLUMNS:
                d[k] = json.loads(d[k]) if d[k] is not None else None
            out.append(Row(**d))
        return out
