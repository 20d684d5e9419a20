"""Deploy from a packed ``.dfmpc`` file alone: ``export`` (every ONNX variant, ONNX Runtime latency, TensorRT engines,
parity) and ``eval`` (top-1 / top-5), with nothing but the file: no FP weights, no compensation, no download.

* The architecture is rebuilt from the name the file records, with the model registry's constructor and *no*
  pretrained weights (``load_packed``: nothing is downloaded), or is the module the caller passes (your own
  ``nn.Module``).
* The input shape and normalisation come from the file (format 3 records them); for a format-2 file of a registered
  architecture, from the registry (a note says so: a build with ``--mean``/``--std`` overrides is then not known).
* The w8a8 activation ranges come from the BN statistics in the file, with the input range from the recorded
  normalisation, as ``build`` computes them; the ONNX files equal ``build``'s byte for byte (tests/test_packed.py).
* Parity is measured against the packed model's own outputs (the file loaded in PyTorch).
* Weight-stripped engines: where the TensorRT build supports them (``STRIP_PLAN``; TensorRT-RTX 1.7.1 needs a GPU
  for it), ``engine_wdq.plan`` is built weight-stripped; on a machine with a GPU it is then refit from the
  ``.dfmpc`` codes (:func:`refit_weights_from_packed`, one ``trt.Refitter`` call per engine weight) and checked
  against the packed model (``parity.trt_wdq_refit_dfmpc``).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from ._deps import require
from .build import TARGET_CHOICES, parse_batch_sizes, parse_targets, relative_paths
from .build import BuildConfig as _Build
from .core.config import InputSpec
from .core.options import option, option_like
from .core.progress import Progress
from .core.state import MixedPrecisionModel
from .deploy.onnx_export import onnx_from_mp
from .deploy.targets import TARGETS, run_targets
from .deploy.trt import TrtRunner
from .errors import DfmpcError, UsageError
from .io.container import load_packed, packed_size_report
from .io.outdir import OutputDir
from .report.export import ExportReport, write_export_report
from .report.measurements import Accuracy, PackedSize, Sizes, TopK
from .report.model import Preprocessing, Sha256
from .zoo.data import Dataset, DataSpec, load_dataset, parse_data_spec
from .zoo.evaluate import accuracy
from .zoo.models import REGISTRY, file_sha256

__all__ = ["ExportConfig", "EvalConfig", "EVAL_ENGINES", "run_export", "run_eval", "resolve_input",
           "refit_weights_from_packed", "refit_check"]

log = logging.getLogger("dfmpc_deploy")

#: ``eval --engine`` choices: PyTorch, or ONNX Runtime on the model exported in memory (zoo.evaluate)
EVAL_ENGINES = ("torch", "ort")
_EXPORT_TARGETS = tuple(t for t in TARGET_CHOICES if t in TARGETS)  # torch is not an export target


def _data(value: Any) -> DataSpec | None:
    return value if value is None or isinstance(value, DataSpec) else parse_data_spec(str(value))


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``dfmpc-deploy export`` (the CLI is generated from the fields with a flag).

    The flags shared with ``build`` are declared by :class:`~dfmpc_deploy.build.BuildConfig`'s fields
    (:func:`~dfmpc_deploy.core.options.option_like`), so they have the same spelling, help and defaults.
    """

    file: Path
    targets: tuple[str, ...] = option_like(
        _Build, "targets", default=("onnx",),
        help=f"what to make from the file, from {', '.join(_EXPORT_TARGETS)} (several: 'onnx ort trt' or "
             f"'onnx,ort,trt'; ort and trt export the ONNX files too)")
    batch_sizes: tuple[int, ...] = option_like(_Build, "batch_sizes")
    data: Any = option_like(_Build, "data", help="images for the parity inputs and the top-1 of every variant "
                                                 "(imagefolder:DIR, imagenet:DIR, cifar10:DIR or cifar100:DIR)")
    limit: int | None = option_like(_Build, "limit")
    out: Path = option_like(_Build, "out")
    force: bool = option_like(_Build, "force")
    threads: int | None = option_like(_Build, "threads")
    strip_weights: bool = option(True, flag="--no-strip-weights", action="store_false",
                                 help="build engine_wdq.plan as a full plan (default: weight-stripped where the "
                                      "TensorRT build supports it, refit from the .dfmpc on a GPU)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "file", Path(self.file))
        object.__setattr__(self, "targets", parse_targets(self.targets, _EXPORT_TARGETS))
        object.__setattr__(self, "batch_sizes", parse_batch_sizes(self.batch_sizes))
        object.__setattr__(self, "data", _data(self.data))
        object.__setattr__(self, "out", Path(self.out))


@dataclass(frozen=True)
class EvalConfig:
    """Options of ``dfmpc-deploy eval``: top-1 / top-5 of a packed file on labelled images (``data``: ``KIND:DIR``, or
    from Python a :class:`~dfmpc_deploy.zoo.data.Dataset` already normalised)."""

    file: Path
    data: Any = option_like(_Build, "data",
                            help="labelled images: imagefolder:DIR, imagenet:DIR (DIR/labels.txt), cifar10:DIR or "
                                 "cifar100:DIR (required)")
    limit: int | None = option_like(_Build, "limit")
    engine: str = option("torch", flag="--engine", choices=EVAL_ENGINES,
                         help="torch (PyTorch, the packed model itself) or ort (ONNX Runtime on the same model "
                              "exported in memory; needs onnxruntime)")
    threads: int | None = option_like(_Build, "threads")

    def __post_init__(self) -> None:
        object.__setattr__(self, "file", Path(self.file))
        if self.data is None:
            raise UsageError("eval needs --data KIND:DIR (imagefolder:DIR, imagenet:DIR, cifar10:DIR or cifar100:DIR)")
        if not isinstance(self.data, Dataset):  # a Dataset: images the caller normalised (Python API)
            object.__setattr__(self, "data", _data(self.data))
        if self.engine not in EVAL_ENGINES:
            raise UsageError(f"bad --engine '{self.engine}': choose one of {', '.join(EVAL_ENGINES)}")


# ---------------------------------------------------------------------------------------------------- input

def resolve_input(mp: MixedPrecisionModel, given: InputSpec | None = None) -> tuple[InputSpec, str, list[str]]:
    """The input shape and normalisation of a loaded packed model, where they came from, and notes.

    Args:
        mp: the model from :func:`~dfmpc_deploy.io.container.load_packed`.
        given: the caller's (Python API), which wins.

    Returns:
        ``(spec, source, notes)`` with ``source`` ``caller``, ``file`` or ``registry``.

    Raises:
        DfmpcError: the file records none and its architecture is not in the registry.
    """
    if given is not None:
        return given, "caller", []
    if mp.input is not None:
        return mp.input, "file", []
    spec = REGISTRY.get(mp.arch)
    source = mp.info.get("packed_file", "the file")
    if spec is None:
        raise DfmpcError(f"{source} records no input shape and normalisation (format {mp.info.get('format_version')}"
                         f", architecture '{mp.arch}' is not a registered model): re-pack it with this dfmpc-deploy, "
                         f"or pass input=InputSpec(...) from Python")
    note = (f"{source} is a format-{mp.info.get('format_version')} file without an input record: input "
            f"{spec.input_size}x{spec.input_size} and normalisation taken from the model registry for {mp.arch} (a "
            f"build with --mean/--std overrides used others)")
    return InputSpec((3, spec.input_size, spec.input_size), spec.mean, spec.std, spec.resize), "registry", [note]


@torch.no_grad()
def _classes(mp: MixedPrecisionModel, spec: InputSpec) -> int:
    out = mp.module.eval()(torch.zeros((1, *spec.shape)))
    return int(out.shape[1])


def _dataset(data: DataSpec, mp: MixedPrecisionModel, spec: InputSpec, limit: int | None, progress) -> Dataset:
    if spec.shape[1] != spec.shape[2]:
        raise DfmpcError(f"--data needs square inputs (images are centre-cropped); the model takes "
                         f"{'x'.join(map(str, spec.shape))}")
    task = progress.task("load data") if progress is not None else None
    return load_dataset(data, spec.shape[1], spec.resize, spec.mean, spec.std, limit, progress=task,
                        num_classes=_classes(mp, spec))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch uses ``n`` threads inside (when given), its previous count after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------- export

def run_export(cfg: ExportConfig, progress: Progress | None = None, *, model: nn.Module | None = None,
               input: InputSpec | None = None) -> ExportReport:
    """Make every requested artifact from the packed file ``cfg.file`` into ``cfg.out`` (locked, written through a
    temporary sibling and renamed at the end, as ``build`` does) with ``report.json``.

    Args:
        cfg: the options.
        progress: a :class:`~dfmpc_deploy.core.progress.Progress` (default: silent).
        model: the architecture, for a file packed from your own module (default: rebuilt from the recorded name).
        input: the input shape and normalisation, when the file records none (default: the file's).

    Returns:
        The typed report (also ``cfg.out/report.json``).

    Raises:
        BadFileError: the file is not a valid packed model. DfmpcError: no input record for an unregistered
        architecture, a bad ``--out``, or a target that cannot run here (``torch-cuda`` without a GPU).
    """
    with _threads(cfg.threads), OutputDir(cfg.out, force=cfg.force) as tmp:
        rep = _export(cfg, Path(tmp), progress, model, input)
        write_export_report(tmp, rep)
    return rep


def _export(cfg: ExportConfig, tmp: Path, progress, model, given) -> ExportReport:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    mp = load_packed(cfg.file, model=model)
    spec, source, notes = resolve_input(mp, given)
    timings["load"] = round(time.perf_counter() - t, 3)
    data = None
    if cfg.data is not None:
        t = time.perf_counter()
        data = _dataset(cfg.data, mp, spec, cfg.limit, progress)
        timings["load_data"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    frag = run_targets(mp, None, spec.shape, cfg.targets, tmp, dataset=data, batch_sizes=cfg.batch_sizes,
                       progress=progress, threads=cfg.threads, strip_weights=cfg.strip_weights)
    stripped = [b for b in (frag["engine"].get("builds", {}).values() if isinstance(frag["engine"], dict) else ())
                if b["stripped"]]
    if stripped and torch.cuda.is_available():
        x = data.images[:64] if data is not None else torch.randn((8, *spec.shape),
                                                                  generator=torch.Generator().manual_seed(0))
        for b in stripped:
            frag["parity"][f"trt_{Path(b['path']).stem.removeprefix('engine_')}_refit_dfmpc"] = \
                refit_check(b["path"], mp, spec.shape, x)
    timings["targets"] = round(time.perf_counter() - t, 3)
    frag = relative_paths(frag, tmp)
    return _export_report(cfg, mp, spec, source, notes + frag["notes"], frag, data, timings)


def _export_report(cfg: ExportConfig, mp: MixedPrecisionModel, spec: InputSpec, source: str, notes: list[str],
                   frag: dict, data: Dataset | None, timings: dict[str, float]) -> ExportReport:
    sizes = packed_size_report(None, cfg.file)
    frag_sizes = frag["size_bytes"]
    acc = None
    if data is not None and frag["accuracy"]:
        acc = Accuracy(dataset=data.name, n=len(data.labels),
                       results={k: TopK.from_dict(v) for k, v in frag["accuracy"].items()})
    sections = {k: ExportReport.section_from_dict(k, frag[k]) for k in ("latency_ms", "speedup", "threads", "engine")
                if frag[k]}
    return ExportReport(
        packed_file=str(cfg.file.resolve()), packed_sha256=Sha256(file_sha256(cfg.file)),
        packed_format_version=mp.info["format_version"], arch=mp.arch, estimator=mp.estimator,
        input_shape=spec.shape, preprocessing=Preprocessing(mean=spec.mean, std=spec.std, resize=spec.resize),
        input_source=source, targets=cfg.targets,  # type: ignore[arg-type]
        size_bytes=Sizes(fp32=sizes["fp32"], packed=PackedSize.from_size_report(sizes),
                         onnx={k[5:]: v for k, v in frag_sizes.items() if k.startswith("onnx_")},
                         engine=frag_sizes.get("engine")),
        accuracy=acc, parity=ExportReport.section_from_dict("parity", frag["parity"]),
        artifacts=frag["artifacts"], timings_s=timings, notes=tuple(dict.fromkeys(notes)), version=__version__,
        **sections)


# ---------------------------------------------------------------------------------------------------- refit

def refit_weights_from_packed(mp: MixedPrecisionModel, input_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The weights of ``model_wdq.onnx`` (hence of ``engine_wdq.plan``) computed from a packed model's codes.

    The ONNX parser names each engine weight after its ONNX initializer, so this ``{initializer name: array}`` is
    what a weight-stripped engine built from the wdq file needs for its refit; it is derived in memory from the
    ``.dfmpc`` (the INT8 codes, the per-channel scales with BN folded, the biases), exactly as the file is written.

    Args:
        mp: the model from :func:`~dfmpc_deploy.io.container.load_packed`.
        input_shape: (C, H, W), as the engine was exported.
    """
    onnx = require("onnx", "onnx")
    model, _ = onnx_from_mp(mp, input_shape, "wdq")
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@torch.no_grad()
def refit_check(plan_path, mp: MixedPrecisionModel, input_shape: tuple[int, int, int], x: torch.Tensor) -> dict:
    """Load a weight-stripped plan on the GPU, refit it from the packed model's codes and compare its outputs with
    the packed model's on ``x`` (N, C, H, W).

    Returns:
        ``{"max_abs_diff", "max_abs_ref", "top1_agreement", "n", "ok"}`` (``ok``: within the wdq tolerance of
        ``run_targets``, 1e-2 relative to the logit range with FP16 kernels allowed).

    Raises:
        DfmpcError: no CUDA device, the plan cannot be loaded or refit (missing weights named).
    """
    with TrtRunner(plan_path, refit_weights=refit_weights_from_packed(mp, input_shape)) as runner:
        y = runner.infer(x.cuda()).float().cpu()
    ref = mp.module.eval()(x).float()
    diff, peak = float((y - ref).abs().max()), float(ref.abs().max())
    return {"max_abs_diff": diff, "max_abs_ref": peak, "top1_agreement": float((y.argmax(1) == ref.argmax(1)).float()
                                                                               .mean()),
            "n": len(x), "ok": diff <= 1e-2 * peak + 1e-2}


# ---------------------------------------------------------------------------------------------------- eval

def run_eval(cfg: EvalConfig, progress: Progress | None = None, *, model: nn.Module | None = None,
             input: InputSpec | None = None) -> dict:
    """Top-1 / top-5 of the packed file ``cfg.file`` on ``cfg.data``, normalised as the file records.

    Args:
        cfg: the options.
        progress: optional display.
        model: the architecture of a file packed from your own module.
        input: input shape and normalisation when the file records none.

    Returns:
        ``{"top1": float, "top5": float, "n": int}`` (percent).

    Raises:
        BadFileError / DfmpcError: a bad file or data (one line). MissingDependencyError: ``--engine ort`` without
        onnxruntime.
    """
    if cfg.engine == "ort":
        require("onnxruntime", "ort")
        require("onnx", "onnx")
    with _threads(cfg.threads):
        mp = load_packed(cfg.file, model=model)
        spec, _, notes = resolve_input(mp, input)
        for note in notes:
            log.warning("note: %s", note)
        data = cfg.data if isinstance(cfg.data, Dataset) else _dataset(cfg.data, mp, spec, cfg.limit, progress)
        task = progress.task(f"eval ({cfg.engine})") if progress is not None else None
        return accuracy(mp.module, data, progress=task, engine=cfg.engine)


def top_line(result: Mapping[str, Any], cfg: EvalConfig) -> str:
    """One line for the terminal."""
    return (f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['n']} images of {cfg.data} "
            f"({cfg.file}, engine {cfg.engine})")
