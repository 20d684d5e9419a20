"""Synthesis at 224 px: full size against coarse to fine, by the BN-matching loss at full size and the time.

Models: the ImageNet ResNets with ``--weights random`` (their BN statistics come from image-like noise,
zoo.models.settle_bn_statistics_) and ``mobilenet_v2_restored``, the real ImageNet MobileNetV2 whose BN layers hold
the statistics of real images (../shared/data/MANIFEST.md). The measure is the scale-free BN-matching loss of the
returned inputs at full size (what synthesis minimises) and its median over the BN layers, not accuracy. For each
model and plan, ``calib_free.synthesize_inputs`` runs with the default budget's samples and steps, early stopping
off, and the loss of the returned inputs is evaluated again at full size. Prints a table and writes
results/synth_budget.json.

    python scripts/synth_budget.py [--models resnet18 resnet50 mobilenet_v2_restored] [--steps 40] [--samples 8]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from calib_free.synth import bn_matching_losses, synth_budget, synthesize_inputs
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 224, 224)
RESTORED = ROOT.parent / "shared" / "data" / "weights" / "mobilenet_v2_imagenet" / "mobilenet_v2_bn_restored.pth"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2_restored"])
    budget = synth_budget(SHAPE)
    ap.add_argument("--steps", type=int, default=budget.steps)
    ap.add_argument("--samples", type=int, default=budget.samples)
    ap.add_argument("--lr", type=float, default=0.25, help="the calibrate pass's synth_lr")
    ap.add_argument("--out", default=str(ROOT / "results" / "synth_budget.json"))
    args = ap.parse_args()
    plans = {"full size": 0.0, f"coarse to fine ({budget.coarse:.0%} at half size)": budget.coarse}
    rows = []
    print("| model | plan | steps | BN-matching loss at full size | median per BN | seconds |\n"
          "|---|---|---|---|---|---|")
    for name in args.models:
        if name == "mobilenet_v2_restored":
            model = load_model("mobilenet_v2", str(RESTORED), weights_format="torchvision-quantized").module
        else:
            model = load_model(name, "random").module
        for plan, coarse in plans.items():
            t = time.perf_counter()
            res = synthesize_inputs(model, SHAPE, n=args.samples, steps=args.steps, lr=args.lr, seed=0, patience=0,
                                    coarse=coarse)
            seconds = time.perf_counter() - t
            per_bn = sorted(bn_matching_losses(model, res.inputs).values())
            loss, median = sum(per_bn), per_bn[len(per_bn) // 2]
            rows.append({"model": name, "plan": plan, "coarse_steps": res.coarse_steps, "steps": res.steps,
                         "samples": args.samples, "loss_full_size": round(loss, 4), "median_per_bn": round(median, 4),
                         "seconds": round(seconds, 1)})
            print(f"| {name} | {plan} | {res.steps} | {loss:.3f} | {median:.4f} | {seconds:.1f} |", flush=True)
    atomic_write_json(args.out, {"shape": list(SHAPE), "weights": "random (image-like BN statistics); "
                                 "mobilenet_v2_restored: real weights and real-image BN statistics",
                                 "torch_threads": torch.get_num_threads(), "lr": args.lr, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
