"""Deployment targets in one call: ONNX files, ONNX Runtime (CPU), TensorRT engines, PyTorch on CUDA.

:func:`run_targets` writes the artifacts into ``out_dir`` and returns a report fragment (structure in its docstring).
A target whose backend is missing is recorded as ``"skipped: <reason>"`` and the run goes on (the ONNX files are
always kept); only a malformed request or ``torch-cuda`` without a GPU raise, before any work is done.
"""
from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .._deps import available
from ..core.progress import Progress
from ..core.state import MixedPrecisionModel
from ..errors import DfmpcError, MissingDependencyError, UsageError
from ..zoo.evaluate import accuracy as torch_accuracy
from . import ort, trt
from .onnx_export import VARIANTS, export_variants

__all__ = ["TARGETS", "TRT_VARIANTS", "ORT_VARIANTS", "run_targets", "torch_cuda_latency"]

log = logging.getLogger("dfmpc_deploy")

TARGETS = ("onnx", "ort", "trt", "torch-cuda")
ORT_VARIANTS = ("fp32", "wdq", "w8a8", "w8a8_ort")  # timed on the CPU (fp16 has no fast CPU kernels)
TRT_VARIANTS = ("fp16", "wdq", "w8a8")  # the forms TensorRT accepts (symmetric, zero-point 0)
#: Parity tolerance per variant: max |onnx - torch| <= rtol * max |torch| + atol (w8a8*: judged by top-1 instead).
PARITY_TOL = {"fp32": (1e-4, 1e-4), "wdq": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}


def _check(targets: Sequence[str]) -> list[str]:
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise UsageError(f"bad --target {', '.join(bad) or '(none)'}: choose from {', '.join(TARGETS)}")
    if "torch-cuda" in targets and not torch.cuda.is_available():
        raise DfmpcError("--target torch-cuda: no CUDA device (torch.cuda.is_available() is False); "
                         "drop it or run on a machine with an NVIDIA GPU")
    return list(dict.fromkeys(targets))


@torch.no_grad()
def torch_cuda_latency(module: nn.Module, input_shape: tuple[int, int, int], batch_sizes=(1, 8, 32),
                       dtype: torch.dtype = torch.float16, cuda_graph: bool = False, **timing) -> dict:
    """GPU latency of a PyTorch module (eager, or replayed from a CUDA graph), trtexec-style timing.

    Args:
        module: the model (copied, moved to CUDA and cast to ``dtype``).
        input_shape: (C, H, W).
        batch_sizes: batch sizes to time.
        dtype: compute dtype (FP16 by default, the dequantised weights are FP).
        cuda_graph: capture one forward in a CUDA graph and time its replay.
        timing: ``warmup_ms``, ``min_iters``, ``min_seconds`` for :func:`dfmpc_deploy.trt.cuda_latency_ms`.

    Returns:
        ``{str(batch): {"p50", "p90", "p99", "mean", "iters"}}``.

    Raises:
        DfmpcError: no CUDA device.
    """
    trt.require_cuda("--target torch-cuda")
    model = copy.deepcopy(module).eval().to("cuda", dtype)
    stream = torch.cuda.Stream()
    res = {}
    for bs in batch_sizes:
        x = torch.randn((bs, *input_shape), device="cuda", dtype=dtype)
        with torch.cuda.stream(stream):
            for _ in range(3):  # cudnn autotune and allocator warm-up outside the capture
                model(x)
        stream.synchronize()
        launch: Callable[[], object] = functools.partial(model, x)
        if cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                model(x)
            launch = graph.replay
        res[str(bs)] = trt.cuda_latency_ms(launch, stream, **timing)
    return res


def _parity_ok(variant: str, p: dict) -> bool | None:
    if variant not in PARITY_TOL:
        return None
    rtol, atol = PARITY_TOL[variant]
    return p["max_abs_diff"] <= rtol * p["max_abs_ref"] + atol


def run_targets(mp: MixedPrecisionModel, fp_model: nn.Module | None, input_shape: tuple[int, int, int],
                targets: Sequence[str], out_dir, dataset=None, batch_sizes: Sequence[int] = (1, 8, 32),
                progress: Progress | None = None, *, threads: int | None = None,
                min_iters: int = 10, min_seconds: float = 1.0, strip_weights: bool = True,
                opset: int = 17, int4: bool = False, known_accuracy: Mapping[str, dict] | None = None) -> dict:
    """Export, run and time ``mp`` on the requested targets.

    Args:
        mp: the compensated model.
        fp_model: the original FP32 model (its top-1 on ``dataset`` is reported next to the others), or None.
        input_shape: (C, H, W).
        targets: subset of :data:`TARGETS`. ``ort`` and ``trt`` export the ONNX files too.
        out_dir: directory for ``model_{fp32,fp16,wdq,w8a8,w8a8_ort}.onnx`` and ``engine_{fp16,wdq,w8a8}.plan``.
        dataset: a :class:`dfmpc_deploy.data.Dataset` for ORT top-1 (``ort`` target) and for parity inputs.
        batch_sizes: batch sizes for every latency table (the engines' max batch is their maximum).
        progress: a :class:`~dfmpc_deploy.core.progress.Progress`: ``say`` for the steps without counts (export,
            engine builds), a ``task`` row with time left for the parity, ORT timing and top-1 loops.
        threads: ORT intra-op threads (default: the CPUs available to the process).
        min_iters, min_seconds: ORT timing budget per model and batch size (GPU timing follows trtexec: >= 10
            iterations and >= 3 s).
        strip_weights: try a weight-stripped + refit engine for ``wdq`` (falls back to a full plan, noted).
        opset: ONNX opset (raised to 21 when ``int4``).
        int4: store ternary (and 3-bit) layers of ``model_wdq.onnx`` as INT4.
        known_accuracy: ``{"torch_fp32": ..., "torch_fakequant": ...}`` the caller measured on ``dataset`` already
            (reused instead of evaluating the same models twice).

    Returns:
        A dict (all keys always present, empty when not measured)::

            {"targets": [...],
             "artifacts": {"onnx_fp32": path, ..., "engine_wdq": path, ...},
             "size_bytes": {"onnx_fp32": int, "onnx_fp16": int, "onnx_wdq": int, "onnx_w8a8": int,
                            "onnx_w8a8_ort": int, "engine": {"fp16": int, "wdq": int, "w8a8": int}},
             "latency_ms": {"ort": {"fp32": {"1": {"p50", "p90", "p99", "mean", "iters"}, "8": ...}, "wdq": ...,
                                    "w8a8": ..., "w8a8_ort": ...},
                            "trt": {"fp16": {...}, "wdq": {...}, "w8a8": {...}},
                            "torch-cuda": {"eager_fp16": {...}, "cudagraph_fp16": {...}}},
             "speedup": {"ort": {"w8a8_ort": {"1": fp32_p50 / p50, ...}, "w8a8": ..., "wdq": ...}},
             "threads": {"ort": int},
             "accuracy": {"torch_fp32": {"top1", "top5", "n"}, "torch_fakequant": {...}, "onnx_fp32": {...},
                          "onnx_fp16": ..., "onnx_wdq": ..., "onnx_w8a8": ..., "onnx_w8a8_ort": ...},
             "parity": {"onnx_fp32": {"max_abs_diff", "max_abs_ref", "top1_agreement", "n", "ok"}, ...,
                        "trt_wdq": {...}},
             "engine": {"backend": "tensorrt_rtx 1.7.1.116", "builds": {"wdq": {"build_seconds", "size_bytes",
                        "stripped", "path"}, ...}}  or  "skipped: <reason>"  or  "not requested",
             "notes": [str, ...]}

        ``parity.*.ok`` is None for the activation-quantized variants (a different model: judged by top-1).

    Raises:
        UsageError: unknown target. DfmpcError: ``torch-cuda`` requested without a CUDA device.
    """
    targets = _check(targets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress(enabled=False)
    t0 = time.perf_counter()
    log.info("run_targets: %s for %s into %s", ", ".join(targets), mp.arch, out_dir)
    rep: dict = {"targets": targets, "artifacts": {}, "size_bytes": {}, "latency_ms": {}, "speedup": {},
                 "threads": {}, "accuracy": {}, "parity": {}, "engine": "not requested", "notes": []}
    notes = rep["notes"]
    x_par = (dataset.images[:64] if dataset is not None
             else torch.randn((8, *input_shape), generator=torch.Generator().manual_seed(0)))

    exports = {}
    if {"onnx", "ort", "trt"} & set(targets):
        progress.say(f"exporting ONNX ({', '.join(VARIANTS)})")
        exports = export_variants(mp, out_dir, input_shape, VARIANTS, opset=max(opset, 21) if int4 else opset,
                                  int4=int4)
        for v, e in exports.items():
            rep["artifacts"][f"onnx_{v}"] = str(e.path)
            rep["size_bytes"][f"onnx_{v}"] = e.size_bytes
            notes += [f"onnx_{v}: {n}" for n in e.notes if f"onnx_{v}: {n}" not in notes]
        if available("onnxruntime"):
            update = progress.task(f"ONNX Runtime parity ({len(x_par)} inputs)")
            for i, (v, e) in enumerate(exports.items()):
                p = ort.parity(e.path, mp.module, x_par, threads)
                update(i + 1, len(exports))
                p["ok"] = _parity_ok(v, p)
                rep["parity"][f"onnx_{v}"] = p
                if p["ok"] is False:
                    notes.append(f"onnx_{v}: parity check FAILED (max abs diff {p['max_abs_diff']:.3g})")
                elif v.startswith("w8a8") and p["top1_agreement"] < 0.9:
                    notes.append(f"onnx_{v}: top-1 agrees with the fake-quant model on only "
                                 f"{100 * p['top1_agreement']:.0f}% of {p['n']} inputs: the data-free activation "
                                 f"ranges assume the BN statistics describe the activations (not true for random "
                                 f"weights or inputs unlike the training data)")
        else:
            notes.append("parity: skipped, onnxruntime not installed (pip install 'dfmpc-deploy[ort]')")

    if "ort" in targets:
        _ort_target(rep, mp, fp_model, exports, input_shape, dataset, batch_sizes, threads, min_iters, min_seconds,
                    known_accuracy or {},
                    progress)
    if "trt" in targets:
        _trt_target(rep, mp, exports, input_shape, x_par, batch_sizes, out_dir, strip_weights, progress)
    if "torch-cuda" in targets:
        progress.say("timing PyTorch on CUDA (fp16, eager and CUDA graph)")
        rep["latency_ms"]["torch-cuda"] = {
            "eager_fp16": torch_cuda_latency(mp.module, input_shape, batch_sizes, cuda_graph=False),
            "cudagraph_fp16": torch_cuda_latency(mp.module, input_shape, batch_sizes, cuda_graph=True)}
    log.info("run_targets: %s finished in %.1f s", ", ".join(targets), time.perf_counter() - t0)
    return rep


def _ort_target(rep, mp, fp_model, exports, input_shape, dataset, batch_sizes, threads, min_iters, min_seconds,
                known: Mapping[str, dict], progress: Progress) -> None:
    if not available("onnxruntime"):
        rep["latency_ms"]["ort"] = "skipped: onnxruntime not installed"
        rep["notes"].append("ort: skipped, onnxruntime not installed (pip install 'dfmpc-deploy[ort]')")
        return

    update = progress.task(f"ONNX Runtime latency ({', '.join(ORT_VARIANTS)}; batch "
                           f"{', '.join(map(str, batch_sizes))})")
    lat = ort.compare_latency({v: exports[v].path for v in ORT_VARIANTS}, input_shape, batch_sizes, threads,
                              min_iters=min_iters, min_seconds=min_seconds, progress=update)
    rep["threads"]["ort"] = lat.pop("threads")
    rep["latency_ms"]["ort"] = lat
    rep["speedup"]["ort"] = {v: {b: round(lat["fp32"][b]["p50"] / lat[v][b]["p50"], 3) for b in lat[v]}
                             for v in ORT_VARIANTS if v != "fp32"}
    rep["notes"].append(f"ort: CPUExecutionProvider, {rep['threads']['ort']} intra-op threads, ORT_ENABLE_ALL; "
                        f"'w8a8' (TensorRT Q/DQ form) runs as DQ + float conv on ORT, 'w8a8_ort' fuses to QLinearConv")
    if dataset is None:
        return

    graph = mp.analysis().graph  # the architecture's one trace also serves the FP32 model
    if "torch_fp32" in known:  # the caller has evaluated these on the same images already
        rep["accuracy"]["torch_fp32"] = dict(known["torch_fp32"])
    elif fp_model is not None:
        rep["accuracy"]["torch_fp32"] = torch_accuracy(fp_model, dataset, progress=progress.task("top-1 torch fp32"),
                                                       graph=graph)
    rep["accuracy"]["torch_fakequant"] = (dict(known["torch_fakequant"]) if "torch_fakequant" in known else
                                          torch_accuracy(mp.module, dataset, graph=graph,
                                                         progress=progress.task("top-1 torch fake-quant")))
    for v, e in exports.items():
        rep["accuracy"][f"onnx_{v}"] = ort.accuracy(e.path, dataset, threads=threads,
                                                    progress=progress.task(f"top-1 onnx {v}"))


def _trt_target(rep, mp, exports, input_shape, x_par, batch_sizes, out_dir, strip_weights,
                progress: Progress) -> None:
    name = trt.backend_name()
    if name is None:
        rep["engine"] = "skipped: tensorrt/tensorrt_rtx not installed"
        rep["notes"].append("trt: skipped, tensorrt/tensorrt_rtx not installed (pip install 'dfmpc-deploy[trt-rtx]'); "
                            "the ONNX files are kept")
        return
    builds, sizes = {}, {}
    for v in TRT_VARIANTS:
        progress.say(f"building TensorRT engine from model_{v}.onnx")
        try:
            art = trt.build_engine(exports[v].path, out_dir / f"engine_{v}.plan", v, max(batch_sizes),
                                   strip_weights=strip_weights and v == "wdq")
        except MissingDependencyError as err:
            rep["engine"] = f"skipped: {err}"
            rep["notes"].append(f"trt: skipped ({err}); the ONNX files are kept")
            return
        except DfmpcError as err:
            rep["notes"].append(f"trt {v}: build failed: {err}")
            continue
        builds[v] = art
        sizes[v] = art.size_bytes
        rep["artifacts"][f"engine_{v}"] = str(art.path)
        rep["notes"] += [f"trt {v}: {n}" for n in art.notes]
    rep["size_bytes"]["engine"] = sizes
    backend = next((a.backend for a in builds.values()), name)
    rep["engine"] = {"backend": backend, "builds": {v: {"build_seconds": a.build_seconds, "size_bytes": a.size_bytes,
                                                        "stripped": a.stripped, "path": str(a.path)}
                                                    for v, a in builds.items()}}
    if not torch.cuda.is_available():
        rep["notes"].append("trt: engines built (CPU AOT) but not run: no CUDA device here")
        return
    lat = {}
    for v, art in builds.items():
        progress.say(f"timing TensorRT engine {v} on the GPU")
        try:
            with trt.TrtRunner(art.path, refit_onnx=art.onnx_path if art.stripped else None) as r:
                y = r.infer(x_par.cuda()).float().cpu()
                with torch.no_grad():
                    ref = mp.module.eval()(x_par).float()
                rep["parity"][f"trt_{v}"] = {"max_abs_diff": float((y - ref).abs().max()),
                                             "max_abs_ref": float(ref.abs().max()),
                                             "top1_agreement": float((y.argmax(1) == ref.argmax(1)).float().mean()),
                                             "n": len(x_par), "ok": None}
                lat[v] = r.latency_ms(batch_sizes, input_shape)
        except (DfmpcError, RuntimeError) as err:  # RTX plans are refused on unsupported GPUs (e.g. Hopper)
            rep["notes"].append(f"trt {v}: could not run on this GPU: {err}")
    rep["latency_ms"]["trt"] = lat
