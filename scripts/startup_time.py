"""Import time of the package's entry modules, this working tree against a git ref (default ``main``).

The ref's tree is extracted with ``git archive`` into a temporary folder. Each sample is a fresh interpreter that
imports one module (``-c "import time; t = time.perf_counter(); import M; ..."``: the import alone, not the
interpreter's own start) with the tree's root first on ``sys.path``; the two trees take turns, sample by sample, so
the load of a shared machine falls on both alike. Per tree and module: the median and the min of ``--samples``
samples in seconds, and whether torch / numpy / onnx were loaded. Also ``dfmpc-deploy --help`` (the console command,
``python -m dfmpc_deploy --help``) end to end. Writes results/startup_time.json. Usage:

    python scripts/startup_time.py                    # against main, 7 samples
    python scripts/startup_time.py --ref HEAD~3 --samples 11
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from dfmpc_deploy.io.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("dfmpc_deploy", "dfmpc_deploy.report", "dfmpc_deploy.sweep", "dfmpc_deploy.build", "dfmpc_deploy.cli")
HEAVY = ("torch", "numpy", "onnx")
_PROBE = ("import sys, time, json; t = time.perf_counter(); import {m}; dt = time.perf_counter() - t; "
          "print(json.dumps([dt, sorted({{n.split('.')[0] for n in sys.modules}} & set({heavy!r})), "
          "sys.modules['dfmpc_deploy'].__file__]))")


def extract(ref: str, into: Path) -> str:
    """``ref``'s tree into ``into``; returns its commit hash."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True)
    with tempfile.TemporaryFile() as f:
        f.write(archive.stdout)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return commit


def sample(tree: Path, module: str) -> tuple[float, list[str]]:
    """One fresh interpreter importing ``module`` from ``tree``: (seconds, heavy packages it loaded)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); " + _PROBE.format(m=module, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                         check=True)
    seconds, heavy, where = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{module} was imported from {where}, not from {tree}")
    return seconds, heavy


def help_seconds(tree: Path) -> float:
    """``python -m dfmpc_deploy --help`` end to end (interpreter start included), from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dfmpc_deploy", "--help"], cwd=tree, env=env, capture_output=True,
                   check=True)
    return time.perf_counter() - t


def summary(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 4), "min_s": round(min(values), 4),
            "samples": [round(v, 4) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", default="main", help="git ref to compare against (default main)")
    ap.add_argument("--samples", type=int, default=7, help="fresh interpreters per tree and module")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "startup_time.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="startup-time-") as tmp:
        base = Path(tmp)
        commit = extract(args.ref, base)
        trees = {"ref": base, "tree": ROOT}
        times: dict[str, dict[str, list[float]]] = {k: {m: [] for m in (*MODULES, "--help")} for k in trees}
        heavy: dict[str, dict[str, list[str]]] = {k: {} for k in trees}
        for _ in range(args.samples):
            for module in MODULES:
                for key, tree in trees.items():  # the trees take turns: the same load falls on both
                    seconds, loaded = sample(tree, module)
                    times[key][module].append(seconds)
                    heavy[key][module] = loaded
            for key, tree in trees.items():
                times[key]["--help"].append(help_seconds(tree))
    result = {
        "what": "import time of each module in a fresh interpreter (the import alone), and `python -m dfmpc_deploy "
                "--help` end to end; median and min of the samples; 'heavy' = which of torch/numpy/onnx it loaded",
        "ref": args.ref, "ref_commit": commit,
        "tree": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip(),
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "modules": {m: {k: {**summary(times[k][m]), "heavy": heavy[k].get(m)} for k in trees}
                    for m in (*MODULES, "--help")},
    }
    for m, row in result["modules"].items():
        print(f"{m:<24} ref {row['ref']['median_s']:7.3f} s  tree {row['tree']['median_s']:7.3f} s  "
              f"heavy ref={row['ref']['heavy']} tree={row['tree']['heavy']}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
