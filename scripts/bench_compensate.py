"""What the compensation costs, in seconds and in FP32 forward passes of the same model (the speed goal).

For each model, in a fresh process (so that peak memory is the build's own): the FP32 forward pass at batch 32 and the
model's input size is timed (median of 3, after a warm-up, measured before and after the build, the smaller median
kept), then the whole build runs in the same process (``run_build``: load, the default dfmpc recipe, pack, report,
``--target torch``), and each pass's seconds come from its report. ``ratio`` = compensation seconds / forward-pass
seconds. Peak RSS is the process's maximum resident set (``ru_maxrss``), model, data and build included.

ResNet-20/56 use the real CIFAR-10 weights in ../shared/data; ResNet-18/50 (224 px) use ``--weights random``, whose
BN statistics come from image-like noise so that input synthesis does the same work as on a trained model;
MobileNetV2 (224 px) is the real ImageNet model with BN statistics restored (``mobilenet_v2_bn_restored.pth``).

``--busy N`` starts N processes that spin on the CPU for the duration of the runs (a shared machine);
``--threads T`` is passed to the build (``--threads``), to show how a build is kept from oversubscribing such a
machine. Prints a Markdown table and writes results/bench_compensate.json (or ``--out``). Usage:

    python scripts/bench_compensate.py                                   # quiet machine
    python scripts/bench_compensate.py --busy 2 --out results/bench_compensate_busy.json
    python scripts/bench_compensate.py --busy 2 --threads 1 --out results/bench_compensate_busy_t1.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dfmpc_deploy.io.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
W = ROOT.parent / "shared" / "data" / "weights" / "akamaster_cifar10"
CASES = {
    "resnet20": ("resnet20_cifar10_optA", str(W / "resnet20-12fca82f.th")),
    "resnet56": ("resnet56_cifar10_optA", str(W / "resnet56-4bfd9763.th")),
    "resnet18": ("resnet18", "random"),
    "resnet50": ("resnet50", "random"),
    "mobilenet_v2": ("mobilenet_v2", str(ROOT.parent / "shared" / "data" / "weights" / "mobilenet_v2_imagenet"
                                         / "mobilenet_v2_bn_restored.pth")),
}
#: the weights format of a case whose file is not pytorchcv's (MANIFEST.md: torchvision's quantization-trained
#: MobileNetV2, BN statistics restored from real images)
FORMATS = {"mobilenet_v2": "torchvision-quantized"}
PASSES = ("quantize", "calibrate", "allocate", "recalibrate", "solve_c")


def _forward_seconds(model, shape, batch: int = 32, repeat: int = 3) -> float:
    import torch

    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeat):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def child(key: str, threads: int | None) -> dict:
    """One case, in this process: forward timing, the whole build, peak RSS."""
    import resource

    import torch

    from dfmpc_deploy.build import BuildConfig, run_build
    from dfmpc_deploy.zoo.models import load_model

    if threads:
        torch.set_num_threads(threads)
    name, weights = CASES[key]
    fmt = FORMATS.get(key)
    lm = load_model(name, weights, weights_format=fmt) if fmt else load_model(name, weights)
    shape = (3, lm.spec.input_size, lm.spec.input_size)
    before = _forward_seconds(lm.module, shape)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        extra = {"weights_format": fmt} if fmt else {}
        rep = run_build(BuildConfig(model=name, weights=weights, out=Path(tmp) / "out", threads=threads, **extra))
        build_s = time.perf_counter() - t
    after = _forward_seconds(lm.module, shape)
    fwd = min(before, after)
    passes = {p.name: p.seconds for p in rep.recipe.passes}
    comp = rep.timings_s["compensate"]
    calib = next(p for p in rep.recipe.passes if p.name == "calibrate").info
    return {"model": name, "weights": "random" if weights == "random" else "pretrained (shared/data)",
            "input": shape[1], "threads": torch.get_num_threads(), "forward_b32_seconds": round(fwd, 4),
            "forward_b32_seconds_before_after": [round(before, 4), round(after, 4)],
            "compensate_seconds": comp, "ratio_forward_passes": round(comp / fwd, 1),
            "passes_seconds": passes, "synthesis": {k: calib.get(k) for k in ("samples", "steps_run", "steps_max",
                                                                              "coarse_steps", "stopped_early",
                                                                              "loss_final")},
            "build_seconds": round(build_s, 2), "peak_rss_mib": round(resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=None, help="--threads for the builds (default: torch's choice)")
    ap.add_argument("--busy", type=int, default=0, help="CPU-spinning processes running meanwhile (default 0)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_compensate.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads)))
        return
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    rows = []
    head = ["| model | input | threads | FP32 fwd b32 s | compensate s | ratio (fwd passes) | " +
            " | ".join(f"{p} s" for p in PASSES) + " | synthesis (samples x steps run) | peak RSS MiB |",
            "|---|---|---|---|---|---|" + "---|" * len(PASSES) + "---|---|"]
    print(f"cpus {os.cpu_count()}, busy processes {args.busy}\n" + "\n".join(head), flush=True)
    try:
        for key in args.models:
            cmd = [sys.executable, __file__, "--child", key]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise SystemExit(f"{key}: the child failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            syn = row["synthesis"]
            print(f"| {row['model']} | {row['input']} | {row['threads']} | {row['forward_b32_seconds']:.3f} | "
                  f"{row['compensate_seconds']:.1f} | {row['ratio_forward_passes']:.1f} | " +
                  " | ".join(f"{row['passes_seconds'].get(p, 0):.2f}" for p in PASSES) +
                  f" | {syn['samples']} x {syn['steps_run']} | {row['peak_rss_mib']:.0f} |", flush=True)
    finally:
        stop.set()
        for s in spinners:
            s.join(timeout=5)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"cpus": os.cpu_count(), "busy_processes": args.busy, "threads": args.threads,
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
