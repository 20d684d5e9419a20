"""Benchmark the packed model file on ResNet-50 (random weights, 2/6, recal="none"): pack/unpack throughput, load
time and size; also ResNet-18's packed size against the theoretical figure and the paper's (Table 3).

    python scripts/bench_pack.py [--model resnet50] [--repeat 3] [--threads 1] [--out results/bench_pack.json]

"MB of weights" = the quantized weights at FP32 (4 bytes each, 1 MB = 1e6 bytes) processed per second. "pack" and
"unpack" time the code layouts only (bytes <-> integer codes, numpy); "unpack_to_fp32_weights" adds the
dequantisation to float32 weights; "save"/"load" are the whole file round trip (checksums, atomic write, architecture
rebuild with its random init, state-dict load).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dfmpc_deploy.core.state import QuantLayer
from dfmpc_deploy.io.container import CodeLayout, _decode, _encode, _read, load_packed, save_packed
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.models import get_spec, load_model

PAPER_RESNET18_2_6_MIB = 5.48  # DF-MPC Table 3 ("MB" there is MiB: FP32 ResNet-18 is listed as 44.59)


def quick_config() -> dict:
    """2/6, no BN re-estimation, round-to-nearest: the fastest configuration (packing does not depend on it)."""
    return {"bits": "2/6", "recal": "none", "rounding": "nearest"}


def _best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench(name: str, repeat: int, tmp: Path) -> dict:
    spec = get_spec(name)
    model = load_model(name, "random").module
    t = time.perf_counter()
    mp = compensate(model, (3, spec.input_size, spec.input_size), arch=name, **quick_config())
    comp_s = time.perf_counter() - t
    weights = sum(q.numel for q in mp.layers.values())
    mb = 4 * weights / 1e6
    pack_s, packed = _best(lambda: {f: _encode(q, CodeLayout.TERNARY_BASE3) for f, q in mp.layers.items()}, repeat)
    unpack_s, _ = _best(lambda: [_decode(lay, mp.layers[f].bits, d, tuple(mp.layers[f].codes.shape))
                                 for f, (lay, d) in packed.items()], repeat)
    path = tmp / f"{name}.dfpk"
    dequant_s, _ = _best(lambda: [QuantLayer(f, q.kind, q.role, q.bits, _decode(lay, q.bits, d, tuple(q.codes.shape)),
                                             q.scale, q.in_scale).weight()
                                  for f, (lay, d) in packed.items() for q in [mp.layers[f]]], repeat)
    save_s, report = _best(lambda: save_packed(mp, path), repeat)
    parse_s, _ = _best(lambda: _read(path), repeat)
    load_s, mp2 = _best(lambda: load_packed(path), repeat)
    cpath = tmp / f"{name}-compressed.dfpk"  # opt-in entropy-coded layouts (random weights: little to gain)
    csave_s, creport = _best(lambda: save_packed(mp, cpath, compress=True), repeat)
    cp = _read(cpath)
    cunpack_s, _ = _best(lambda: [_decode(L["layout"], L["bits"], cp.raw(f"codes/{L['fqn']}"), tuple(L["shape"]))
                                  for L in cp.meta["layers"]], repeat)
    cload_s, _ = _best(lambda: load_packed(cpath), repeat)
    x = torch.randn(2, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        exact = bool(torch.equal(mp.module(x), mp2.module(x)))
    return {"model": name, "bits": "2/6", "weights": weights, "weights_fp32_mb": round(mb, 3),
            "compensate_seconds": round(comp_s, 3), "pack_seconds": round(pack_s, 4),
            "pack_mb_per_s": round(mb / pack_s, 1), "unpack_seconds": round(unpack_s, 4),
            "unpack_mb_per_s": round(mb / unpack_s, 1),
            "unpack_to_fp32_weights_seconds": round(dequant_s, 4), "save_seconds": round(save_s, 4),
            "parse_seconds": round(parse_s, 4), "load_seconds": round(load_s, 4), "bit_exact_outputs": exact,
            "size_bytes": report, "compressed": {"packed_bytes": creport["packed"], "save_seconds": round(csave_s, 4),
                                                 "unpack_seconds": round(cunpack_s, 4),
                                                 "load_seconds": round(cload_s, 4)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", help="model to time (default resnet50)")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats; the best is reported")
    ap.add_argument("--out", default="results/bench_pack.json", help="JSON output file")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a busy shared CPU every multi-threaded op waits "
                         "~10 ms for its OpenMP workers, which swamps these short ops; 0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        rows = [bench(args.model, args.repeat, Path(d))]
        r18 = bench("resnet18", 1, Path(d)) if args.model != "resnet18" else rows[0]
    s = r18["size_bytes"]
    size18 = {"packed_bytes": s["packed"], "packed_mib": round(s["packed"] / 2**20, 3),
              "theoretical_bytes": s["theoretical"], "theoretical_min_bytes": s["theoretical_min"],
              "vs_theoretical_min_pct": round(100 * (s["packed"] / s["theoretical_min"] - 1), 3),
              "vs_theoretical_pct": round(100 * (s["packed"] / s["theoretical"] - 1), 3),
              "paper_mib": PAPER_RESNET18_2_6_MIB, "below_paper": s["packed"] / 2**20 < PAPER_RESNET18_2_6_MIB}
    hdr = f"{'model':<10} {'weights':>11} {'pack s':>8} {'pack MB/s':>10} {'unpack s':>9} {'unpack MB/s':>12} " \
          f"{'->fp32 s':>9} {'save s':>7} {'load s':>7} {'file bytes':>12} {'bits/w':>7} {'exact':>6}"
    print(hdr)
    for r in rows + ([r18] if r18 is not rows[0] else []):
        print(f"{r['model']:<10} {r['weights']:>11,} {r['pack_seconds']:>8.3f} {r['pack_mb_per_s']:>10.1f} "
              f"{r['unpack_seconds']:>9.3f} {r['unpack_mb_per_s']:>12.1f} {r['unpack_to_fp32_weights_seconds']:>9.3f} "
              f"{r['save_seconds']:>7.3f} "
              f"{r['load_seconds']:>7.3f} {r['size_bytes']['packed']:>12,} {r['size_bytes']['bits_per_weight']:>7.3f} "
              f"{str(r['bit_exact_outputs']):>6}")
    for r in rows:
        c = r["compressed"]
        print(f"{r['model']} compress=True: {c['packed_bytes']:,} B, unpack {c['unpack_seconds']:.3f} s, "
              f"load {c['load_seconds']:.3f} s")
    print(f"ResNet-18 2/6: packed {s['packed']:,} B ({size18['packed_mib']} MiB); theoretical {s['theoretical']:,} B "
          f"(ternary 2 bits, {size18['vs_theoretical_pct']:+.2f}%), minimum {s['theoretical_min']:,} B (ternary "
          f"log2 3, {size18['vs_theoretical_min_pct']:+.2f}%); paper {PAPER_RESNET18_2_6_MIB} MiB "
          f"({'below' if size18['below_paper'] else 'ABOVE'} it)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"format_version": 1, "torch_threads": torch.get_num_threads(), "runs": rows,
                               "resnet18_size": size18}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
