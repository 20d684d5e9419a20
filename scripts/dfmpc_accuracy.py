"""Measure DF-MPC variants on the real CIFAR-10 ResNets in ../shared/data (issue 2's accuracy goal).

Prints a Markdown table and writes results/dfmpc_accuracy.json. Every row uses the same images and the same
bits; only 'real-*' rows read training-free real images (200 test images, disjoint from nothing: a labelled
reference, never a default). Usage:

    python scripts/dfmpc_accuracy.py                       # both models, all 10,000 images (~15 min on 2 cores)
    python scripts/dfmpc_accuracy.py --models resnet20 --limit 2000
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from cases import MODELS, load_case

from calib_free import synthesize_inputs
from dfmpc_deploy.core.config import QuantConfig, parse_bits
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.passes.compensate import compensate
from dfmpc_deploy.zoo.evaluate import accuracy

ROOT = Path(__file__).resolve().parents[1]

# name -> (QuantConfig overrides, description)
VARIANTS = {
    "rtn": (dict(compensation=False, recal="none", rounding="nearest"), "round-to-nearest, FP BN statistics"),
    "paper-c, FP stats": (dict(compensation=True, recal="none", rounding="nearest"),
                          "closed-form c (Eq. 27), no re-estimation (D3-a)"),
    "synthetic recal": (dict(compensation=False, rounding="nearest"), "BN stats of low-bit layers from synthetic inputs"),
    "synthetic recal + paper-c": (dict(compensation=True, rounding="nearest"),
                                  "paper's c solved with the re-estimated statistics"),
    "synthetic recal + norm-c": (dict(compensation=True, c_mode="norm", rounding="nearest"),
                                 "c without least-squares shrinkage"),
    "synthetic recal + gptq (no grid search)": (dict(compensation=False, rounding="gptq", grid_search=False),
                                                "error-feedback codes on the TWN/DoReFa grid, synthetic H"),
    "synthetic recal + gptq (no grid search) + paper-c": (dict(compensation=True, rounding="gptq", grid_search=False),
                                                          "as above, paper c folded"),
    "synthetic recal + gptq (no grid search, all layers)": (
        dict(compensation=False, rounding="gptq", gptq_scope="all", grid_search=False), "error feedback on every layer"),
    "synthetic recal + gptq + grid search": (dict(compensation=False, rounding="gptq", grid_search=True),
                                             "the default: grid step chosen per low-bit layer"),
    "real recal [reference]": (dict(compensation=False, recal="real", rounding="nearest"), "200 REAL images (not data-free)"),
    "real recal + gptq [reference]": (dict(compensation=False, recal="real", rounding="gptq", grid_search=False),
                                      "200 REAL images"),
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
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bits = parse_bits(args.bits)
    results = {"bits": str(bits), "per_channel": args.per_channel, "limit": args.limit, "seeds": args.seeds, "models": {}}
    table = ["| model | variant | top-1 % | top-5 % | gap to FP32 | compensate s |", "|---|---|---|---|---|---|"]
    for key in args.models:
        name, lm, data = load_case(key, args.limit)
        s = lm.spec
        real = data.images[torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[:200]]
        fp = accuracy(lm.module, data)
        rows = {"fp32": {**fp, "seconds": 0.0}}
        table.append(f"| {key} | fp32 | {fp['top1']:.2f} | {fp['top5']:.2f} | 0.00 | - |")
        print(table[0] + "\n" + table[1] + "\n" + table[-1], flush=True) if key == args.models[0] else None
        base = QuantConfig(bits=bits, per_channel=args.per_channel)
        synth_cache: dict[int, tuple[torch.Tensor, float]] = {}
        for vname in args.variants:
            over, desc = VARIANTS.get(vname, ({}, "the CLI default"))
            accs, secs = [], []
            for seed in (args.seeds if replace(base, **over).recal == "synthetic" else [0]):
                cfg = replace(base, seed=seed, **over)
                shape = (3, s.input_size, s.input_size)
                syn_s = 0.0
                if cfg.recal == "synthetic":  # one synthesis per seed, shared by the variants (timed into each)
                    if seed not in synth_cache:
                        r = synthesize_inputs(lm.module, shape, cfg.synth_samples, cfg.synth_steps, cfg.synth_lr, seed)
                        synth_cache[seed] = (r.inputs, r.seconds)
                    syn_in, syn_s = synth_cache[seed]
                t = time.perf_counter()
                mp = compensate(lm.module, cfg, shape, arch=name, real_inputs=real,
                                synthetic=syn_in if cfg.recal == "synthetic" else None)
                secs.append(time.perf_counter() - t + syn_s)
                accs.append(accuracy(mp.module, data))
            top1 = sum(a["top1"] for a in accs) / len(accs)
            top5 = sum(a["top5"] for a in accs) / len(accs)
            rows[vname] = {"top1": round(top1, 2), "top5": round(top5, 2), "n": accs[0]["n"],
                           "top1_per_seed": [a["top1"] for a in accs], "seconds": round(sum(secs) / len(secs), 2),
                           "estimator": mp.estimator, "description": desc, "config": {
                               k: v for k, v in vars(cfg).items() if k != "bits"}}
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
