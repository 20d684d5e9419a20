"""How `dfmpc-deploy sweep` scales: one fixed CPU-bound grid on the local pool (1 and 2 workers) and on Ray.

The grid: the real ResNet-20, ``--method dfmpc`` (synthesis dominates: CPU-bound), one cell per seed, each cell on
1 CPU (``threads = 1``), evaluated on ``--limit`` real CIFAR-10 test images. Every run starts from an empty sweep
folder and goes through :func:`dfmpc_deploy.sweep.run_sweep`, the driver of the CLI. Measured per run:

* ``run_s``: first submission to last outcome (the engine already started); ``start_s``: starting the engine
  (``ray.init`` of a local cluster; the local pool starts its workers on the first submissions, inside ``run_s``);
* ``cell_s``: the cells' own wall times on their workers, summed;
* ``overhead_s``: per cell, the driver's time from submission to outcome minus the cell's own time, averaged (worker
  start-up, scheduling, transfer).

A no-op grid (cells whose weights file is missing: they fail right after the imports) measures the engines' per-cell
overhead alone. ``--two-nodes`` also starts a two-node Ray cluster on this machine (``ray start --head --num-cpus 1``
and ``ray start --address ... --num-cpus 1``, each with ``--block``; both stopped by their pid afterwards) and runs
the grid with ``--address``. Writes results/sweep_scaling.json. Usage:

    python scripts/sweep_scaling.py                       # 4 cells: local x1, local x2, ray x2, no-op overheads
    python scripts/sweep_scaling.py --two-nodes --cells 4
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from cases import MODELS, SHARED

from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.sweep import Store, load_grid, make_engine, run_sweep
from dfmpc_deploy.sweep.engines import available_cpus

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def grid_text(cells: int, synth_steps: int, limit: int, weights: str | None = None) -> str:
    name, wfile = MODELS["resnet20"]
    weights = weights or str(SHARED / "weights" / "akamaster_cifar10" / wfile)
    return "\n".join([
        "[[model]]", f'name = "{name}"', f'weights = "{weights}"',
        f'data = "imagefolder:{SHARED / "cifar10-test-jpg" / "test"}"', f"limit = {limit}",
        "[grid]", "seed = [" + ", ".join(str(s) for s in range(cells)) + "]",
        "[build]", 'method = "dfmpc"', f"synth_steps = {synth_steps}", "threads = 1", 'device = "cpu"']) + "\n"


def measure(label: str, grid_file: Path, engine: str, workers: int, address: str | None = None) -> dict:
    """One sweep from an empty folder; the figures of the module docstring."""
    grid = load_grid(grid_file)
    with tempfile.TemporaryDirectory(prefix="sweep-scaling-") as tmp:
        out = Path(tmp) / "sweep"
        t = time.perf_counter()
        res = run_sweep(grid, out, make_engine(engine, address, workers))
        wall = time.perf_counter() - t
        with Store(out / "results.sqlite", create=False) as store:
            rows = store.rows()
    over = [res.latency[i] - res.cell_seconds[i] for i in res.ran]
    row = {"run": label, "engine": engine, "workers": workers, "address": address, "cells": len(res.ran),
           "done": res.done, "failed": res.failed, "wall_s": round(wall, 2),
           "start_s": round(res.engine_start_seconds, 2),
           "run_s": round(res.seconds, 2), "cell_s": round(sum(res.cell_seconds.values()), 2),
           "overhead_s": round(statistics.mean(over), 3) if over else None,
           "overhead_max_s": round(max(over), 3) if over else None,
           "hosts": sorted({r.host for r in rows if r.host}), "errors": sorted({r.error for r in rows if r.error})}
    print(f"{label:<22} run {row['run_s']:7.1f} s  start {row['start_s']:5.1f} s  cells {row['cell_s']:7.1f} s  "
          f"overhead/cell {row['overhead_s']} s  done {res.done} failed {res.failed}", flush=True)
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"ray start did not say '{text}' within {timeout} s (see {log})")


def two_nodes(grid_file: Path, tmp: Path) -> dict:
    """A head and a second node (1 CPU each) on this machine; the sweep joins them with --address."""
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # token authentication, Ray's default for a new cluster
    os.environ["RAY_AUTH_MODE"] = "token"  # the driver joins with the same token (~/.ray/auth_token)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block"]
    head_cmd = [str(RAY), "start", "--head", "--port", str(port), "--include-dashboard=false",
                "--temp-dir", str(tmp / "ray"), *common]
    node_cmd = [str(RAY), "start", "--address", f"127.0.0.1:{port}", *common]
    procs: list[subprocess.Popen] = []
    try:
        for i, cmd in enumerate((head_cmd, node_cmd)):
            log = tmp / f"node{i}.log"
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env))
            _wait_for(log, "Ray runtime started", procs[-1])
        time.sleep(2)  # the second node registers with the head
        row = measure("ray, 2 nodes x 1 CPU", grid_file, "ray", 2, f"127.0.0.1:{port}")
        row["commands"] = [" ".join(head_cmd), " ".join(node_cmd)]
        return row
    finally:
        for p in reversed(procs):  # --block: SIGTERM stops the node and the processes it started
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4, help="cells (seeds) of the grid")
    ap.add_argument("--synth-steps", type=int, default=30)
    ap.add_argument("--limit", type=int, default=100, help="evaluation images per cell")
    ap.add_argument("--noop-cells", type=int, default=8, help="cells of the no-op grid (0: skip)")
    ap.add_argument("--no-ray", action="store_true", help="the local pool only")
    ap.add_argument("--two-nodes", action="store_true", help="also a two-node Ray cluster started on this machine")
    ap.add_argument("--note", default="", help="free text for the JSON (e.g. machine load)")
    ap.add_argument("--out", default=str(ROOT / "results" / "sweep_scaling.json"))
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="sweep-scaling-grid-") as td:
        tmp = Path(td)
        grid = tmp / "grid.toml"
        grid.write_text(grid_text(args.cells, args.synth_steps, args.limit))
        noop = tmp / "noop.toml"
        noop.write_text(grid_text(args.noop_cells, args.synth_steps, args.limit, weights=str(tmp / "missing.th")))
        load_before = os.getloadavg()
        runs.append(measure("local, 1 worker", grid, "local", 1))
        runs.append(measure("local, 2 workers", grid, "local", 2))
        if not args.no_ray:
            runs.append(measure("ray (local), 2 CPUs", grid, "ray", 2))
        if args.noop_cells:
            runs.append(measure("no-op, local, 2", noop, "local", 2))
            if not args.no_ray:
                runs.append(measure("no-op, ray, 2", noop, "ray", 2))
        if args.two_nodes and not args.no_ray:
            runs.append(two_nodes(grid, tmp))
        load_after = os.getloadavg()
    by = {r["run"]: r for r in runs}
    one, two = by["local, 1 worker"], by["local, 2 workers"]
    summary = {"local_2_over_1": round(two["run_s"] / one["run_s"], 3)}
    if "ray (local), 2 CPUs" in by:
        ray = by["ray (local), 2 CPUs"]
        summary["ray_minus_local2_per_cell_s"] = round((ray["run_s"] - two["run_s"]) / args.cells, 3)
        summary["ray_overhead_per_cell_s"] = ray["overhead_s"]
        summary["ray_init_s"] = ray["start_s"]
    if "no-op, ray, 2" in by:
        summary["noop_ray_overhead_per_cell_s"] = by["no-op, ray, 2"]["overhead_s"]
        summary["noop_local_overhead_per_cell_s"] = by["no-op, local, 2"]["overhead_s"]
    print("\n| run | cells | run s | engine start s | cells' own s (sum) | overhead per cell s |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['run']} | {r['cells']} | {r['run_s']:.1f} | {r['start_s']:.1f} | {r['cell_s']:.1f} | "
              f"{r['overhead_s']} |")
    print("\n" + ", ".join(f"{k} = {v}" for k, v in summary.items()))
    result = {"grid": {"model": MODELS["resnet20"][0], "method": "dfmpc", "cells": args.cells,
                       "synth_steps": args.synth_steps, "limit": args.limit, "threads_per_cell": 1},
              "machine": {"cpus": available_cpus(), "platform": platform.platform(), "torch": torch.__version__,
                          "loadavg_before": [round(v, 2) for v in load_before],
                          "loadavg_after": [round(v, 2) for v in load_after]},
              "note": args.note, "runs": runs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
