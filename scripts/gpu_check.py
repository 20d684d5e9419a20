"""The GPU half of dfmpc-deploy's checks (run by scripts/gpu_check.sh; see there). Each check writes one JSON file:

* ``env.json``: torch, CUDA, the device.
* ``gpu_tests.json``: ``pytest -m gpu`` (the tests that skip without a GPU), pass/fail counts and the tail of the log.
* ``compensate_gpu.json``: the default dfmpc recipe with ``--device cuda`` on ResNet-18/50 (random weights with
  image-like BN statistics) and ResNet-20/56 (real weights, if carried): seconds per pass, the FP32 forward pass at
  batch 32 on the same GPU, and the ratio; for ResNet-20 the same build on the CPU, the share of equal codes and both
  top-1 on the carried images.
* ``refit_gpu.json``: a weight-stripped ``engine_wdq.plan`` made by ``dfmpc-deploy export`` from a ResNet-20
  ``.dfmpc`` (real weights if carried), refit on this GPU from the file's codes (``trt.Refitter``, one named weight
  per engine weight, dfmpc_deploy.packed.refit_weights_from_packed) and compared with the packed model's outputs
  (``parity.trt_wdq_refit_dfmpc``); the GPU test
  ``tests/test_packed.py::test_stripped_engine_is_refit_from_the_packed_codes`` runs the same path (gpu_tests.json).
* ``latency_gpu.json``: ``torch-cuda`` latency (FP16, eager and CUDA graph) of the compensated ResNet-18/50 at batch
  1, 8 and 32 (trtexec-style timing, dfmpc_deploy.deploy.trt.cuda_latency_ms).
TensorRT is not installed on the lent machine (its engines are built and checked on the CPU by the test suite), so the
TensorRT runner is reported as skipped there.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dfmpc_deploy.build import BuildConfig, run_build
from dfmpc_deploy.deploy import trt
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.io.atomic import atomic_write_json
from dfmpc_deploy.packed import ExportConfig, run_export


def _write(out: Path, name: str, obj: dict) -> None:
    atomic_write_json(out / name, obj)
    print(f"wrote {out / name}", flush=True)


def _forward_seconds(model, shape, device, batch: int = 32) -> float:
    x = torch.randn((batch, *shape), device=device)
    model = model.to(device)
    times = []
    with torch.no_grad():
        for i in range(4):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
    model.to("cpu")
    return sorted(times)[len(times) // 2]


def check_tests(out: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                         capture_output=True, text=True)
    tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
    _write(out, "gpu_tests.json", {"returncode": res.returncode, "summary": tail[-1] if tail else "", "tail": tail})


def check_compensate(out: Path, data: Path) -> dict:
    from dfmpc_deploy.passes.recipes import compensate
    from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
    from dfmpc_deploy.zoo.evaluate import accuracy
    from dfmpc_deploy.zoo.models import load_model

    cases = [("resnet18", "random"), ("resnet50", "random")]
    for name, f in (("resnet20_cifar10_optA", "resnet20-12fca82f.th"),
                    ("resnet56_cifar10_optA", "resnet56-4bfd9763.th")):
        if (data / f).is_file():
            cases.append((name, str(data / f)))
    rows, models = [], {}
    for name, weights in cases:
        lm = load_model(name, weights)
        shape = (3, lm.spec.input_size, lm.spec.input_size)
        fwd = _forward_seconds(lm.module, shape, "cuda")
        t = time.perf_counter()
        mp = compensate(lm.module, shape, arch=name, device="cuda")
        torch.cuda.synchronize()
        sec = time.perf_counter() - t
        rows.append({"model": name, "weights": "random" if weights == "random" else "pretrained",
                     "forward_b32_seconds": round(fwd, 5), "compensate_seconds": round(sec, 3),
                     "ratio_forward_passes": round(sec / fwd, 1),
                     "passes_seconds": {p.name: p.seconds for p in mp.config.passes},
                     "synthesis": mp.config.record("calibrate").info})
        models[name] = (lm, mp)
        print(rows[-1], flush=True)
    result: dict = {"device": torch.cuda.get_device_name(0), "rows": rows}
    if "resnet20_cifar10_optA" in models and (data / "cifar10" / "test").is_dir():
        lm, gpu = models["resnet20_cifar10_optA"]
        cpu = compensate(lm.module, (3, 32, 32), arch=lm.arch, device="cpu")
        ds = load_dataset(parse_data_spec(f"imagefolder:{data / 'cifar10' / 'test'}"), 32, None, lm.spec.mean,
                          lm.spec.std, num_classes=10)
        same = sum(int((q.codes == gpu.layers[n].codes).sum()) for n, q in cpu.layers.items())
        result["resnet20_cpu_vs_gpu"] = {"images": len(ds.labels), "fp32": accuracy(lm.module, ds),
                                         "dfmpc_cpu": accuracy(cpu.module, ds), "dfmpc_gpu": accuracy(gpu.module, ds),
                                         "equal_code_fraction": round(same / sum(q.numel for q in cpu.layers.values()),
                                                                      4)}
    _write(out, "compensate_gpu.json", result)
    return models


def check_refit(out: Path, data: Path) -> None:
    """export's weight-stripped wdq engine, refit from the .dfmpc codes on this GPU (see the module docstring)."""
    result: dict = {"backend": trt.backend_name()}
    if result["backend"] is None:
        result["skipped"] = "neither tensorrt nor tensorrt_rtx is installed here"
        _write(out, "refit_gpu.json", result)
        return
    weights = data / "resnet20-12fca82f.th"
    images = data / "cifar10" / "test"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_build(BuildConfig(model="resnet20_cifar10_optA", out=Path(tmp) / "b",
                                  weights=str(weights) if weights.is_file() else "random",
                                  settings={"synth_samples": 8, "synth_steps": 20}))
            rep = run_export(ExportConfig(file=Path(tmp) / "b" / "model.dfmpc", targets=("trt",), batch_sizes=(1, 8),
                                          out=Path(tmp) / "e", limit=256,
                                          data=f"imagefolder:{images}" if images.is_dir() else None))
            engine = rep.engine.to_dict() if hasattr(rep.engine, "to_dict") else rep.engine
            result.update(engine=engine, parity={k: p.to_dict() for k, p in rep.parity.items()}, notes=list(rep.notes),
                          refit_from_dfmpc=rep.parity["trt_wdq_refit_dfmpc"].to_dict()
                          if "trt_wdq_refit_dfmpc" in rep.parity else "not run: no weight-stripped plan (see notes)")
        except DfmpcError as err:
            result["error"] = str(err)
    print(f"refit: {result.get('refit_from_dfmpc', result.get('error'))}", flush=True)
    _write(out, "refit_gpu.json", result)


def check_latency(out: Path, models: dict) -> None:
    from dfmpc_deploy.deploy.targets import torch_cuda_latency

    lat = {}
    for name in ("resnet18", "resnet50"):
        if name in models:
            mp = models[name][1]
            lat[name] = {"eager_fp16": torch_cuda_latency(mp.module, (3, 224, 224), (1, 8, 32), cuda_graph=False),
                         "cudagraph_fp16": torch_cuda_latency(mp.module, (3, 224, 224), (1, 8, 32), cuda_graph=True)}
    _write(out, "latency_gpu.json", {"device": torch.cuda.get_device_name(0), "latency_ms": lat,
                                     "tensorrt": "skipped: TensorRT is not installed on the lent GPU machine"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/gpu"))
    ap.add_argument("--data", type=Path, default=Path(".gpu_data"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if not torch.cuda.is_available():
        env["skipped"] = "no CUDA device: every check here needs one"
        _write(args.out, "env.json", env)
        print("gpu_check: no CUDA device here; nothing to check", flush=True)
        return 0
    _write(args.out, "env.json", env)
    t0 = time.perf_counter()
    check_tests(args.out)
    models = check_compensate(args.out, args.data)
    check_latency(args.out, models)
    check_refit(args.out, args.data)
    print(f"gpu_check: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
