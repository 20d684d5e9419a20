"""Accuracy against size for sensitivity-based bit allocation: DF-MPC with per-layer widths chosen under
budgets that are fractions of the fixed low/high pairing's packed size.

Prints a Markdown table and writes results/alloc_budget.json. The fixed pairing's row (fraction "fixed") is the
default pipeline at the same seed, for reference. Usage:

    python scripts/alloc_budget.py                                   # resnet20 + resnet56, 0.8 0.9 1.0 1.2
    python scripts/alloc_budget.py --models resnet20 --fractions 0.9 1.1 --limit 2000
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from cases import MODELS, load_case

from dfmpc_deploy.core.config import parse_bits
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.io.container import avg_code_bits, save_packed
from dfmpc_deploy.passes.recipes import compensate, fixed_pairing_bytes
from dfmpc_deploy.zoo.evaluate import accuracy

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.9, 1.0, 1.2])
    ap.add_argument("--bits", default="2/6", help="candidate widths LOW..HIGH (and the fixed pairing's bits)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "alloc_budget.json"))
    args = ap.parse_args()
    bits = parse_bits(args.bits)
    lines = [f"CIFAR-10 test JPEGs ({args.limit or 'all 10,000'} images), candidate widths {bits.low}..{bits.high}, "
             f"seed {args.seed}, threads {torch.get_num_threads()}", "",
             "| model | budget | packed bytes | code bits/weight | widths (count per bit) | top-1 % | wall time s |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    out = {"bits": args.bits, "seed": args.seed, "limit": args.limit, "models": {}}
    for key in args.models:
        name, lm, data = load_case(key, args.limit)
        shape = (3, lm.spec.input_size, lm.spec.input_size)
        fixed_size = fixed_pairing_bytes(lm.module, bits, name)
        rows = []
        for frac in [None, *args.fractions]:
            budget = None if frac is None else int(fixed_size * frac)
            t = time.perf_counter()
            mp = compensate(lm.module, shape, arch=name, seed=args.seed, bits=bits, size_budget_bytes=budget)
            wall = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as tmp:
                packed = save_packed(mp, Path(tmp) / "m.dfmpc")["packed"]
            acc = accuracy(mp.module, data)
            hist: dict[int, int] = {}
            for q in mp.layers.values():
                hist[q.bits] = hist.get(q.bits, 0) + 1
            avg = avg_code_bits(mp.layers.values())
            label = f"fixed {bits} pairs" if frac is None else f"{frac:.2f} x fixed"
            rows.append({"budget": label, "budget_bytes": budget, "packed_bytes": packed,
                         "avg_code_bits": round(avg, 4), "bits_histogram": {str(b): n for b, n in sorted(hist.items())},
                         **acc, "wall_seconds": round(wall, 1)})
            lines.append(f"| {key} | {label} | {packed} | {avg:.2f} | "
                         f"{', '.join(f'{b}b:{n}' for b, n in sorted(hist.items()))} | {acc['top1']:.2f} | "
                         f"{wall:.1f} |")
            print(lines[-1], flush=True)
        out["models"][key] = {"model": name, "fixed_pairing_bytes": fixed_size, "rows": rows}
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
