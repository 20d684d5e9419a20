"""Run related methods on the same model, data and bit budget and print one Markdown table.

Every row quantizes the same layers to the same bits (dfmpc_deploy.passes.recipes); the packed size comes from
``save_packed`` to a temporary file; wall time covers the method itself (synthesis included), not evaluation.
Writes results/compare.json. Usage:

    python scripts/compare.py                                   # resnet20 + resnet56, all 10,000 images
    python scripts/compare.py --models resnet20 --limit 2000 --methods rtn dfq
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
from dfmpc_deploy.io.container import avg_code_bits, fp32_nbytes, save_packed
from dfmpc_deploy.passes.recipes import RECIPES, compensate
from dfmpc_deploy.zoo.evaluate import accuracy

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--bits", default="2/6")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on N evenly spaced images (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-steps", type=int, default=400,
                    help="gdfq's budget: generator + fine-tuning iterations (batch 32)")
    ap.add_argument("--note", default="", help="free text for the table header and the JSON (e.g. machine load)")
    ap.add_argument("--out", default=str(ROOT / "results" / "compare.json"))
    args = ap.parse_args()
    bits = parse_bits(args.bits)
    settings = {"bits": bits, "finetune_steps": args.finetune_steps}
    n_label = f"{args.limit} evenly spaced" if args.limit else "all 10,000"
    header = [f"CIFAR-10 test JPEGs ({n_label} images), weights {bits}, activations FP32, "
              f"threads {torch.get_num_threads()}; size budget: the fixed {bits} pairing's packed file "
              f"(dfmpc-alloc chooses per-layer widths {bits.low}..{bits.high} within it); gdfq: "
              f"{args.finetune_steps} steps of batch 32" + (f"; {args.note}" if args.note else ""), "",
              "| model | method | data used | fine-tuning | bits | packed size (bytes) | top-1 % | top-5 % "
              "| wall time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    table = list(header)
    results = {"bits": str(bits), "limit": args.limit, "images": n_label, "seed": args.seed,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "note": args.note, "models": {}}
    for key in args.models:
        name, lm, data = load_case(key, args.limit)
        s = lm.spec
        shape = (3, s.input_size, s.input_size)
        fp = accuracy(lm.module, data)
        fp_size = fp32_nbytes(lm.module)
        rows = {"fp32": {**fp, "size_bytes": fp_size, "data_used": "-", "fine_tuning": False}}
        table.append(f"| {key} | fp32 | - | - | 32 | {fp_size} | {fp['top1']:.2f} | "
                     f"{fp['top5']:.2f} | - |")
        print(table[-1], flush=True)
        for m in args.methods:
            spec = RECIPES[m]
            t = time.perf_counter()
            mp = compensate(lm.module, shape, m, arch=name, seed=args.seed,
                            **{k: v for k, v in settings.items() if k in spec.fields()})
            wall = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as tmp:
                packed = save_packed(mp, Path(tmp) / "model.dfmpc")["packed"]
            acc = accuracy(mp.module, data)
            rows[m] = {**acc, "size_bytes": packed, "wall_seconds": round(wall, 2), "data_used": spec.data_used,
                       "fine_tuning": spec.fine_tuning, "description": spec.description, "estimator": mp.estimator,
                       "passes": [{"name": p.name, "config": p.config, "seconds": p.seconds, "info": p.info}
                                  for p in mp.config.passes]}
            alloc = mp.config.record("allocate")
            alloc = alloc.info if alloc is not None and "bits_histogram" in alloc.info else None
            avg = avg_code_bits(mp.layers.values())
            label = f"mixed {bits.low}..{bits.high} ({avg:.2f}/w)" if alloc else f"{bits} ({avg:.2f}/w)"
            rows[m]["avg_code_bits"] = round(avg, 4)
            if alloc:
                rows[m]["allocation"] = alloc
                rows[m]["layer_bits"] = {n: q.bits for n, q in mp.layers.items()}
            table.append(f"| {key} | {m} | {spec.data_used} | {'yes' if spec.fine_tuning else 'no'} | {label} | "
                         f"{packed} | {acc['top1']:.2f} | {acc['top5']:.2f} | {wall:.1f} |")
            print(table[-1], flush=True)
        results["models"][key] = {"model": name, "n": fp["n"], "methods": rows}
    print("\n" + "\n".join(table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
