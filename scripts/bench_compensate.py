"""Time each compensation stage (goal: closed-form compensation of ResNet-50 under 2 s on this CPU).

Rows: the closed-form DF-MPC stages alone (quantize + pairing + Eq. 27 + fold; no statistics re-estimation) on
pytorchcv ResNet-50 with seeded random weights, and the full default pipeline (synthesis, error feedback, BN
re-estimation) on the real CIFAR ResNets. Prints a table, writes results/bench_compensate.json.

    python scripts/bench_compensate.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]

W = ROOT.parent / "shared" / "data" / "weights" / "akamaster_cifar10"
CASES = [
    ("resnet50", "random", dict(c_mode="paper", recal="none", rounding="nearest"), "closed form only"),
    ("resnet18", "random", dict(c_mode="paper", recal="none", rounding="nearest"), "closed form only"),
    ("resnet20_cifar10_optA", str(W / "resnet20-12fca82f.th"), {}, "default pipeline"),
    ("resnet56_cifar10_optA", str(W / "resnet56-4bfd9763.th"), {}, "default pipeline"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_compensate.json"))
    args = ap.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | what | median s | quantize s | statistics s | closed form s |\n|---|---|---|---|---|---|")
    for name, weights, cfg, what in CASES:
        lm = load_model(name, weights)
        shape = (3, lm.spec.input_size, lm.spec.input_size)
        times, infos = [], []
        for _ in range(args.repeat if cfg.get("recal") == "none" else 1):
            t = time.perf_counter()
            mp = compensate(lm.module, shape, arch=name, **cfg)
            times.append(time.perf_counter() - t)
            infos.append(mp.info)
        k = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
        info = infos[k]
        rows.append({"model": name, "weights": "random" if weights == "random" else "pretrained (shared/data)",
                     "what": what, "seconds": round(times[k], 3), "all_seconds": [round(x, 3) for x in times],
                     **{key: v for key, v in info.items() if key.endswith("seconds")}})
        print(f"| {name} | {what} | {times[k]:.3f} | {info['quantize_seconds']:.3f} | "
              f"{info['statistics_seconds']:.3f} | {info['compensate_seconds']:.3f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"torch_threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
