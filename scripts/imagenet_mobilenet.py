"""The real ImageNet MobileNetV2 end to end, weights only (issue 13): accuracy by bit width, size, latency, engines.

The model is torchvision's quantization-aware-trained MobileNetV2 with its BN folded into the convolutions (identity
BN statistics), so nothing is synthesised: ``dfmpc`` runs as ``dfmpc-weights`` (passes/weight_fit.py) and every
method reads the weights alone. Evaluated on the 1,300 shared ImageNet validation images (decoded once; every variant
evaluated once, through ONNX Runtime: zoo/evaluate.py's ``auto`` engine).

1. Goals table: FP32, then for rows 8, 6, 4 bits and 3/6, 2/6, per tensor and per channel, ``rtn`` and ``dfmpc``:
   top-1/top-5, the packed file (``save_packed``) in bytes and MiB, and the method's wall time.
2. Deployment of the 6-bit per-tensor ``dfmpc`` model (the build command's): ONNX fp32 / w8a8 / w8a8_ort / wdq /
   fp16; ONNX Runtime CPU latency at batch 1 and 32 (``compare_latency``, runs interleaved, threads recorded); top-1
   of w8a8 and w8a8_ort in ONNX Runtime (activation ranges propagated from the weights, and, for comparison, read
   from the identity BN "statistics"); TensorRT-RTX engines (fp16, wdq, w8a8) built on this CPU, their sizes.
3. ``--ablation``: every data-free variant at 6 bits, per tensor and per channel (what chose ``dfmpc-weights``).

Writes results/imagenet_mobilenet.json (and results/imagenet_mobilenet_ablation.json), prints Markdown tables.

    python scripts/imagenet_mobilenet.py [--limit N] [--ablation] [--skip-deploy] [--weights-format F]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from dfmpc_deploy.core.stats import bn_status
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.io.container import fp32_nbytes, save_packed
from dfmpc_deploy.passes.base import Recipe, run_recipe
from dfmpc_deploy.passes.equalize import Equalize
from dfmpc_deploy.passes.quantize import Quantize
from dfmpc_deploy.passes.recipes import RECIPES
from dfmpc_deploy.passes.solve_c import SolveC
from dfmpc_deploy.passes.weight_fit import CorrectBias, FitWeights
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.evaluate import accuracy
from dfmpc_deploy.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAPE = (3, 224, 224)
ROWS = ("8", "6", "4", "3/6", "2/6")
MIB = 2 ** 20


def _recipe(name: str, description: str, *passes) -> Recipe:
    return Recipe(name, description, "none", False, tuple(passes))


#: the 6-bit comparison: name -> (recipe, what it is); every one reads the weights alone
ABLATION = {
    "rtn": (RECIPES["rtn"], "round to nearest"),
    "dfq": (RECIPES["dfq"], "CLE (its bias correction needs BN statistics: skipped)"),
    "dfmpc-paper": (RECIPES["dfmpc-paper"], "Eq. 27 c of each pair folded (identity statistics)"),
    "cle+c": (_recipe("cle+c", "", (Equalize, {}), (Quantize, {}), (SolveC, {"c_mode": "paper"})),
              "CLE, then Eq. 27 c of each pair"),
    "c-all": (_recipe("c-all", "", (Quantize, {}), (FitWeights, {"fit_grid": False, "fit_c": True})),
              "least-squares c on every layer's channels (weight space)"),
    "grid": (_recipe("grid", "", (Quantize, {}), (FitWeights, {})), "grid step by weight error (H = I)"),
    "cle+grid": (_recipe("cle+grid", "", (Equalize, {}), (Quantize, {}), (FitWeights, {})), "CLE + grid step"),
    "cle+grid+c-all": (_recipe("cle+grid+c-all", "", (Equalize, {}), (Quantize, {}), (FitWeights, {"fit_c": True})),
                       "CLE + grid step + c on every layer"),
    "bc": (_recipe("bc", "", (Quantize, {}), (CorrectBias, {})),
           "bias correction, means propagated from the weights (coherent windows)"),
    "bc-independent": (_recipe("bc-independent", "", (Quantize, {}), (CorrectBias, {"windows": "independent"})),
                       "the same with independent window entries"),
    "grid+bc": (_recipe("grid+bc", "", (Quantize, {}), (FitWeights, {}), (CorrectBias, {})), "grid step + bc"),
    "cle+bc": (_recipe("cle+bc", "", (Equalize, {}), (Quantize, {}), (CorrectBias, {})), "CLE + bc"),
    "cle+grid+bc": (_recipe("cle+grid+bc", "", (Equalize, {}), (Quantize, {}), (FitWeights, {}), (CorrectBias, {})),
                    "CLE + grid step + bc (= dfmpc-weights per tensor)"),
    "cle+grid+c-all+bc": (_recipe("cle+grid+c-all+bc", "", (Equalize, {}), (Quantize, {}),
                                  (FitWeights, {"fit_c": True}), (CorrectBias, {})), "CLE + grid + c + bc"),
    "dfmpc-weights": (RECIPES["dfmpc-weights"], "the recipe: CLE only per tensor, grid step, bc"),
}


def _run(recipe: Recipe, lm, bits: str, per_channel: bool, data, tmp: Path) -> tuple[dict, object]:
    t = time.perf_counter()
    mp = run_recipe(recipe, lm.module, SHAPE, {"bits": bits, "per_channel": per_channel}, arch=lm.arch)
    seconds = time.perf_counter() - t
    path = tmp / "m.dfmpc"
    save_packed(mp, path)
    size = path.stat().st_size
    t = time.perf_counter()
    acc = accuracy(mp.module, data)
    row = {"recipe_ran": mp.config.recipe, "bits": bits, "grid": "per-channel" if per_channel else "per-tensor",
           "top1": acc["top1"], "top5": acc["top5"], "n": acc["n"], "packed_bytes": size,
           "packed_mib": round(size / MIB, 3), "method_seconds": round(seconds, 2),
           "eval_seconds": round(time.perf_counter() - t, 1)}
    return row, mp


def _md_rows(rows: list[dict], fp32: dict, fp32_bytes: int) -> list[str]:
    out = ["| bits | grid | method (ran as) | top-1 % | top-5 % | Δ top-1 | packed bytes | MiB | method s |",
           "|---|---|---|---|---|---|---|---|---|",
           f"| FP32 | - | - | {fp32['top1']:.2f} | {fp32['top5']:.2f} | - | {fp32_bytes:,} | "
           f"{fp32_bytes / MIB:.2f} | - |"]
    for r in rows:
        out.append(f"| {r['bits']} | {r['grid']} | {r['method']} ({r['recipe_ran']}) | {r['top1']:.2f} | "
                   f"{r['top5']:.2f} | {r['top1'] - fp32['top1']:+.2f} | {r['packed_bytes']:,} | "
                   f"{r['packed_mib']:.2f} | {r['method_seconds']:.1f} |")
    return out


def _deploy(mp, lm, data, tmp: Path, threads: int | None) -> dict:
    from calib_free.ranges import estimate_act_ranges, estimate_output_ranges, input_range_from_normalization
    from dfmpc_deploy.deploy import ort, trt
    from dfmpc_deploy.deploy.onnx_export import export_variants

    out: dict = {}
    t = time.perf_counter()
    files = export_variants(mp, tmp, SHAPE, ("fp32", "fp16", "wdq", "w8a8", "w8a8_ort"))
    out["export_seconds"] = round(time.perf_counter() - t, 1)
    out["onnx_bytes"] = {v: e.size_bytes for v, e in files.items()}
    out["onnx_notes"] = sorted({n for e in files.values() for n in e.notes if "propagated" in n})
    lat = ort.compare_latency({v: files[v].path for v in ("fp32", "w8a8_ort", "w8a8")}, SHAPE, (1, 32),
                              threads=threads)
    out["ort_latency_ms"] = lat
    acc: dict = {}
    for v in ("w8a8_ort", "w8a8", "wdq"):
        acc[v] = ort.accuracy(files[v].path, data, batch_size=39, threads=threads)
    # the same w8a8_ort with ranges read from the identity BN "statistics" (what the export did before)
    rng = input_range_from_normalization(lm.spec.mean, lm.spec.std)
    bn_ranges = (estimate_act_ranges(mp.module, input_range=rng), estimate_output_ranges(mp.module, input_range=rng))
    bad = export_variants(mp, tmp / "bn_ranges", SHAPE, ("w8a8_ort",), ranges=bn_ranges)
    acc["w8a8_ort_identity_bn_ranges"] = ort.accuracy(bad["w8a8_ort"].path, data, batch_size=39, threads=threads)
    out["ort_accuracy"] = acc
    engines: dict = {}
    if trt.backend_name() is None:
        engines["skipped"] = "no TensorRT backend installed"
    else:
        for v in ("fp16", "wdq", "w8a8"):
            try:
                art = trt.build_engine(files[v].path, tmp / f"engine_{v}.plan", v, max_batch=32)
                engines[v] = {"bytes": art.size_bytes, "mib": round(art.size_bytes / MIB, 3),
                              "build_seconds": round(art.build_seconds, 1), "backend": art.backend,
                              "notes": list(art.notes)}
            except Exception as err:  # noqa: BLE001 - record why an engine did not build and go on
                engines[v] = {"error": str(err).splitlines()[0]}
    out["trt_engines"] = engines
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "imagenet_val_1300"), help="imagenet:DIR directory")
    ap.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet" /
                                             "mobilenet_v2_tvq_dequant_float.pth"))
    ap.add_argument("--weights-format", default="torchvision-quantized",
                    help="torchvision-quantized (ReLU, what the weights were trained with) or torchvision (ReLU6)")
    ap.add_argument("--limit", type=int, help="evenly spaced subset of this many images")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help="bit widths of the goals table")
    ap.add_argument("--ablation", action="store_true", help="also every data-free variant at 6 bits")
    ap.add_argument("--skip-deploy", action="store_true", help="no ONNX / ORT / TensorRT part")
    ap.add_argument("--threads", type=int, help="torch and ORT threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "results" / "imagenet_mobilenet.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()

    lm = load_model("mobilenet_v2", args.weights, weights_format=args.weights_format)
    spec = parse_data_spec(f"imagenet:{args.data}")
    t = time.perf_counter()
    data = load_dataset(spec, 224, 256, lm.spec.mean, lm.spec.std, args.limit, num_classes=1000)
    decode = round(time.perf_counter() - t, 1)
    fp32 = accuracy(lm.module, data)
    fp32_bytes = fp32_nbytes(lm.module)
    status = bn_status(lm.module)
    print(f"{lm.arch} ({args.weights_format}), BN statistics: {status}; {len(data.labels)} images decoded in "
          f"{decode} s; torch {torch.__version__}, {torch.get_num_threads()} threads, load {load_start:.1f}")
    print(f"FP32 top-1 {fp32['top1']:.2f} %, top-5 {fp32['top5']:.2f} %", flush=True)

    rows, dfmpc6 = [], None
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for bits in args.rows:
            for per_channel in (False, True):
                for method in ("rtn", "dfmpc"):
                    row, mp = _run(RECIPES[method], lm, bits, per_channel, data, tmp)
                    rows.append({"method": method, **row})
                    print(_md_rows([rows[-1]], fp32, fp32_bytes)[-1], flush=True)
                    if method == "dfmpc" and bits == "6" and not per_channel:
                        dfmpc6 = mp
        pairs = [(p.low, p.high, p.act) for p in (dfmpc6 or mp).analysis().pairs]
        deploy = None
        if not args.skip_deploy and dfmpc6 is not None:
            deploy = _deploy(dfmpc6, lm, data, tmp, args.threads)
        ablation = []
        if args.ablation:
            for per_channel in (False, True):
                for name, (recipe, what) in ABLATION.items():
                    row, _ = _run(recipe, lm, "6", per_channel, data, tmp)
                    ablation.append({"method": name, "what": what, **row})
                    print(f"| {name} | {row['grid']} | {row['top1']:.2f} | {row['top5']:.2f} | "
                          f"{row['top1'] - fp32['top1']:+.2f} | {row['method_seconds']:.1f} |", flush=True)

    meta = {"model": lm.arch, "weights": str(args.weights), "weights_format": args.weights_format,
            "bn_statistics": status, "data": str(spec), "images": len(data.labels), "decode_seconds": decode,
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
            "machine": f"{os.cpu_count()} CPU cores", "evaluation": "zoo.evaluate auto engine",
            "fp32": fp32, "fp32_bytes": fp32_bytes}
    print("\n" + "\n".join(_md_rows(rows, fp32, fp32_bytes)))
    if deploy is not None:
        lat = deploy["ort_latency_ms"]
        print(f"\nONNX Runtime CPU latency ({lat['threads']} threads), p50 ms: " + "; ".join(
            f"{v} bs1 {lat[v]['1']['p50']:.1f} / bs32 {lat[v]['32']['p50']:.1f}" for v in ("fp32", "w8a8_ort", "w8a8")))
        print("ORT top-1: " + ", ".join(f"{k} {v['top1']:.2f}" for k, v in deploy["ort_accuracy"].items()))
        print("TensorRT-RTX engines: " + ", ".join(
            f"{k} {v['bytes']:,} B" if "bytes" in v else f"{k}: {v}" for k, v in deploy["trt_engines"].items()))
    total = round(time.perf_counter() - t0, 1)
    atomic_write_json(args.out, {**meta, "pairs": pairs, "rows": rows, "deploy": deploy, "total_seconds": total})
    print(f"wrote {args.out} ({total} s)")
    if ablation:
        abl_path = str(Path(args.out).with_name(Path(args.out).stem + "_ablation.json"))
        atomic_write_json(abl_path, {**meta, "bits": "6", "rows": ablation})
        print(f"wrote {abl_path}")


if __name__ == "__main__":
    main()
