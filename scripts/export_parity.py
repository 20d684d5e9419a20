"""Deploying from the packed file alone matches the build: ``export`` against ``build``, and ``build --from-report``.

    python scripts/export_parity.py [--model resnet56_cifar10_optA] [--limit 2000] [--threads 2]
                                    [--replay-model resnet20_cifar10_optA] [--work DIR] [--quick]
                                    [--out results/export_parity.json]

1. ``dfmpc-deploy build MODEL --weights <real CIFAR-10 weights> --bits 2/6 --data imagefolder:<CIFAR test> --limit N
   --target onnx ort`` (the README's command), then ``dfmpc-deploy export OUT/model.dfmpc --target onnx ort --data ...
   --limit N`` into another directory, reading only the ``.dfmpc``.
2. For every ONNX variant: whether the two files are byte-equal, and the largest difference of their outputs on the N
   images (ONNX Runtime, same session options); the top-1 of each variant in both reports. Goals: outputs within 1e-5,
   ORT top-1 (fp32, wdq, w8a8, w8a8_ort) within 0.1 point. ``dfmpc-deploy eval OUT/model.dfmpc --json`` against the
   build's own top-1 of the packed model.
3. ``build REPLAY_MODEL`` (real weights, default recipe, no data) and ``build --from-report`` of its report: whether
   ``model.dfmpc`` is reproduced byte for byte.

Every command runs as a subprocess (``python -m dfmpc_deploy``) with ``--threads``; wall times are of the whole
command on a shared machine (re-run quietly for timings). ``--quick``: a tiny synthesis budget (for the test suite).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dfmpc_deploy.deploy.onnx_export import VARIANTS
from dfmpc_deploy.deploy.ort import run_session
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.models import get_spec

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = {"resnet56_cifar10_optA": SHARED / "weights" / "akamaster_cifar10" / "resnet56-4bfd9763.th",
           "resnet20_cifar10_optA": SHARED / "weights" / "akamaster_cifar10" / "resnet20-12fca82f.th"}
CIFAR = SHARED / "cifar10-test-jpg" / "test"
ORT_VARIANTS = ("fp32", "wdq", "w8a8", "w8a8_ort")
QUICK = ["--synth-samples", "4", "--synth-steps", "2"]


def _cli(*argv: str) -> tuple[float, str]:
    """Run ``dfmpc-deploy ARGV``; returns (wall seconds, stdout); a failure ends the script with its stderr."""
    cmd = [sys.executable, "-m", "dfmpc_deploy", *argv]
    print("$ dfmpc-deploy " + " ".join(argv), flush=True)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"export_parity: command failed ({res.returncode}): {' '.join(argv)}\n{res.stderr}")
    return round(time.perf_counter() - t, 2), res.stdout


def _shown(path: Path) -> str:
    """A shared-data path as the README writes it (``../shared/data/...``)."""
    try:
        return str(Path("..") / path.relative_to(SHARED.parent.parent))
    except ValueError:
        return str(path)


def _top1(report: dict, name: str) -> float | None:
    return report.get("accuracy", {}).get(name, {}).get("top1")


def export_vs_build(args, work: Path) -> dict:
    data = f"imagefolder:{CIFAR}"
    quick = QUICK if args.quick else []
    b, e = work / "build", work / "export"
    common = ["--data", data, "--limit", str(args.limit), "--threads", str(args.threads), "-q"]
    build_s, _ = _cli("build", args.model, "--weights", str(WEIGHTS[args.model]), "--bits", "2/6", *common,
                      "--target", "onnx", "ort", *quick, "--out", str(b), "--force")
    export_s, _ = _cli("export", str(b / "model.dfmpc"), "--target", "onnx", "ort", *common, "--out", str(e),
                       "--force")
    eval_s, eval_out = _cli("eval", str(b / "model.dfmpc"), "--data", data, "--limit", str(args.limit), "--threads",
                            str(args.threads), "--json")
    rb, re_ = (json.loads((d / "report.json").read_text()) for d in (b, e))
    spec = get_spec(args.model)
    ds = load_dataset(parse_data_spec(data), spec.input_size, spec.resize, spec.mean, spec.std, args.limit,
                      num_classes=spec.num_classes)
    rows = {}
    for v in VARIANTS:
        fb, fe = b / f"model_{v}.onnx", e / f"model_{v}.onnx"
        yb = run_session(fb, ds.images, threads=args.threads)
        ye = run_session(fe, ds.images, threads=args.threads)
        rows[v] = {"bytes_equal": fb.read_bytes() == fe.read_bytes(), "size_bytes": fe.stat().st_size,
                   "max_abs_diff_outputs": float(np.abs(yb - ye).max()), "max_abs_outputs": float(np.abs(yb).max()),
                   "top1_build": _top1(rb, f"onnx_{v}"), "top1_export": _top1(re_, f"onnx_{v}"),
                   "parity_vs_packed_model": re_["parity"][f"onnx_{v}"]}
        print(f"{v:<9} bytes equal {rows[v]['bytes_equal']}, max |diff| {rows[v]['max_abs_diff_outputs']:.3g}, "
              f"top-1 build {rows[v]['top1_build']} export {rows[v]['top1_export']}", flush=True)
    evaluated = json.loads(eval_out)
    packed_build = _top1(rb, "dfmpc")
    return {
        "model": args.model, "images": len(ds.labels), "threads": args.threads, "quick": args.quick,
        "commands": {"build": f"dfmpc-deploy build {args.model} --weights {_shown(WEIGHTS[args.model])} --bits 2/6 "
                              f"--data imagefolder:{_shown(CIFAR)} --limit {args.limit} --target onnx ort "
                              f"--threads {args.threads}",
                     "export": f"dfmpc-deploy export OUT/model.dfmpc --target onnx ort --data imagefolder:"
                               f"{_shown(CIFAR)} --limit "
                               f"{args.limit} --threads {args.threads}",
                     "eval": f"dfmpc-deploy eval OUT/model.dfmpc --data imagefolder:{_shown(CIFAR)} --limit "
                             f"{args.limit} --json"},
        "wall_seconds": {"build": build_s, "export": export_s, "eval": eval_s},
        "packed_bytes": (b / "model.dfmpc").stat().st_size, "packed_sha256": re_["packed_sha256"],
        "input_source": re_["input_source"], "variants": rows,
        "eval": {"export_cli": evaluated, "build_top1_of_packed_model": packed_build,
                 "export_torch_fakequant": re_["accuracy"]["torch_fakequant"]},
        "goals": {
            "outputs_within_1e-5": all(r["max_abs_diff_outputs"] <= 1e-5 for r in rows.values()),
            "ort_top1_within_0.1": all(abs(rows[v]["top1_build"] - rows[v]["top1_export"]) <= 0.1
                                       for v in ORT_VARIANTS),
            "eval_equals_build": evaluated["top1"] == packed_build}}


def replay(args, work: Path) -> dict:
    a, b = work / "replay_a", work / "replay_b"
    quick = QUICK if args.quick else []
    build_s, _ = _cli("build", args.replay_model, "--weights", str(WEIGHTS[args.replay_model]), "--bits", "2/6",
                      "--threads", str(args.threads), *quick, "--out", str(a), "--force", "-q")
    replay_s, _ = _cli("build", "--from-report", str(a / "report.json"), "--out", str(b), "--force", "-q")
    same = (a / "model.dfmpc").read_bytes() == (b / "model.dfmpc").read_bytes()
    print(f"replay of {args.replay_model}: model.dfmpc byte-identical: {same}", flush=True)
    return {"model": args.replay_model, "commands": [
        f"dfmpc-deploy build {args.replay_model} --weights {_shown(WEIGHTS[args.replay_model])} --bits 2/6 --threads "
        f"{args.threads} --out A", "dfmpc-deploy build --from-report A/report.json --out B"],
        "wall_seconds": {"build": build_s, "replay": replay_s}, "packed_bytes": (a / "model.dfmpc").stat().st_size,
        "model_dfmpc_byte_identical": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56_cifar10_optA", choices=sorted(WEIGHTS))
    ap.add_argument("--replay-model", default="resnet20_cifar10_optA", choices=[*sorted(WEIGHTS), "none"])
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the build/export directories here")
    ap.add_argument("--quick", action="store_true", help="tiny synthesis budget (tests)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "export_parity.json")
    args = ap.parse_args()
    if not CIFAR.is_dir() or not WEIGHTS[args.model].is_file():
        sys.exit(f"export_parity: needs the real weights and CIFAR-10 test images in {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {"date": time.strftime("%Y-%m-%d"), "export_vs_build": export_vs_build(args, work)}
        if args.replay_model != "none":
            result["replay"] = replay(args, work)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
