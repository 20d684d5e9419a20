"""results.sqlite: pending rows added once, outcomes recorded in one transaction each, foreign files refused."""
import sqlite3

import pytest

from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.sweep.cell import failed_outcome
from dfmpc_deploy.sweep.store import SCHEMA_VERSION, Store

DONE = {"ok": True, "method": "rtn", "top1": 71.5, "top5": 95.0, "top1_variants": {"fp32": 80.0, "rtn": 71.5},
        "top5_variants": {"fp32": 99.0, "rtn": 95.0}, "images": 20, "size_bytes": 148121, "fp32_bytes": 1084392,
        "bits": "2/6", "avg_code_bits": 4.0, "data_used": "none", "fine_tuning": False, "seconds": 4.2,
        "compensate_seconds": 0.1, "error": None, "detail": None, "host": "h"}


def test_rows_are_added_once_and_keep_their_results(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        assert s.add([("a", "m", {"model": "m", "seed": 0}), ("b", "m", {"model": "m", "seed": 1})]) == 2
        assert s.statuses() == {"a": "pending", "b": "pending"}
        assert s.finish("a", DONE, "local") == "done"
        assert s.finish("b", failed_outcome("weights file 'x'\ndoes not exist"), "ray") == "failed"
        assert s.add([("a", "m", {"model": "m", "seed": 0}), ("c", "m", {"model": "m", "seed": 2})]) == 1
    with Store(tmp_path / "r.sqlite", create=False) as s:
        rows = {r.id: r for r in s.rows()}
    assert [r for r in rows] == ["a", "b", "c"]
    a, b = rows["a"], rows["b"]
    assert a.status == "done" and a.top1 == 71.5 and a.top1_variants == {"fp32": 80.0, "rtn": 71.5}
    assert a.size_bytes == 148121 and a.engine == "local" and a.runs == 1 and a.fine_tuning == 0
    assert a.settings == {"model": "m", "seed": 0}
    assert b.status == "failed" and b.error == "weights file 'x' does not exist" and b.engine == "ray"
    assert rows["c"].status == "pending" and rows["c"].runs == 0
    assert a.to_json() == {"id": "a", "settings": {"model": "m", "seed": 0}, "status": "done", "top1": 71.5,
                           "size_bytes": 148121, "seconds": 4.2, "error": None}


def test_status_is_one_of_three(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        s.add([("a", "m", {})])
    db = sqlite3.connect(tmp_path / "r.sqlite")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE cells SET status = 'running' WHERE id = 'a'")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_finishing_an_unknown_cell_changes_nothing(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        s.add([("a", "m", {})])
        with pytest.raises(KeyError):
            s.finish("zzz", DONE, "local")
        assert s.statuses() == {"a": "pending"}


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "r.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(DfmpcError, match="cannot be used as the sweep's results store"):
        Store(tmp_path / "r.sqlite")
    other = sqlite3.connect(tmp_path / "o.sqlite")
    other.execute("PRAGMA user_version = 7")
    other.close()
    with pytest.raises(DfmpcError, match="schema 7"):
        Store(tmp_path / "o.sqlite")
