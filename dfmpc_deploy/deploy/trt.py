"""TensorRT engines from the Q/DQ ONNX files (the only module that imports tensorrt).

Backend: ``tensorrt`` when importable (full TensorRT: needs a GPU to build), else ``tensorrt_rtx`` (TensorRT-RTX: builds
"CPU-only AOT" plans with no GPU; runs on RTX/Ampere+ cards, not on Hopper), else
:class:`~dfmpc_deploy.errors.MissingDependencyError`; callers keep the ONNX files in that case.

Networks are created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: precisions come from the ONNX (INT8/INT4
weight DQ, INT8 activation Q/DQ, FP16 tensors), no precision flags. One optimisation profile covers batch 1..max_batch
(opt = max_batch). ``strip_weights=True`` asks for a weight-stripped plan (``STRIP_PLAN`` + ``REFIT_IDENTICAL``, refit
at load time from the ONNX); TensorRT-RTX 1.7.1 cannot build those without a GPU (Myelin ``graph_jit.cpp`` CUDA
check), in which case the full plan is built and the :class:`EngineArtifact` notes say why.

Timing (:func:`cuda_latency_ms`, used by :class:`TrtRunner` and the torch-cuda target) follows trtexec: warm-up
>= 200 ms, then >= 10 iterations and >= 3 s, a CUDA event pair around each launch on one stream, optional CUDA graph
replay, no host<->device copies in the timed region; p50/p90/p99/mean in ms.

Messages: TensorRT's own (its ``ILogger`` warnings and errors, and what its native code prints straight to file
descriptor 2, such as TensorRT-RTX's "Internal Error: MyelinCheckException ..." when a weight-stripped build cannot
run without CUDA) go to the ``dfmpc_deploy`` logger at INFO, so the terminal shows them only with ``--verbose``;
what they change (a fallback, a failed build) is in the artifact's notes and the raised errors.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import available, require
from ..errors import DfmpcError, MissingDependencyError
from ..io.atomic import atomic_write_bytes
from .ort import percentiles_ms

__all__ = ["EngineArtifact", "backend", "backend_name", "build_engine", "TrtRunner", "cuda_latency_ms",
           "require_cuda"]

log = logging.getLogger("dfmpc_deploy")


def backend_name() -> str | None:
    """``"tensorrt"``, ``"tensorrt_rtx"`` or None, probed without importing anything."""
    for name in ("tensorrt", "tensorrt_rtx"):
        if available(name):
            return name
    return None


def backend():
    """Import the TensorRT backend module (full TensorRT first, then TensorRT-RTX).

    Raises:
        MissingDependencyError: neither is installed (the message names both extras).
    """
    errors = []
    for name, extra in (("tensorrt", "trt"), ("tensorrt_rtx", "trt-rtx")):
        if not available(name):
            errors.append(f"{name}: not installed")
            continue
        try:
            return require(name, extra)
        except MissingDependencyError as err:
            errors.append(str(err))
    raise MissingDependencyError("tensorrt/tensorrt_rtx not installed (" + "; ".join(errors) + "). Install one with "
                                 "pip install 'dfmpc-deploy[trt-rtx]' (CPU build, RTX GPUs) or 'dfmpc-deploy[trt]'")


@dataclass(frozen=True)
class EngineArtifact:
    """A serialized TensorRT plan.

    Attributes:
        path: the ``.plan`` file.
        precision: the ONNX variant it was built from (``fp16``, ``wdq``, ``w8a8``, ...).
        build_seconds: builder wall time.
        size_bytes: plan size.
        backend: ``tensorrt`` or ``tensorrt_rtx`` (with version).
        onnx_path: the source ONNX (also the refit source of a stripped plan).
        stripped: True for a weight-stripped plan (needs refit before use).
        max_batch: largest batch of the optimisation profile.
        notes: what was tried and did not work (e.g. a stripped build that fell back to a full one).
    """

    path: Path
    precision: str
    build_seconds: float
    size_bytes: int
    backend: str
    onnx_path: Path
    stripped: bool = False
    max_batch: int = 32
    notes: tuple[str, ...] = field(default_factory=tuple)


def _logger(trt: Any) -> Any:
    class _Collect(trt.ILogger):
        """Keeps errors for the exception message; passes warnings and worse to our logger at INFO (held while
        :func:`_native_stderr_to_log` captures file descriptor 2, where our log handler may write too)."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.held: list[str] | None = None

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.ERROR:
                self.errors.append(str(msg))
            if severity <= trt.ILogger.WARNING:
                if self.held is not None:
                    self.held.append(str(msg))
                else:
                    log.info("tensorrt: %s", str(msg).strip())

    return _Collect()


@contextlib.contextmanager
def _native_stderr_to_log(logger: Any) -> Iterator[None]:
    """Capture file descriptor 2 while TensorRT runs (module docstring, Messages); then log the captured lines and
    the ``logger``'s held messages at INFO. The terminal is not affected otherwise: :class:`Progress` draws on its
    own copy of the descriptor, and our logging does not run during the capture (the messages are held)."""
    if sys.stderr is not None:  # None under pythonw
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a detached process): nothing can reach the terminal
        saved = -1
    with tempfile.TemporaryFile() as captured:
        if saved >= 0:
            os.dup2(captured.fileno(), 2)
        logger.held = []
        try:
            yield
        finally:
            if saved >= 0:
                os.dup2(saved, 2)
                os.close(saved)
            held, logger.held = logger.held, None
            for msg in held:
                log.info("tensorrt: %s", msg.strip())
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip():
                    log.info("tensorrt (stderr): %s", line.strip())


def _build(trt: Any, onnx_path: Path, max_batch: int, strip: bool, logger: Any) -> bytes | None:
    builder = trt.Builder(logger)
    if builder is None:  # full TensorRT without a usable GPU
        raise DfmpcError(f"{trt.__name__} could not create a builder: {'; '.join(logger.errors[-2:]) or 'no GPU?'}")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DfmpcError(f"TensorRT cannot parse '{onnx_path}': {errs}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        chw = tuple(t.shape)[1:]
        if any(d < 0 for d in chw):
            raise DfmpcError(f"'{onnx_path}': input '{t.name}' has dynamic non-batch dims {tuple(t.shape)}")
        profile.set_shape(t.name, (1, *chw), (max_batch, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    if strip:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    try:
        with _native_stderr_to_log(logger):
            plan = builder.build_serialized_network(network, config)
    except RuntimeError as err:  # some versions raise instead of returning None
        logger.errors.append(str(err))
        plan = None
    return None if plan is None else bytes(plan)


def build_engine(onnx_path, plan_path, precision: str | None = None, max_batch: int = 32,
                 strip_weights: bool = False) -> EngineArtifact:
    """Build a strongly typed engine from an ONNX file and write the plan atomically.

    Args:
        onnx_path: the ONNX model (``fp32``/``fp16``/``wdq``/``w8a8`` from :mod:`dfmpc_deploy.export_onnx`; the
            ``w8a8_ort`` form uses asymmetric UINT8 and INT32 DQ, which TensorRT rejects).
        plan_path: output ``.plan`` file.
        precision: label recorded in the artifact (default: the ONNX file's stem).
        max_batch: largest batch size the engine accepts (profile 1..max_batch, opt = max_batch).
        strip_weights: try a weight-stripped, refittable plan first (see module docstring).

    Returns:
        EngineArtifact (``notes`` says when a stripped build fell back to a full one).

    Raises:
        MissingDependencyError: no TensorRT backend.
        DfmpcError: the ONNX cannot be parsed or the build fails.
    """
    trt = backend()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    name = f"{trt.__name__} {getattr(trt, '__version__', '?')}"
    log.info("build_engine: %s -> %s with %s", onnx_path.name, plan_path.name, name)
    notes: list[str] = []
    t0 = time.perf_counter()
    logger = _logger(trt)
    plan, stripped = None, False
    if strip_weights:
        plan = _build(trt, onnx_path, max_batch, True, logger)
        if plan is None:
            why = logger.errors[-1] if logger.errors else "no plan returned"
            notes.append(f"weight-stripped build (STRIP_PLAN+REFIT_IDENTICAL) failed with {name}"
                         f"{' on a machine without CUDA' if not _cuda_ok() else ''}: {why.strip()[:200]}; "
                         f"built a full (non-stripped) plan instead")
            log.info("build_engine: %s", notes[-1])  # the notes reach the report
            logger.errors.clear()
            t0 = time.perf_counter()
        else:
            stripped = True
    if plan is None:
        plan = _build(trt, onnx_path, max_batch, False, logger)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise DfmpcError(f"TensorRT ({name}) failed to build '{onnx_path}': "
                         f"{'; '.join(e.strip() for e in logger.errors[-3:]) or 'no plan returned'}")
    atomic_write_bytes(plan_path, plan)
    log.info("build_engine: finished in %.3f s (%d bytes)", seconds, len(plan))
    label = precision or onnx_path.stem.removeprefix("model_")
    return EngineArtifact(plan_path, label, round(seconds, 3), len(plan), name, onnx_path,
                          stripped, max_batch, tuple(notes))


def _cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def require_cuda(what: str) -> None:
    """Raise a clear DfmpcError when no CUDA device is usable (e.g. ``what="--target torch-cuda"``)."""
    if not _cuda_ok():
        raise DfmpcError(f"{what} needs an NVIDIA GPU: no CUDA device (torch.cuda.is_available() is False)")


def cuda_latency_ms(launch: Callable[[], object], stream=None, warmup_ms: float = 200.0, min_iters: int = 10,
                    min_seconds: float = 3.0) -> dict:
    """Time ``launch()`` (enqueues work on ``stream``) the way trtexec does, with CUDA events.

    Args:
        launch: enqueues one inference on ``stream``; must not synchronise.
        stream: a ``torch.cuda.Stream`` (default: the current stream).
        warmup_ms: warm-up wall time before timing.
        min_iters, min_seconds: time at least this many launches and this much GPU time.

    Returns:
        ``{"p50", "p90", "p99", "mean", "iters"}`` in milliseconds of GPU time per launch.
    """
    import torch

    require_cuda("CUDA timing")
    stream = stream or torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        t_end = time.perf_counter() + warmup_ms / 1000.0
        while time.perf_counter() < t_end:
            launch()
            stream.synchronize()
        times: list[float] = []
        total = 0.0
        while len(times) < min_iters or total < min_seconds:
            batch = max(min_iters, 10)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
            for start, stop in ev:
                start.record(stream)
                launch()
                stop.record(stream)
            stream.synchronize()
            new = [start.elapsed_time(stop) / 1000.0 for start, stop in ev]
            times += new
            total += sum(new)
    return percentiles_ms(times)


def _set_named_weights(trt: Any, refitter: Any, weights: Mapping[str, np.ndarray], plan: Path,
                       logger: Any) -> list[np.ndarray]:
    """Give ``refitter`` every weight the engine can refit, by name (the ONNX parser names them after the ONNX
    initializers), from ``weights``; names the engine does not have (constants the builder folded) are ignored.

    Returns:
        The contiguous arrays handed to TensorRT, which must stay alive until ``refit_cuda_engine`` has copied them.

    Raises:
        DfmpcError: an engine weight is missing from ``weights`` or refused (wrong count or type).
    """
    names = list(refitter.get_all_weights())
    missing = [n for n in names if n not in weights]
    if missing:
        raise DfmpcError(f"refit of '{plan}': {len(missing)} of the engine's {len(names)} weights are not given (e.g. "
                         f"{', '.join(missing[:3])}); refit from the model the engine was built from")
    keep = []
    for name in names:
        arr = np.ascontiguousarray(weights[name])
        keep.append(arr)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise DfmpcError(f"refit of '{plan}': TensorRT refused weight '{name}' ({arr.dtype}, shape "
                             f"{list(arr.shape)}): {'; '.join(logger.errors[-2:]) or 'wrong count or type'}")
    return keep


class TrtRunner:
    """Runs a plan on the GPU with torch CUDA tensors as I/O buffers (context manager).

    Example::

        with TrtRunner("engine_w8a8.plan") as r:
            logits = r.infer(torch.randn(8, 3, 224, 224, device="cuda"))
            lat = r.latency_ms((1, 8, 32), input_shape=(3, 224, 224))

    Args:
        plan_path: the ``.plan`` file.
        refit_onnx: ONNX file (or its bytes) whose initializers refit the engine (required for a stripped plan;
            e.g. re-exported from a packed model).
        refit_weights: ``{initializer name: ndarray}`` refit instead of / after ``refit_onnx``: every weight the engine
            can refit must be given (e.g. :func:`dfmpc_deploy.packed.refit_weights_from_packed`, from a ``.dfmpc``).
        cuda_graph: replay timed launches from a CUDA graph.
    """

    def __init__(self, plan_path, refit_onnx=None, refit_weights: Mapping[str, np.ndarray] | None = None,
                 cuda_graph: bool = True):
        self.plan_path = Path(plan_path)
        self.refit_onnx, self.refit_weights, self.cuda_graph = refit_onnx, refit_weights, cuda_graph
        self.engine: Any = None
        self.context: Any = None
        self.stream: Any = None
        self.input_name = ""
        self.output_names: list[str] = []

    def __enter__(self) -> TrtRunner:
        require_cuda("running a TensorRT engine")
        import torch

        trt = backend()
        self._trt, self._torch = trt, torch
        self._logger = _logger(trt)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise DfmpcError(f"cannot load '{self.plan_path}' on this GPU: {'; '.join(self._logger.errors[-2:])}")
        if self.refit_onnx is not None or self.refit_weights:
            self._refit()
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.input_name = next(n for n in self._io() if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in self._io() if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        return self

    def __exit__(self, *exc) -> None:
        self.context = self.engine = None
        self.stream = None

    def _io(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _refit(self) -> None:
        trt = self._trt
        if not self.engine.refittable:
            raise DfmpcError(f"'{self.plan_path}' is not refittable (build it with strip_weights=True)")
        refitter = trt.Refitter(self.engine, self._logger)
        if self.refit_onnx is not None:
            prefit = trt.OnnxParserRefitter(refitter, self._logger)
            ok = (prefit.refit_from_bytes(bytes(self.refit_onnx)) if isinstance(self.refit_onnx, (bytes, bytearray))
                  else prefit.refit_from_file(str(self.refit_onnx)))
            if not ok:
                raise DfmpcError(f"refit of '{self.plan_path}' from the ONNX failed: {self._logger.errors[-1:]}")
        keep = _set_named_weights(trt, refitter, self.refit_weights, self.plan_path, self._logger) \
            if self.refit_weights else []
        if not refitter.refit_cuda_engine():
            raise DfmpcError(f"refit of '{self.plan_path}' failed; missing weights: {refitter.get_missing_weights()}")
        del keep  # the host arrays had to live until the refit copied them

    def _buffers(self, shape: tuple[int, ...]):
        torch, trt = self._torch, self._trt
        dt = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.context.set_input_shape(self.input_name, shape)
        x = torch.zeros(shape, dtype=dt[self.engine.get_tensor_dtype(self.input_name)], device="cuda")
        outs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), device="cuda",
                               dtype=dt[self.engine.get_tensor_dtype(n)]) for n in self.output_names}
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        for n, t in outs.items():
            self.context.set_tensor_address(n, t.data_ptr())
        return x, outs

    def infer(self, x):
        """Run one batch; ``x`` is a (N, C, H, W) tensor (moved to the GPU); returns the first output (GPU tensor)."""
        xin, outs = self._buffers(tuple(x.shape))
        xin.copy_(x)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DfmpcError(f"TensorRT execution failed: {self._logger.errors[-1:]}")
        self.stream.synchronize()
        return outs[self.output_names[0]].clone()

    def latency_ms(self, batch_sizes, input_shape: tuple[int, int, int], **timing) -> dict:
        """trtexec-style GPU latency per batch size: ``{str(batch): {"p50", "p90", "p99", "mean", "iters"}}``."""
        torch = self._torch
        res = {}
        for bs in batch_sizes:
            self._buffers((bs, *input_shape))
            enqueue = lambda: self.context.execute_async_v3(self.stream.cuda_stream)  # noqa: E731
            enqueue()  # once before capture, so initialisation/JIT is not captured
            self.stream.synchronize()
            launch = enqueue
            capturable = getattr(self.context, "is_stream_capturable", lambda s: True)(self.stream.cuda_stream)
            if self.cuda_graph and not capturable:
                log.warning("TrtRunner: the stream is not capturable for this engine; timing without a CUDA graph")
            if self.cuda_graph and capturable:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    enqueue()
                launch = graph.replay
            res[str(bs)] = cuda_latency_ms(launch, self.stream, **timing)
        return res
