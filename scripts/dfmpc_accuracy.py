"""Measure DF-MPC variants on the real CIFAR-10 ResNets in ../shared/data.

Goal: ResNet-56 within 3 points of FP32, ResNet-20 within 5.

Prints a Markdown table and writes results/dfmpc_accuracy.json. Every row uses the same images and the same
bits; only 'real-*' rows read training-free real images (200 test images, disjoint from nothing: a labelled
reference, never a default). Usage:

    python scripts/dfmpc_accuracy.py                       # both models, all 10,000 images (~15 min on 2 cores)
    python scripts/dfmpc_accuracy.py --models resnet20 --limit 2000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from cases import MODELS, load_case

from dfmpc_deploy.core.config import parse_bits
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.evaluate import accuracy

ROOT = Path(__file__).resolve().parents[1]

# name -> (recipe settings, description); every row runs the dfmpc recipe except "rtn"
VARIANTS = {
    "rtn": (dict(recipe="rtn"), "round-to-nearest, FP BN statistics"),
    "paper-c, FP stats": (dict(c_mode="paper", recal="none", rounding="nearest"),
                          "closed-form c (Eq. 27), no re-estimation (D3-a)"),
    "synthetic recal": (dict(rounding="nearest"), "BN stats of low-bit layers from synthetic inputs"),
    "synthetic recal + paper-c": (dict(c_mode="paper", rounding="nearest"),
                                  "paper's c solved with the re-estimated statistics"),
    "synthetic recal + norm-c": (dict(c_mode="norm", rounding="nearest"), "c without least-squares shrinkage"),
    "synthetic recal + gptq (no grid search)": (dict(grid_search=False),
                                                "error-feedback codes on the TWN/DoReFa grid, synthetic H"),
    "synthetic recal + gptq (no grid search) + paper-c": (dict(c_mode="paper", grid_search=False),
                                                          "as above, paper c folded"),
    "synthetic recal + gptq (no grid search, all layers)": (
        dict(rounding_scope="all", grid_search=False), "error feedback on every layer"),
    "synthetic recal + gptq + grid search": ({}, "the default: grid step chosen per low-bit layer"),
    "real recal [reference]": (dict(recal="real", rounding="nearest"), "200 REAL images (not data-free)"),
    "real recal + gptq [reference]": (dict(recal="real", grid_search=False), "200 REAL images"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", default="2/6")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on N evenly spaced images (default all)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS) + ["default"])
    ap.add_argument("--per-channel", action="store_true", help="per-output-channel quantizer grids")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="synthesis seeds (rows report the mean)")
    ap.add_argument("--out", default=str(ROOT / "results" / "dfmpc_accuracy.json"))
    args = ap.parse_args()
    bits = parse_bits(args.bits)
    results = {"bits": str(bits), "per_channel": args.per_channel, "limit": args.limit, "seeds": args.seeds,
               "threads": torch.get_num_threads(), "models": {}}
    table = ["| model | variant | top-1 % | top-5 % | gap to FP32 | compensate s |", "|---|---|---|---|---|---|"]
    for key in args.models:
        name, lm, data = load_case(key, args.limit)
        s = lm.spec
        real = data.images[torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[:200]]
        fp = accuracy(lm.module, data)
        rows = {"fp32": {**fp, "seconds": 0.0}}
        table.append(f"| {key} | fp32 | {fp['top1']:.2f} | {fp['top5']:.2f} | 0.00 | - |")
        print(table[0] + "\n" + table[1] + "\n" + table[-1], flush=True) if key == args.models[0] else None
        base = {"bits": bits, "per_channel": args.per_channel}
        for vname in args.variants:
            over, desc = VARIANTS.get(vname, ({}, "the CLI default"))
            settings = {**base, **over}
            recipe = settings.pop("recipe", "dfmpc")
            accs, secs = [], []
            for seed in (args.seeds if recipe != "rtn" and settings.get("recal") != "real" else [0]):
                t = time.perf_counter()
                mp = compensate(lm.module, (3, s.input_size, s.input_size), recipe, arch=name, seed=seed,
                                real_inputs=real, **settings)
                secs.append(time.perf_counter() - t)
                accs.append(accuracy(mp.module, data))
            top1 = sum(a["top1"] for a in accs) / len(accs)
            top5 = sum(a["top5"] for a in accs) / len(accs)
            rows[vname] = {"top1": round(top1, 2), "top5": round(top5, 2), "n": accs[0]["n"],
                           "top1_per_seed": [a["top1"] for a in accs], "seconds": round(sum(secs) / len(secs), 2),
                           "estimator": mp.estimator, "description": desc,
                           "passes": [{"name": p.name, "config": p.config, "info": p.info} for p in mp.config.passes]}
            table.append(f"| {key} | {vname} | {top1:.2f} | {top5:.2f} | {top1 - fp['top1']:+.2f} | "
                         f"{sum(secs) / len(secs):.1f} |")
            print(table[-1], flush=True)
        results["models"][key] = {"model": name, "n": fp["n"], "variants": rows}
    print("\n".join(table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
