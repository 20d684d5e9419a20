"""How GDFQ's accuracy grows with its CPU budget: the same 2/6 model fine-tuned for several step counts.

Prints a Markdown table and writes results/gdfq_budget.json. Each row is a separate run from the pretrained model
(warm-up = min(100, steps/4) generator-only steps, batch 32). Usage:

    python scripts/gdfq_budget.py                      # resnet20, 400 and 1600 steps, all 10,000 images
    python scripts/gdfq_budget.py --steps 100 400 --limit 2000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from cases import MODELS, load_case

from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.evaluate import accuracy

ROOT = Path(__file__).resolve().parents[1]

#: the authors' CIFAR schedule (cifar100_resnet20.hocon): 400 epochs x 200 iterations of batch 200
AUTHORS_SAMPLES = 400 * 200 * 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", choices=list(MODELS))
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 1600])
    ap.add_argument("--bits", default="2/6")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "gdfq_budget.json"))
    args = ap.parse_args()
    name, lm, data = load_case(args.model, args.limit)
    shape = (3, lm.spec.input_size, lm.spec.input_size)
    fp = accuracy(lm.module, data)
    lines = [f"{args.model} {args.bits}, {fp['n']} CIFAR-10 test images, FP32 top-1 {fp['top1']:.2f}, "
             f"threads {torch.get_num_threads()}", "",
             "| steps (batch 32) | student steps | top-1 % | wall time (s) | s per sample | authors' schedule, "
             "extrapolated (h) |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows = []
    for steps in args.steps:
        t = time.perf_counter()
        mp = compensate(lm.module, shape, "gdfq", arch=name, seed=args.seed, bits=args.bits, finetune_steps=steps)
        wall = time.perf_counter() - t
        student_steps = mp.config.record("finetune").info["student_steps"]
        acc = accuracy(mp.module, data)
        per_sample = wall / max(1, steps * 32)
        rows.append({"steps": steps, "finetune_steps": student_steps, **acc,
                     "wall_seconds": round(wall, 1), "seconds_per_sample": per_sample,
                     "authors_schedule_hours_extrapolated": round(per_sample * AUTHORS_SAMPLES / 3600, 1)})
        lines.append(f"| {steps} | {student_steps} | {acc['top1']:.2f} | {wall:.1f} | {per_sample:.4f} | "
                     f"{rows[-1]['authors_schedule_hours_extrapolated']} |")
        print(lines[-1], flush=True)
    atomic_write_json(args.out, {"model": name, "bits": args.bits, "fp32": fp, "limit": args.limit,
                                 "threads": torch.get_num_threads(), "authors_samples": AUTHORS_SAMPLES,
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
