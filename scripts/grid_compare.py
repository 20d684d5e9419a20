"""The k-bit grids side by side: ``--grid int`` against the paper's ``--grid dorefa``, one ``dfmpc-deploy build`` each.

Runs the builds one after the other (the CLI in this process, so each is exactly what the command line does) and
collects top-1 / top-5 and the packed size from each ``report.json`` into one JSON file. Two sets:

* ``mobilenet`` (default): the folded MobileNetV2 whose weights lie on a per-tensor int8 lattice
  (``../shared/data/weights/mobilenet_v2_imagenet/mobilenet_v2_tvq_dequant_float.pth``), 8-bit round-to-nearest, per
  tensor and per channel, on the 1,300 ImageNet images: writes ``results/grid_mobilenet_8bit.json``.
* ``cifar``: ResNet-20 2/6, ``--method dfmpc`` (the default recipe), seed 0, CIFAR-10 test set:
  ``results/grid_resnet20_2_6.json``.

    python scripts/grid_compare.py [mobilenet|cifar] [--threads N] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dfmpc_deploy.cli import main
from dfmpc_deploy.io.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = {
    "mobilenet": {
        "out": "grid_mobilenet_8bit.json",
        "base": ["build", "mobilenet_v2", "--weights",
                 str(DATA / "weights/mobilenet_v2_imagenet/mobilenet_v2_tvq_dequant_float.pth"),
                 "--weights-format", "torchvision-quantized", "--method", "rtn", "--bits", "8",
                 "--data", f"imagenet:{DATA / 'imagenet_val_1300'}", "--target", "torch", "--seed", "0"],
        "variants": [(grid, pc) for pc in (False, True) for grid in ("int", "dorefa")],
    },
    "cifar": {
        "out": "grid_resnet20_2_6.json",
        "base": ["build", "resnet20_cifar10_optA", "--weights",
                 str(DATA / "weights/akamaster_cifar10/resnet20-12fca82f.th"), "--bits", "2/6",
                 "--data", f"imagefolder:{DATA / 'cifar10-test-jpg/test'}", "--target", "torch", "--no-pack",
                 "--seed", "0"],
        "variants": [(grid, False) for grid in ("int", "dorefa")],
    },
}


def run(name: str, threads: int | None, out_dir: Path) -> dict:
    spec = SETS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for grid, per_channel in spec["variants"]:
        out = out_dir / f"{name}_{grid}_{'pc' if per_channel else 'pt'}"
        argv = [*spec["base"], "--grid", grid, "--out", str(out), "--force"]
        argv += ["--per-channel"] if per_channel else []
        argv += ["--threads", str(threads)] if threads else []
        t = time.perf_counter()
        rc = main(argv)
        if not (out / "report.json").is_file():
            raise SystemExit(f"build failed (exit {rc}): {' '.join(argv)}")
        rep = json.loads((out / "report.json").read_text())
        acc = rep["accuracy"]
        key = rep["method"] if rep["method"] in acc else "quantized_uncompensated"
        row = {"grid": grid, "per_channel": per_channel, "command": "dfmpc-deploy " + " ".join(argv), "rc": rc,
               "bits": rep["bits"], "fp32_top1": acc["fp32"]["top1"], "top1": acc[key]["top1"],
               "top5": acc[key]["top5"], "delta_top1": round(acc[key]["top1"] - acc["fp32"]["top1"], 2),
               "uncompensated_top1": acc["quantized_uncompensated"]["top1"], "n": acc["dataset"] and acc["n"],
               "packed_bytes": rep["size_bytes"].get("packed"), "wall_s": round(time.perf_counter() - t, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"set": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", nargs="?", default="mobilenet", choices=sorted(SETS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/grid_compare"))
    args = ap.parse_args()
    res = run(args.set, args.threads, args.out_dir)
    atomic_write_json(ROOT / "results" / SETS[args.set]["out"], res)
