"""``dfmpc-deploy sweep GRID.toml --out DIR [--engine local|ray] [--address ADDR] [--max-parallel N] [--list]``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._deps import require
from ..core.options import positive_int
from ..core.progress import Progress
from ..errors import UsageError
from ..io.files import emit
from ..io.outdir import interrupt_status
from .engines import make_engine
from .grid import load_grid
from .run import cell_rows, run_sweep

__all__ = ["add_parser"]

_EXAMPLE = """example (grid.toml):
  [[model]]
  name = "resnet20_cifar10_optA"
  weights = "../shared/data/weights/akamaster_cifar10/resnet20-12fca82f.th"
  data = "imagefolder:../shared/data/cifar10-test-jpg/test"
  limit = 200
  [grid]
  method = ["rtn", "dfmpc"]
  bits = ["2/6", "4"]
  seed = [0, 1]
  [build]
  synth_steps = 5

  dfmpc-deploy sweep grid.toml --out sweeps/r20               # local worker processes
  dfmpc-deploy sweep grid.toml --out sweeps/r20 --engine ray  # a local Ray cluster
  dfmpc-deploy sweep grid.toml --out sweeps/r20 --engine ray --address HEAD_IP:6379   # ray start --head
  dfmpc-deploy sweep grid.toml --out sweeps/r20 --list        # the cells and their status, nothing run"""


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """Register the ``sweep`` subcommand on ``sub`` (argparse subparsers), with the shared options ``common``."""

    p = sub.add_parser("sweep", parents=[common], help="run a grid of builds (models x flags), resumable, locally or "
                                                       "on Ray; results in one SQLite store and a Pareto page",
                       description="Run every cell of GRID.toml (each one 'build', writing DIR/cells/<cell id>/) that "
                                   "is not done yet, record it in DIR/results.sqlite and write DIR/sweep.json and "
                                   "DIR/sweep.html. Keys of the grid file are build flags without dashes. Exit "
                                   "status 1 when a cell failed (its error is recorded; the other cells still run).",
                       epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", type=Path, metavar="GRID.toml", help="the grid file")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the sweep folder (created; a re-run with the same DIR runs only the cells not done)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local = worker processes on this machine (default); ray = Ray tasks (pip install "
                        "'dfmpc-deploy[sweep]')")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="join a running Ray cluster (printed by 'ray start --head') instead of starting one; "
                        "paths in the grid must be readable on every node (shared filesystem)")
    p.add_argument("--max-parallel", type=positive_int, metavar="N",
                   help="cells at once (default: CPUs // the CPUs a cell declares with its threads flag, 1 by "
                        "default)")
    p.add_argument("--list", action="store_true", help="print the cells and their status; run nothing")
    p.set_defaults(func=_cmd_sweep)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _list(args) -> int:
    grid = load_grid(args.grid)
    rows = cell_rows(grid, args.out)

    if args.json:
        emit(json.dumps([{"id": c.id, "settings": dict(c.settings), "status": r.status if r else "pending",
                           "top1": r.top1 if r else None, "size_bytes": r.size_bytes if r else None,
                           "seconds": r.seconds if r else None, "error": r.error if r else None}
                          for c, r in rows], indent=2))
        return 0
    print(f"{'cell':<12}  {'status':<7}  {'top-1 %':>7}  {'bytes':>10}  {'s':>7}  model  grid point")
    for c, r in rows:
        status = r.status if r else "pending"
        line = (f"{c.id:<12}  {status:<7}  {_fmt(r.top1 if r else None, '.2f'):>7}  "
                f"{_fmt(r.size_bytes if r else None, ','):>10}  {_fmt(r.seconds if r else None, '.1f'):>7}  "
                f"{c.model}  {c.label()}")
        if r is not None and r.error:
            line += f"  error: {r.error}"
        print(line)
    counts = {s: sum((r.status if r else "pending") == s for _, r in rows) for s in ("done", "failed", "pending")}
    print(f"{len(rows)} cells: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending")
    return 0


def _cmd_sweep(args) -> int:
    if args.address and args.engine != "ray":
        raise UsageError("--address joins a Ray cluster: use it with --engine ray")
    if args.list:
        return _list(args)
    grid = load_grid(args.grid)
    engine = make_engine(args.engine, args.address, args.max_parallel)
    if args.engine == "ray":
        require("ray", "sweep")  # before any cell is planned, not after the store is opened

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        with Progress(enabled=None if not args.quiet else False) as prog:
            res = run_sweep(grid, args.out, engine, progress=prog, say=say)
    except KeyboardInterrupt as err:
        name, code = interrupt_status(err)
        print(f"interrupted ({name}): finished cells are kept in {args.out / 'results.sqlite'}, the running ones "
              "are pending; run the same command again to go on", file=sys.stderr)
        return code
    if args.json:
        emit((args.out / "sweep.json").read_text(encoding="utf-8"), end="")
    elif not args.quiet:
        print(f"{res.cells} cells: {res.done} done ({len(res.ran) - res.ran_failed} this run, "
              f"{res.skipped} already done), {res.failed} failed, {res.pending} pending; {res.seconds:.1f} s on "
              f"{args.engine}; {args.out / 'sweep.html'}")
    return 1 if res.failed else 0
