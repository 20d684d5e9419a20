"""Structured fuzzing of the .dfmpc reader (tests/hostile/fuzz_packed.py): >= 5,000 mutants a run, in a subprocess
under RLIMIT_AS (its baseline + 256 MiB) and a timeout; 0 crashes, 0 hangs.

The seed is fixed (reproducible); set DFMPC_FUZZ_SEED to explore others, and DFMPC_FUZZ_CASES for longer runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_fuzz_packed_reader():
    seed = int(os.environ.get("DFMPC_FUZZ_SEED", "0"))
    cases = max(5000, int(os.environ.get("DFMPC_FUZZ_CASES", "5000")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.hostile.fuzz_packed", "--cases", str(cases), "--seed", str(seed),
                        "--memory-mib", "256"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.stdout.strip(), r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["n_crashes"] == 0, json.dumps(out["crashes"][:5], indent=1) + f"\nseed {seed}"
    assert not out["slow"], out["slow"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum(out["outcomes"].values()) == out["cases"] >= 5000
    # the mutants reach every stage: some are refused, some load (payload values re-signed), every mutator ran
    assert out["outcomes"]["loaded"] > 200 and out["outcomes"]["refused"] > 2000, out["outcomes"]
    assert set(out["mutations"]) == {"field", "record", "records", "payload", "bytes", "splice", "string"}
