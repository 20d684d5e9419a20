"""FP32 top-1/top-5 of the real ImageNet MobileNetV2 on the 1,300 shared ImageNet validation images.

Measures the time to decode the images (``imagenet:DIR``: torchvision-equivalent Resize 256 / CenterCrop 224 on
Pillow bilinear, in DataLoader worker processes, and in this process for comparison) and the FP32 accuracy of the
torchvision-layout MobileNetV2 with ReLU6 (``--weights-format torchvision``, the float model's definition) and with
ReLU (``--weights-format torchvision-quantized``: the weights come from torchvision's quantizable model, which was
trained with ReLU). Prints a table, writes results/imagenet_fp32.json.

    python scripts/imagenet_fp32.py [--limit N] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.evaluate import accuracy
from dfmpc_deploy.zoo.images import default_workers
from dfmpc_deploy.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VARIANTS = (("torchvision", "ReLU6"), ("torchvision-quantized", "ReLU"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "imagenet_val_1300"), help="imagenet:DIR directory")
    ap.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet" /
                                             "mobilenet_v2_tvq_dequant_float.pth"))
    ap.add_argument("--limit", type=int, help="evenly spaced subset of this many images")
    ap.add_argument("--workers", type=int, default=default_workers(), help="decoding worker processes")
    ap.add_argument("--out", default=str(ROOT / "results" / "imagenet_fp32.json"))
    args = ap.parse_args()

    spec = parse_data_spec(f"imagenet:{args.data}")
    load_start = os.getloadavg()[0]
    decode = {}
    data = None
    for workers in sorted({0, args.workers}):
        t = time.perf_counter()
        data = load_dataset(spec, 224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), args.limit,
                            num_classes=1000, num_workers=workers)
        decode[str(workers)] = round(time.perf_counter() - t, 2)
    assert data is not None
    n = len(data.labels)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"decoded {n} images: " + ", ".join(f"{s:.1f} s with {w} workers" for w, s in decode.items()))
    print("| model | activation | --weights-format | top-1 % | top-5 % | images | eval s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for fmt, act in VARIANTS:
        lm = load_model("mobilenet_v2", args.weights, weights_format=fmt)
        t = time.perf_counter()
        acc = accuracy(lm.module, data)
        seconds = time.perf_counter() - t
        rows.append({"model": lm.arch, "activation": act, "weights_format": fmt, **acc,
                     "eval_seconds": round(seconds, 2)})
        print(f"| {lm.arch} | {act} | {fmt} | {acc['top1']:.2f} | {acc['top5']:.2f} | {acc['n']} | {seconds:.1f} |",
              flush=True)
    atomic_write_json(args.out, {
        "data": str(spec), "images": n, "weights": str(args.weights),
        "preprocessing": "torchvision-equivalent: shorter side 256 (long side int-truncated, Pillow bilinear), "
                         "centre crop 224 (round offsets), ImageNet mean/std, float32",
        "decode_seconds_by_workers": decode, "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
