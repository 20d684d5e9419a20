"""The real ImageNet MobileNetV2 (both files) by method, bit width and grid (issue 19), resumable; deployment optional.

Two files of the same function (../shared/data/MANIFEST.md): ``folded`` (torchvision's quantization-aware-trained
MobileNetV2 with BN folded into the convolutions: identity statistics, so ``dfmpc`` runs as ``dfmpc-weights`` and
``zeroq`` refuses) and ``restored`` (each BN holding the mean and variance of its real input: the statistics a
pretrained network carries, so the data-free synthesis runs at 224 px). Every cell is one compensation of one file by
one method at one bit width and grid, evaluated on the 1,300 shared ImageNet validation images (decoded once):

    files x bits {8, 6, 4, 3/6, 2/6, avg4 (--avg-bits 4)} x grids {pt, pc} x methods {rtn, dfq, zeroq, dfmpc,
    dfmpc-alloc}

Each cell records top-1/top-5, the packed file's bytes (``save_packed``), the compensation seconds, the FP32-forward
ratio (compensation seconds / one FP32 forward pass of 32 images, measured in the same process), and what each pass
reported (passes kept by the guard, synthesis loss per BN, statistics chosen). No image is read by compensation.

Cells are written one JSON file each under ``results/imagenet_mobilenet/cells/`` as they finish; a re-run skips the
cells already there (``--redo`` runs them again), so the grid can be run in pieces (``--files``, ``--bits``,
``--grids``, ``--methods`` select). The summary (every cell found, Markdown table) is results/imagenet_mobilenet.json.
``--deploy`` also exports the 6-bit per-tensor ``dfmpc`` model of the folded file (ONNX variants, ONNX Runtime
latency and accuracy, TensorRT-RTX engines built on this CPU).

    python scripts/imagenet_mobilenet.py [--files restored] [--bits 6,4] [--grids pc] [--methods rtn,dfmpc]
                                         [--limit N] [--threads N] [--deploy]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from dfmpc_deploy.core.stats import bn_status
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.io.container import fp32_nbytes, save_packed
from dfmpc_deploy.passes.base import run_recipe
from dfmpc_deploy.passes.recipes import RECIPES
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.evaluate import accuracy
from dfmpc_deploy.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAPE = (3, 224, 224)
FILES = {"folded": "mobilenet_v2_tvq_dequant_float.pth", "restored": "mobilenet_v2_bn_restored.pth"}
BITS = ("8", "6", "4", "3/6", "2/6", "avg4")
GRIDS = ("pt", "pc")
METHODS = ("rtn", "dfq", "zeroq", "dfmpc", "dfmpc-alloc")
MIB = 2 ** 20
CELLS = ROOT / "results" / "imagenet_mobilenet" / "cells"


def _settings(bits: str, grid: str) -> dict:
    """The build settings of a cell (``avg4``: an average of 4 bits per weight, widths chosen by allocation)."""
    spec = {"avg_bits": 4.0} if bits == "avg4" else {"bits": bits}
    return {**spec, "per_channel": grid == "pc"}


def _forward_seconds(model, batch: int = 32, repeat: int = 3) -> float:
    x = torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeat):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _passes(mp) -> dict:
    """What each pass reported, reduced to what the closing table needs."""
    out = {}
    for rec in mp.config.passes:
        info = dict(rec.info)
        out[rec.name] = {"seconds": rec.seconds, **{k: info[k] for k in (
            "guard", "stats", "stats_kl", "loss_final", "holdout_loss_final", "per_bn", "steps_run", "samples",
            "bn_reestimated", "rounded_layers", "grouped_rounded", "skipped", "source") if k in info}}
    return out


def run_cell(lm, file: str, bits: str, grid: str, method: str, data, fwd: float, tmp: Path) -> dict:
    """One cell: compensate, pack, evaluate. A method that refuses the model is recorded with its one line."""
    cell = {"file": file, "bits": bits, "grid": grid, "method": method}
    t = time.perf_counter()
    try:
        mp = run_recipe(RECIPES[method], lm.module, SHAPE, _settings(bits, grid), arch=lm.arch)
    except DfmpcError as err:
        return {**cell, "status": "refused", "error": str(err).splitlines()[0]}
    seconds = time.perf_counter() - t
    path = tmp / "m.dfmpc"
    save_packed(mp, path)
    size = path.stat().st_size
    acc = accuracy(mp.module, data)
    return {**cell, "status": "done", "recipe_ran": mp.config.recipe, "overrides": list(mp.config.overrides),
            "top1": acc["top1"], "top5": acc["top5"], "n": acc["n"], "packed_bytes": size,
            "packed_mib": round(size / MIB, 3), "seconds": round(seconds, 2), "fp32_forward_b32_seconds": round(fwd, 3),
            "forward_ratio": round(seconds / fwd, 1), "passes": _passes(mp)}


def _md(cells: list[dict], fp32: dict) -> list[str]:
    out = ["| file | bits | grid | method (ran as) | top-1 % | top-5 % | Δ top-1 | packed MiB | seconds | fwd ratio |"
           " kept by guard |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if c["status"] != "done":
            out.append(f"| {c['file']} | {c['bits']} | {c['grid']} | {c['method']} | refused: {c['error'][:60]}… |"
                       " | | | | | |")
            continue
        g = (c["passes"].get("recalibrate") or {}).get("guard")
        kept = "-" if g is None else ("kept" if g["kept"] else "undone")
        ref = fp32.get(c["file"], {}).get("top1")  # (absent when another run of this script wrote the summary)
        delta = "" if ref is None else f"{c['top1'] - ref:+.2f}"
        out.append(f"| {c['file']} | {c['bits']} | {c['grid']} | {c['method']} ({c['recipe_ran']}) | {c['top1']:.2f} | "
                   f"{c['top5']:.2f} | {delta} | {c['packed_mib']:.3f} | "
                   f"{c['seconds']:.1f} | {c['forward_ratio']:.1f} | {kept} |")
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


def _axis(text: str, allowed: tuple[str, ...], name: str) -> list[str]:
    vals = [v for v in text.split(",") if v]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise SystemExit(f"bad --{name} {text!r}: choose from {', '.join(allowed)}")
    return vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "imagenet_val_1300"), help="imagenet:DIR directory")
    ap.add_argument("--files", default=",".join(FILES))
    ap.add_argument("--bits", default=",".join(BITS))
    ap.add_argument("--grids", default=",".join(GRIDS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--weights-format", default="torchvision-quantized",
                    help="torchvision-quantized (ReLU, what the weights were trained with) or torchvision (ReLU6)")
    ap.add_argument("--limit", type=int, help="evenly spaced subset of this many images (cells then go elsewhere)")
    ap.add_argument("--redo", action="store_true", help="run the selected cells even if their JSON exists")
    ap.add_argument("--deploy", action="store_true", help="also the ONNX / ORT / TensorRT part (folded, 6-bit pt)")
    ap.add_argument("--threads", type=int, help="torch and ORT threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "results" / "imagenet_mobilenet.json"))
    args = ap.parse_args()
    files, bits_axis = _axis(args.files, tuple(FILES), "files"), _axis(args.bits, BITS, "bits")
    grids, methods = _axis(args.grids, GRIDS, "grids"), _axis(args.methods, METHODS, "methods")
    if args.threads:
        torch.set_num_threads(args.threads)
    cells_dir = CELLS if args.limit is None else CELLS.with_name(f"cells_limit{args.limit}")
    cells_dir.mkdir(parents=True, exist_ok=True)
    summary_path = Path(args.out)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if "cells" not in summary:  # the file of the earlier (issue 13) script: nothing to keep
        summary = {}
    fp32: dict = summary.get("fp32", {})
    spec = parse_data_spec(f"imagenet:{args.data}")
    data = None
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for file in files:
            lm = load_model("mobilenet_v2", str(SHARED / "weights" / "mobilenet_v2_imagenet" / FILES[file]),
                            weights_format=args.weights_format)
            if data is None:
                t = time.perf_counter()
                data = load_dataset(spec, 224, 256, lm.spec.mean, lm.spec.std, args.limit, num_classes=1000)
                print(f"{len(data.labels)} images decoded in {time.perf_counter() - t:.1f} s; torch "
                      f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)
            if file not in fp32 or args.limit is not None:
                fp32[file] = {**accuracy(lm.module, data), "bytes": fp32_nbytes(lm.module),
                              "bn_statistics": bn_status(lm.module)}
            print(f"{file}: FP32 top-1 {fp32[file]['top1']:.2f} %, BN statistics {fp32[file]['bn_statistics']}",
                  flush=True)
            fwd = _forward_seconds(lm.module)
            for bits in bits_axis:
                for grid in grids:
                    for method in methods:
                        cid = f"{file}-{bits.replace('/', '_')}-{grid}-{method}"
                        path = cells_dir / f"{cid}.json"
                        if path.exists() and not args.redo:
                            continue
                        cell = {"id": cid, **run_cell(lm, file, bits, grid, method, data, fwd, tmp),
                                "load_average": round(os.getloadavg()[0], 1),
                                "measured": time.strftime("%Y-%m-%d %H:%M")}
                        atomic_write_json(path, cell)
                        print(_md([cell], fp32)[-1], flush=True)
            if args.deploy and file == "folded":
                mp = run_recipe(RECIPES["dfmpc"], lm.module, SHAPE, _settings("6", "pt"), arch=lm.arch)
                summary["deploy"] = _deploy(mp, lm, data, tmp, args.threads)
    order = {f"{f}-{b.replace('/', '_')}-{g}-{m}": i for i, (f, b, g, m) in enumerate(
        (f, b, g, m) for f in FILES for b in BITS for g in GRIDS for m in METHODS)}
    cells = sorted((json.loads(p.read_text()) for p in cells_dir.glob("*.json")), key=lambda c: order.get(c["id"], 0))
    summary.update({"fp32": fp32, "images": len(data.labels) if data is not None else None, "cells": cells,
                    "grid": {"files": list(FILES), "bits": list(BITS), "grids": list(GRIDS), "methods": list(METHODS)},
                    "cells_run": len(cells), "cells_in_grid": len(order)})
    if args.limit is None:
        atomic_write_json(summary_path, summary)
    print("\n".join(_md(cells, fp32)))
    print(f"{len(cells)} of {len(order)} cells measured")


if __name__ == "__main__":
    main()
