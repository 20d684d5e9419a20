"""ONNX Runtime (CPU) sessions: parity with PyTorch, top-1 on a dataset, and latency percentiles.

Latency is wall-clock time of ``session.run`` on a fixed random batch (host memory, so it includes no transfers), after
a warm-up of at least ``warmup_s`` seconds and 3 runs, over at least ``min_iters`` runs and ``min_seconds`` seconds.
When several files are timed together (:func:`compare_latency`) their runs are interleaved round-robin, so a noisy
neighbour on a shared machine slows them alike. Threads: ``intra_op_num_threads`` = ``threads`` (default: the CPUs
this process may run on), inter-op 1, sequential execution; the number is recorded in every result.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .._deps import require
from ..errors import DfmpcError

__all__ = ["default_threads", "ort_session", "run_session", "parity", "accuracy", "latency_ms", "compare_latency",
           "percentiles_ms"]

log = logging.getLogger("dfmpc_deploy")


def default_threads() -> int:
    """CPUs this process may run on (``os.sched_getaffinity`` where available)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def ort_session(path, threads: int | None = None, opt_level: str = "all"):
    """An ``onnxruntime.InferenceSession`` on the CPU execution provider.

    Args:
        path: ``.onnx`` file.
        threads: intra-op threads (default :func:`default_threads`).
        opt_level: ``basic`` | ``extended`` | ``all`` (ORT_ENABLE_ALL: needed to fuse Q/DQ into QLinearConv).

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        DfmpcError: the file cannot be loaded.
    """
    ort = require("onnxruntime", "ort")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if opt_level not in levels:
        raise DfmpcError(f"bad ORT optimisation level '{opt_level}': choose basic, extended or all")
    so.graph_optimization_level = levels[opt_level]
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise DfmpcError(f"ONNX Runtime cannot load '{path}': {err}") from err


def _as_session(model, threads: int | None):
    return ort_session(model, threads) if isinstance(model, (str, os.PathLike)) else model


def run_session(model, images: torch.Tensor | np.ndarray, batch_size: int = 250,
                threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Logits (N, classes) float32 of ``images`` (N, C, H, W) float32, in batches.

    Args:
        model: a ``.onnx`` path or an InferenceSession.
        progress: ``progress(done, total)`` in images, after each batch.
    """
    sess = _as_session(model, threads)
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    name = sess.get_inputs()[0].name
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(sess.run(None, {name: np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)})[0])
        if progress is not None:
            progress(min(i + batch_size, len(x)), len(x))
    return np.concatenate(outs).astype(np.float32)


@torch.no_grad()
def parity(model, reference: nn.Module, inputs: torch.Tensor, threads: int | None = None) -> dict:
    """Compare an ONNX model with its PyTorch reference on ``inputs``.

    Returns:
        ``{"max_abs_diff": float, "max_abs_ref": float, "top1_agreement": float (0..1), "n": int}``.
    """
    y = run_session(model, inputs, threads=threads)
    ref = reference.eval()(inputs).float().numpy()
    return {"max_abs_diff": float(np.abs(y - ref).max()), "max_abs_ref": float(np.abs(ref).max()),
            "top1_agreement": float((y.argmax(1) == ref.argmax(1)).mean()), "n": int(len(inputs))}


def accuracy(model, dataset, batch_size: int = 250, threads: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Top-1 / top-5 (percent) of an ONNX model on a :class:`dfmpc_deploy.data.Dataset`.

    Args:
        progress: ``progress(done, total)`` in images, after each batch.

    Returns:
        ``{"top1": float, "top5": float, "n": int}`` (same keys as :func:`dfmpc_deploy.evaluate.accuracy`).
    """
    out = torch.from_numpy(run_session(model, dataset.images, batch_size, threads, progress))
    k = min(5, out.shape[1])
    hit = out.topk(k, dim=1).indices == dataset.labels[:, None]
    return {"top1": round(100.0 * hit[:, 0].float().mean().item(), 2),
            "top5": round(100.0 * hit.any(dim=1).float().mean().item(), 2), "n": len(dataset.labels)}


def percentiles_ms(times_s: Sequence[float]) -> dict:
    """``{"p50", "p90", "p99", "mean"}`` in milliseconds (rounded to µs) plus ``iters``."""
    t = np.asarray(times_s, dtype=np.float64) * 1000.0
    return {"p50": round(float(np.percentile(t, 50)), 3), "p90": round(float(np.percentile(t, 90)), 3),
            "p99": round(float(np.percentile(t, 99)), 3), "mean": round(float(t.mean()), 3), "iters": int(len(t))}


def compare_latency(models: Mapping[str, object], input_shape: tuple[int, ...], batch_sizes=(1, 8, 32),
                    threads: int | None = None, warmup_s: float = 0.2, min_iters: int = 10,
                    min_seconds: float = 1.0, seed: int = 0,
                    progress: Callable[[float, int], None] | None = None) -> dict:
    """Latency of several ONNX models side by side (runs interleaved round-robin per batch size).

    Args:
        models: ``{label: .onnx path or InferenceSession}``.
        input_shape: (C, H, W).
        batch_sizes: batch sizes to time.
        threads: intra-op threads for sessions created here (default :func:`default_threads`).
        warmup_s: warm-up time per model and batch size (at least 3 runs).
        min_iters, min_seconds: each model gets at least ``min_iters`` timed runs, and timing goes on until
            ``min_seconds`` of wall time have passed for the batch size.
        seed: seed of the random input.
        progress: ``progress(done, total)`` in batch sizes, after each round of timed runs: ``done`` counts the
            batch sizes finished plus the fraction of the current one (the lesser of its share of ``min_iters``
            and of ``min_seconds``, the two conditions that end it).

    Returns:
        ``{label: {str(batch): {"p50", "p90", "p99", "mean", "iters"}}, ...}`` plus ``"threads": int``.
    """
    threads = threads or default_threads()
    sessions = {k: _as_session(m, threads) for k, m in models.items()}
    rng = np.random.default_rng(seed)
    res: dict = {k: {} for k in sessions}
    for i_bs, bs in enumerate(batch_sizes):
        x = rng.standard_normal((bs, *input_shape), dtype=np.float32)
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        for k, s in sessions.items():
            t_end, n = time.perf_counter() + warmup_s, 0
            while n < 3 or time.perf_counter() < t_end:
                s.run(None, feeds[k])
                n += 1
        times: dict[str, list[float]] = {k: [] for k in sessions}
        t0 = time.perf_counter()
        while min(len(v) for v in times.values()) < min_iters or time.perf_counter() - t0 < min_seconds:
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
            if progress is not None:
                share = min(len(v) for v in times.values()) / max(min_iters, 1)
                if min_seconds > 0:
                    share = min(share, (time.perf_counter() - t0) / min_seconds)
                progress(i_bs + 1 if share >= 1 else round(i_bs + share, 2), len(batch_sizes))
        for k in sessions:
            res[k][str(bs)] = percentiles_ms(times[k])
        log.info("ort latency bs=%d: %s", bs, ", ".join(f"{k} p50 {res[k][str(bs)]['p50']:.2f} ms" for k in sessions))
    res["threads"] = threads
    return res


def latency_ms(model, input_shape: tuple[int, ...], batch_sizes=(1, 8, 32), threads: int | None = None,
               warmup_s: float = 0.2, min_iters: int = 10, min_seconds: float = 1.0) -> dict:
    """Latency percentiles of one ONNX model: ``{str(batch): {"p50", "p90", "p99", "mean", "iters"}}``.

    Arguments as in :func:`compare_latency`.
    """
    res = compare_latency({"m": model}, input_shape, batch_sizes, threads, warmup_s, min_iters, min_seconds)
    return res["m"]

