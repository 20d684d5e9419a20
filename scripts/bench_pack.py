"""Benchmark the packed .dfmpc file (format v2): size against the code floor, header bytes, pack/unpack speed.

    python scripts/bench_pack.py [--models resnet56_cifar10_optA resnet18 resnet50] [--repeat 3] [--threads 1]
                                 [--r56-weights PATH] [--out results/bench_pack.json]

Models are compensated at 2/6 with recal="none", rounding="nearest" (file sizes do not depend on the rounding);
ResNet-56 uses the real CIFAR-10 weights when ``--r56-weights`` exists, the ImageNet models random weights.

Sizes: ``packed`` is the file; ``theoretical_min`` (the "code floor") is the codes at their information-theoretic
widths (ternary log2 3 bits) + the scales and float tensors as stored; ``floor_v1`` is format v1's figure, with one
float32 scale per output (and input) channel. "MB of weights" = the quantized weights at FP32 (4 bytes each, 1 MB =
1e6 bytes) processed per second. "pack"/"unpack" time the code layouts only (integer codes <-> bytes, numpy);
"unpack_to_fp32_weights" adds the dequantisation; "save"/"load" are the whole file (checks, digests, atomic write;
architecture skeleton on the meta device, state-dict load); "packed_nbytes" is the analytic size (no file).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from dfmpc_deploy.core.state import QuantLayer
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.io.container import inspect_packed, load_packed, packed_nbytes, save_packed
from dfmpc_deploy.io.layouts import decode_codes, encode_codes
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.models import get_spec, load_model

PAPER_RESNET18_2_6_MIB = 5.48  # DF-MPC Table 3 ("MB" there is MiB: FP32 ResNet-18 is listed as 44.59)
R56_WEIGHTS = Path(__file__).resolve().parents[2] / "shared/data/weights/akamaster_cifar10/resnet56-4bfd9763.th"


def quick_config() -> dict:
    """2/6, no BN re-estimation, nearest rounding: sizes and speeds do not depend on how codes were chosen."""
    return {"bits": "2/6", "recal": "none", "rounding": "nearest"}


def _best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def floor_v1(mp, report: dict) -> int:
    """Format v1's theoretical_min: codes at log2(3) / k bits + float32 per-channel scales + float tensors."""
    ideal = sum(q.numel * (math.log2(3) if q.bits == 2 else q.bits) for q in mp.layers.values())
    scales = 4 * sum(q.scale.numel() + (0 if q.in_scale is None else q.in_scale.numel()) for q in mp.layers.values())
    return math.ceil(ideal / 8) + scales + report["float_tensors"]


def bench(name: str, weights: str, repeat: int, tmp: Path) -> dict:
    spec = get_spec(name)
    model = load_model(name, weights).module
    t = time.perf_counter()
    mp = compensate(model, (3, spec.input_size, spec.input_size), **quick_config(), arch=name)
    comp_s = time.perf_counter() - t
    n_weights = sum(q.numel for q in mp.layers.values())
    mb = 4 * n_weights / 1e6
    pack_s, packed = _best(lambda: {f: encode_codes(q.codes, q.bits, grid=q.grid) for f, q in mp.layers.items()},
                           repeat)
    unpack_s, _ = _best(lambda: [decode_codes(lay, mp.layers[f].bits, d, mp.layers[f].numel, mp.layers[f].grid)
                                 for f, (lay, d) in packed.items()], repeat)

    def to_fp32():
        return [QuantLayer(f, q.kind, q.role, q.bits,
                           torch.from_numpy(decode_codes(lay, q.bits, d, q.numel, q.grid)).reshape(q.codes.shape),
                           q.scale, q.in_scale, grid=q.grid).weight()
                for f, (lay, d) in packed.items() for q in [mp.layers[f]]]

    dequant_s, _ = _best(to_fp32, repeat)
    path = tmp / f"{name}.dfmpc"
    save_s, report = _best(lambda: save_packed(mp, path), repeat)
    nbytes_s, nbytes = _best(lambda: packed_nbytes(mp), repeat)
    load_s, mp2 = _best(lambda: load_packed(path), repeat)
    inspect_s, res = _best(lambda: inspect_packed(path), repeat)
    cpath = tmp / f"{name}-compressed.dfmpc"  # opt-in entropy-coded layouts (random weights: little to gain)
    csave_s, creport = _best(lambda: save_packed(mp, cpath, compress=True), repeat)
    cload_s, _ = _best(lambda: load_packed(cpath), repeat)
    x = torch.randn(2, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = bool(torch.equal(mp.module(x), mp2.module(x)))
    v1 = floor_v1(mp, report)
    return {"model": name, "weights_source": weights if weights == "random" else Path(weights).name, "bits": "2/6",
            "weights": n_weights, "weights_fp32_mb": round(mb, 3), "compensate_seconds": round(comp_s, 3),
            "pack_seconds": round(pack_s, 4), "pack_mb_per_s": round(mb / pack_s, 1),
            "unpack_seconds": round(unpack_s, 4), "unpack_mb_per_s": round(mb / unpack_s, 1),
            "unpack_to_fp32_weights_seconds": round(dequant_s, 4), "save_seconds": round(save_s, 4),
            "packed_nbytes_seconds": round(nbytes_s, 5), "packed_nbytes_equals_file": nbytes == report["packed"],
            "load_seconds": round(load_s, 4), "inspect_seconds": round(inspect_s, 4), "inspect_ok": res.ok,
            "bit_exact_outputs": exact, "size_bytes": report,
            "vs_floor_pct": round(100 * (report["packed"] / report["theoretical_min"] - 1), 3),
            "floor_v1_bytes": v1, "vs_floor_v1_pct": round(100 * (report["packed"] / v1 - 1), 3),
            "header_pct_of_file": round(100 * report["metadata"] / report["packed"], 3),
            "compressed": {"packed_bytes": creport["packed"], "save_seconds": round(csave_s, 4),
                           "load_seconds": round(cload_s, 4)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56_cifar10_optA", "resnet18", "resnet50"])
    ap.add_argument("--r56-weights", default=str(R56_WEIGHTS), help="real ResNet-56 weights (else random)")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats; the best is reported")
    ap.add_argument("--out", default="results/bench_pack.json", help="JSON output file")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a busy shared CPU every multi-threaded op waits "
                         "~10 ms for its OpenMP workers, which swamps these short ops; 0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            weights = args.r56_weights if name.startswith("resnet56") and Path(args.r56_weights).is_file() else "random"
            rows.append(bench(name, weights, args.repeat, Path(d)))
    print(f"{'model':<22} {'file bytes':>11} {'header':>7} {'floor':>11} {'vs floor':>8} {'vs v1':>7} "
          f"{'pack MB/s':>10} {'unpack MB/s':>12} {'save s':>7} {'load s':>7} {'nbytes s':>9} {'exact':>6}")
    for r in rows:
        s = r["size_bytes"]
        print(f"{r['model']:<22} {s['packed']:>11,} {s['metadata']:>7,} {s['theoretical_min']:>11,} "
              f"{r['vs_floor_pct']:>+7.2f}% {r['vs_floor_v1_pct']:>+6.2f}% {r['pack_mb_per_s']:>10.1f} "
              f"{r['unpack_mb_per_s']:>12.1f} {r['save_seconds']:>7.3f} {r['load_seconds']:>7.3f} "
              f"{r['packed_nbytes_seconds']:>9.5f} {str(r['bit_exact_outputs']):>6}")
    for r in rows:
        c = r["compressed"]
        print(f"{r['model']} compress=True: {c['packed_bytes']:,} B, save {c['save_seconds']:.3f} s, "
              f"load {c['load_seconds']:.3f} s")
    out = {"format_version": 2, "torch_threads": torch.get_num_threads(), "runs": rows}
    r18 = next((r for r in rows if r["model"] == "resnet18"), None)
    if r18 is not None:
        s = r18["size_bytes"]
        out["resnet18_size"] = {"packed_bytes": s["packed"], "packed_mib": round(s["packed"] / 2**20, 3),
                                "theoretical_min_bytes": s["theoretical_min"], "vs_floor_pct": r18["vs_floor_pct"],
                                "paper_mib": PAPER_RESNET18_2_6_MIB,
                                "below_paper": s["packed"] / 2**20 < PAPER_RESNET18_2_6_MIB}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
