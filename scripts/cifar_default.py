"""The default ``dfmpc`` recipe at 2/6 on the real CIFAR-10 ResNets (issue 19's regression check), one row per seed.

Evaluated on the 10,000 CIFAR-10 test images in ../shared/data; prints one JSON line per (model, seed) with the
top-1, the compensation seconds, the statistics ``auto`` chose and the guard's verdict, and writes them to
results/cifar_default.json. Extra ``key=value`` arguments are recipe settings (e.g. ``grid=dorefa``).

    python scripts/cifar_default.py [--models resnet20_cifar10_optA,resnet56_cifar10_optA] [--seeds 0,1] [grid=dorefa]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.evaluate import accuracy
from dfmpc_deploy.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = {"resnet20_cifar10_optA": "resnet20-12fca82f.th", "resnet56_cifar10_optA": "resnet56-4bfd9763.th"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(WEIGHTS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=str(ROOT / "results" / "cifar_default.json"))
    ap.add_argument("settings", nargs="*", help="recipe settings as key=value")
    args = ap.parse_args()
    settings = dict(a.split("=", 1) for a in args.settings)
    rows, data = [], None
    for name in args.models.split(","):
        lm = load_model(name, str(SHARED / "weights" / "akamaster_cifar10" / WEIGHTS[name]))
        if data is None:
            data = load_dataset(parse_data_spec(f"imagefolder:{SHARED / 'cifar10-test-jpg' / 'test'}"), 32, None,
                                lm.spec.mean, lm.spec.std, None, num_classes=10)
        for seed in map(int, args.seeds.split(",")):
            t = time.perf_counter()
            mp = compensate(lm.module, (3, 32, 32), "dfmpc", arch=name, bits="2/6", seed=seed, **settings)
            seconds = time.perf_counter() - t
            rec = mp.config.record("recalibrate")
            info = rec.info if rec is not None else {}
            row = {"model": name, "seed": seed, "settings": settings, "top1": accuracy(mp.module, data)["top1"],
                   "seconds": round(seconds, 1), "stats": info.get("stats"), "stats_kl": info.get("stats_kl"),
                   "guard": info.get("guard")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    atomic_write_json(Path(args.out), {"rows": rows, "measured": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    main()
