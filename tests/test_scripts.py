"""The measurement scripts still run end to end (tiny budgets: the numbers are checked for shape, not quality)."""
import json
import subprocess
import sys

import pytest

from dfmpc_deploy.sweep import Store
from tests.conftest import ROOT, needs_shared


@needs_shared
def test_compare_runs_as_a_sweep_and_reads_its_table_from_the_store(tmp_path):
    out, sweep = tmp_path / "c.json", tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "scripts" / "compare.py"), "--models", "resnet20", "--limit", "40",
           "--methods", "rtn", "gdfq", "--finetune-steps", "2", "--out", str(out), "--sweep-dir", str(sweep)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| resnet20 |")]
    assert len(rows) == 3  # fp32 + 2 methods
    data = json.loads(out.read_text())["models"]["resnet20"]["methods"]
    assert set(data) == {"fp32", "rtn", "gdfq"}
    assert data["gdfq"]["fine_tuning"] is True and data["rtn"]["fine_tuning"] is False
    for m in ("rtn", "gdfq"):
        assert {"top1", "size_bytes", "wall_seconds", "data_used", "avg_code_bits", "cell"} <= set(data[m])
        assert data[m]["size_bytes"] < data["fp32"]["size_bytes"] / 5
        assert (sweep / "cells" / data[m]["cell"] / "report.json").is_file()
    with Store(sweep / "results.sqlite", create=False) as store:
        by_method = {r.settings["method"]: r for r in store.rows()}
    assert {m: r.top1 for m, r in by_method.items()} == {m: data[m]["top1"] for m in ("rtn", "gdfq")}
    mtimes = {p: p.stat().st_mtime_ns for p in (sweep / "cells").rglob("*")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # resumed: nothing left to run
    assert again.returncode == 0 and [ln for ln in again.stdout.splitlines() if ln.startswith("| resnet20 |")] == rows
    assert {p: p.stat().st_mtime_ns for p in (sweep / "cells").rglob("*")} == mtimes


@needs_shared
def test_bench_latency_times_every_ort_variant_and_scores_the_exports(tmp_path):
    out = tmp_path / "lat.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_latency.py"), "--models",
                          "resnet56_cifar10_optA", "--limit", "20", "--batch-sizes", "1", "--min-iters", "2",
                          "--min-seconds", "0.05", "--quick", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert set(run["latency_ms"]) == {"fp32", "wdq", "w8a8", "w8a8_ort"}
    assert all(v["1"]["p50"] > 0 for v in run["latency_ms"].values())
    assert {"onnx_wdq", "onnx_w8a8", "onnx_w8a8_ort"} <= set(run["accuracy"])


@needs_shared
def test_export_parity_compares_export_with_build(tmp_path):
    out = tmp_path / "ep.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_parity.py"), "--model",
                          "resnet20_cifar10_optA", "--limit", "20", "--quick", "--threads", "1",
                          "--replay-model", "none", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    run = json.loads(out.read_text())["export_vs_build"]
    assert set(run["variants"]) == {"fp32", "fp16", "wdq", "w8a8", "w8a8_ort"} and run["images"] == 20
    assert all(v["bytes_equal"] and v["max_abs_diff_outputs"] == 0 for v in run["variants"].values())
    assert all(run["goals"].values()) and run["input_source"] == "file"


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="compares against a git ref: needs a git checkout")
def test_startup_time_compares_the_tree_with_a_ref(tmp_path):
    out = tmp_path / "st.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "startup_time.py"), "--ref", "HEAD", "--samples", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["modules"]
    assert set(rows) == {"dfmpc_deploy", "dfmpc_deploy.report", "dfmpc_deploy.sweep", "dfmpc_deploy.build",
                         "dfmpc_deploy.cli", "--help"}
    assert all(row[k]["median_s"] > 0 for row in rows.values() for k in ("ref", "tree"))
    assert rows["dfmpc_deploy"]["tree"]["heavy"] == [] and "torch" in rows["dfmpc_deploy.build"]["ref"]["heavy"]
