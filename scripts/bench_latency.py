"""ONNX Runtime CPU latency of the quantized ONNX exports against FP32, and their top-1 next to the fake-quant model.

    python scripts/bench_latency.py [--models resnet18,resnet56_cifar10_optA] [--limit 2000] [--batch-sizes 1,8,32]
                                    [--threads N] [--min-iters 10] [--min-seconds 2] [--out results/bench_latency.json]

Models: ResNet-18 (random weights, 3x224x224: latency only) and ResNet-56 option-A (akamaster's CIFAR-10 weights from
../shared/data, 3x32x32: latency and top-1 on the first ``--limit`` images, evenly spaced, of the JPEG test set).
Models with real weights are compensated with the default dfmpc recipe; random-weight models (latency only) with
2/6, no BN re-estimation, nearest rounding (``--full`` to use the default recipe there too: its synthesis takes many
minutes at 224x224 on a small CPU; ``--quick`` for the fast configuration everywhere). The ONNX graph, hence the
latency, does not depend on the configuration.

Variants timed side by side (round-robin, same random input, ``dfmpc_deploy.deploy.ort.compare_latency``): ``fp32`` (the
dequantised model), ``wdq`` (INT8 weights + DQ), ``w8a8`` (TensorRT's Q/DQ form: symmetric INT8 at each conv input)
and ``w8a8_ort`` (ORT's form: UINT8 at conv inputs and outputs, INT32 bias, fused to QLinearConv). Speed-up =
fp32 p50 / variant p50. Goal: w8a8 >= 1.5x faster than FP32 at batch 32, top-1 within 1 point of the
fake-quant model. The machine is shared: the p90/p99 columns show how noisy the run was.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dfmpc_deploy.core.progress import Progress
from dfmpc_deploy.deploy.targets import run_targets
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = {"resnet56_cifar10_optA": SHARED / "weights" / "akamaster_cifar10" / "resnet56-4bfd9763.th",
           "resnet20_cifar10_optA": SHARED / "weights" / "akamaster_cifar10" / "resnet20-12fca82f.th"}
CIFAR = SHARED / "cifar10-test-jpg" / "test"


def quick_config() -> dict:
    return {"bits": "2/6", "recal": "none", "rounding": "nearest"}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench(name: str, args, tmp: Path) -> dict:
    weights = str(WEIGHTS[name]) if name in WEIGHTS else "random"
    lm = load_model(name, weights)
    s = lm.spec
    shape = (3, s.input_size, s.input_size)
    data = None
    if weights != "random" and CIFAR.is_dir() and args.limit > 0:
        data = load_dataset(parse_data_spec(f"imagefolder:{CIFAR}"), s.input_size, s.resize, s.mean, s.std,
                            limit=args.limit)
    full = (weights != "random" or args.full) and not args.quick
    settings = {} if full else quick_config()
    t = time.perf_counter()
    mp = compensate(lm.module, shape, arch=name, **settings)
    comp_s = time.perf_counter() - t
    print(f"[{name}] compensated in {comp_s:.1f} s ({mp.estimator})", file=sys.stderr)
    with Progress() as progress:  # rows on a terminal, nothing in a log
        rep = run_targets(mp, lm.module, shape, ["onnx", "ort"], tmp / name, dataset=data,
                          batch_sizes=args.batch_sizes, progress=progress, threads=args.threads,
                          min_iters=args.min_iters, min_seconds=args.min_seconds)
    return {"model": name, "weights": "random" if weights == "random" else Path(weights).name,
            "input_shape": list(shape), "config": "dfmpc defaults" if full else "quick (2/6, recal none, nearest)",
            "estimator": mp.estimator, "compensate_seconds": round(comp_s, 2), "threads": rep["threads"].get("ort"),
            "latency_ms": rep["latency_ms"].get("ort", {}), "speedup": rep["speedup"].get("ort", {}),
            "accuracy": rep["accuracy"], "parity": rep["parity"],
            "size_bytes": {k: v for k, v in rep["size_bytes"].items() if k.startswith("onnx_")},
            "notes": rep["notes"]}


def markdown(runs: list[dict]) -> str:
    lines = ["| model | batch | fp32 p50 (p90) ms | wdq p50 ms | w8a8 p50 ms | w8a8_ort p50 (p90) ms | "
             "speed-up w8a8 / w8a8_ort |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        lat, sp = r["latency_ms"], r["speedup"]
        for b in lat.get("fp32", {}):
            lines.append(f"| {r['model']} | {b} | {lat['fp32'][b]['p50']:.2f} ({lat['fp32'][b]['p90']:.2f}) | "
                         f"{lat['wdq'][b]['p50']:.2f} | {lat['w8a8'][b]['p50']:.2f} | "
                         f"{lat['w8a8_ort'][b]['p50']:.2f} ({lat['w8a8_ort'][b]['p90']:.2f}) | "
                         f"{sp['w8a8'][b]:.2f}x / {sp['w8a8_ort'][b]:.2f}x |")
    acc = [r for r in runs if r["accuracy"]]
    if acc:
        lines += ["", "| model | images | FP32 torch | fake-quant torch | onnx wdq | onnx w8a8 | onnx w8a8_ort |",
                  "|---|---|---|---|---|---|---|"]
        for r in acc:
            a = r["accuracy"]
            cells = [f"{a[k]['top1']:.2f}" if k in a else "-"
                     for k in ("torch_fp32", "torch_fakequant", "onnx_wdq", "onnx_w8a8", "onnx_w8a8_ort")]
            lines.append(f"| {r['model']} | {a['torch_fakequant']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet56_cifar10_optA", help="comma-separated model names")
    p.add_argument("--limit", type=int, default=2000, help="CIFAR-10 test images for top-1 (0: none)")
    p.add_argument("--batch-sizes", default="1,8,32", type=lambda s: tuple(int(b) for b in s.split(",")))
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all available CPUs)")
    p.add_argument("--min-iters", type=int, default=10, help="timed runs per model and batch size, at least")
    p.add_argument("--min-seconds", type=float, default=2.0, help="timed wall seconds per batch size, at least")
    p.add_argument("--quick", action="store_true", help="2/6, recal none, nearest rounding instead of the defaults")
    p.add_argument("--full", action="store_true", help="the default recipe for random-weight models too")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_latency.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            runs.append(bench(name.strip(), args, Path(tmp)))
    import onnxruntime

    out = {"format_version": 1, "cpu": _cpu(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
           "batch_sizes": list(args.batch_sizes), "min_iters": args.min_iters, "min_seconds": args.min_seconds,
           "goal": "w8a8 >= 1.5x faster than FP32 at batch 32; w8a8 top-1 within 1 point of the fake-quant model",
           "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    print(markdown(runs))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
