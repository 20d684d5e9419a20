"""Run related methods on the same model, data and bit budget, as one sweep, and print one Markdown table.

Each (model, method) is one cell of a ``dfmpc-deploy sweep`` (the same build as ``dfmpc-deploy build``, into
``SWEEP_DIR/cells/<cell id>/``); the table is read from ``SWEEP_DIR/results.sqlite``. The sweep is resumable: the
same command again runs only the cells not done, and more methods or models add cells. Every row quantizes the
same layers to the same bits (dfmpc_deploy.passes.recipes); the packed size is the cell's ``model.dfmpc``; wall time
is the compensation itself (the report's ``timings_s.compensate``: synthesis, allocation and fine-tuning included,
evaluation excluded). Writes results/compare.json (the table, plus each method's passes from its report.json).
Usage:

    python scripts/compare.py                                   # resnet20 + resnet56, all 10,000 images
    python scripts/compare.py --models resnet20 --limit 2000 --methods rtn dfq
    python scripts/compare.py --engine ray --max-parallel 4     # the cells as Ray tasks
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from cases import MODELS, SHARED

from dfmpc_deploy.cli import main as cli_main
from dfmpc_deploy.core.config import parse_bits
from dfmpc_deploy.core.quantizers import DEFAULT_GRID, GRIDS
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.passes.recipes import RECIPES
from dfmpc_deploy.report import read_report
from dfmpc_deploy.sweep.grid import load_grid
from dfmpc_deploy.sweep.run import cell_rows

ROOT = Path(__file__).resolve().parents[1]


def grid_text(models: list[str], methods: list[str], bits: str, limit: int | None, seed: int, finetune_steps: int,
              threads: int, grid: str = DEFAULT_GRID) -> str:
    """The sweep's grid file: one [[model]] table per model (real weights, the CIFAR-10 test set), the methods as
    the one axis, the rest shared."""
    lines = []
    for key in models:
        name, wfile = MODELS[key]
        lines += ["[[model]]", f'name = "{name}"', f'weights = "{SHARED / "weights" / "akamaster_cifar10" / wfile}"',
                  f'data = "imagefolder:{SHARED / "cifar10-test-jpg" / "test"}"']
        if limit:
            lines.append(f"limit = {limit}")
    lines += ["[grid]", "method = [" + ", ".join(f'"{m}"' for m in methods) + "]",
              "[build]", f'bits = "{bits}"', f'grid = "{grid}"', f"seed = {seed}", f"finetune_steps = {finetune_steps}",
              f"threads = {threads}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--bits", default="2/6")
    ap.add_argument("--grid", choices=GRIDS, default=DEFAULT_GRID,
                    help="k-bit grid of every method ('dorefa': the paper's; use another --sweep-dir per grid)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on N evenly spaced images (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-steps", type=int, default=400,
                    help="gdfq's budget: generator + fine-tuning iterations (batch 32)")
    ap.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) of each cell")
    ap.add_argument("--note", default="", help="free text for the table header and the JSON (e.g. machine load)")
    ap.add_argument("--out", default=str(ROOT / "results" / "compare.json"))
    ap.add_argument("--sweep-dir", default=str(ROOT / "out" / "compare"),
                    help="the sweep folder (kept: a re-run runs only what is not done)")
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--address", default=None, help="a Ray cluster to join (with --engine ray)")
    ap.add_argument("--max-parallel", type=int, default=None, help="cells at once (default: CPUs // --threads)")
    args = ap.parse_args()
    bits = parse_bits(args.bits)
    sweep_dir = Path(args.sweep_dir)
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        grid_file = Path(tmp) / "compare.toml"
        grid_file.write_text(grid_text(args.models, args.methods, str(bits), args.limit, args.seed,
                                       args.finetune_steps, args.threads, args.grid), encoding="utf-8")
        argv = ["sweep", str(grid_file), "--out", str(sweep_dir), "--engine", args.engine]
        argv += ["--address", args.address] if args.address else []
        argv += ["--max-parallel", str(args.max_parallel)] if args.max_parallel else []
        code = cli_main(argv)
        if code not in (0, 1):  # 1: a cell failed; its row says so below
            return code
        rows = cell_rows(load_grid(grid_file), sweep_dir)

    n_label = f"{args.limit} evenly spaced" if args.limit else "all 10,000"
    header = [f"CIFAR-10 test JPEGs ({n_label} images), weights {bits}, activations FP32, "
              f"threads {args.threads} per cell; size budget: the fixed {bits} pairing's packed file "
              f"(dfmpc-alloc chooses per-layer widths {bits.low}..{bits.high} within it); gdfq: "
              f"{args.finetune_steps} steps of batch 32; sweep {sweep_dir} ({args.engine})"
              + (f"; {args.note}" if args.note else ""), "",
              "| model | method | data used | fine-tuning | bits | packed size (bytes) | top-1 % | top-5 % "
              "| wall time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    table = list(header)
    results: dict = {"bits": str(bits), "grid": args.grid, "limit": args.limit, "images": n_label, "seed": args.seed,
                     "threads": args.threads, "torch": torch.__version__, "note": args.note, "engine": args.engine,
                     "sweep": str(sweep_dir), "models": {}}
    for key in args.models:
        name = MODELS[key][0]
        mine = [(c, r) for c, r in rows if c.model == name]
        done = [r for _, r in mine if r is not None and r.status == "done"]
        methods: dict = {}
        if done and done[0].top1_variants:
            r0 = done[0]
            fp = {"top1": r0.top1_variants["fp32"], "top5": (r0.top5_variants or {}).get("fp32"), "n": r0.images}
            methods["fp32"] = {**fp, "size_bytes": r0.fp32_bytes, "data_used": "-", "fine_tuning": False}
            table.append(f"| {key} | fp32 | - | - | 32 | {r0.fp32_bytes} | {fp['top1']:.2f} | {fp['top5']:.2f} | - |")
        for c, r in mine:
            m = c.settings["method"]
            if r is None or r.status != "done":
                why = r.error if r is not None and r.error else "not run"
                methods[m] = {"status": r.status if r else "pending", "error": why, "cell": c.id}
                table.append(f"| {key} | {m} | - | - | - | - | {'failed' if r and r.status == 'failed' else '-'} "
                             f"| - | - |")
                continue
            rep = read_report(sweep_dir / "cells" / c.id)
            alloc = rep.allocation
            label = f"{r.bits} ({r.avg_code_bits:.2f}/w)" if alloc is None else f"{r.bits}"
            methods[m] = {"top1": r.top1, "top5": r.top5, "n": r.images, "size_bytes": r.size_bytes,
                          "wall_seconds": r.compensate_seconds, "data_used": r.data_used,
                          "fine_tuning": bool(r.fine_tuning), "description": rep.recipe.description,
                          "estimator": rep.statistics.estimator if rep.statistics else None,
                          "avg_code_bits": r.avg_code_bits, "cell": c.id, "report": f"cells/{c.id}/report.json",
                          "passes": [{"name": p.name, "config": p.config, "seconds": p.seconds, "info": p.info}
                                     for p in rep.recipe.passes]}
            if alloc is not None:
                methods[m]["allocation"] = alloc.to_dict()
                methods[m]["layer_bits"] = {row.layer: row.bits for row in rep.layers}
            table.append(f"| {key} | {m} | {r.data_used} | {'yes' if r.fine_tuning else 'no'} | {label} | "
                         f"{r.size_bytes} | {r.top1:.2f} | {r.top5:.2f} | {r.compensate_seconds:.1f} |")
        results["models"][key] = {"model": name, "n": done[0].images if done else None, "methods": methods}
    print("\n".join(table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
