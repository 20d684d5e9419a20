"""The `build` pipeline: load -> recipe of passes -> pack -> export/targets -> report, into one output directory.

Everything is written into a hidden sibling directory first and renamed onto ``--out`` at the end, so an
interrupted or failed build never leaves a half-written output directory (:class:`~dfmpc_deploy.io.outdir.OutputDir`:
checks and locks ``--out`` before any work).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from . import report as R
from .core.config import InputSpec, normalization_problem
from .core.graph import GraphAnalysis
from .core.options import float32_problem, int_in, option, options_of, positive_int, split_values
from .deploy.targets import run_targets
from .errors import DfmpcError, UsageError
from .io.container import fp32_nbytes, save_packed
from .io.outdir import OutputDir
from .passes import base
from .passes.base import json_value
from .passes.recipes import RECIPES, get_recipe
from .report import write_report
from .report.model import BuildSettings, Sha256
from .zoo import models
from .zoo.data import DataSpec, load_dataset, parse_data_spec
from .zoo.evaluate import accuracy
from .zoo.images import BACKWARD_FACTOR, FORWARD_FACTOR, check_flag_memory

if TYPE_CHECKING:
    from .report import Report

__all__ = ["BuildConfig", "run_build", "TARGET_CHOICES", "DEVICE_CHOICES", "resolve_device", "parse_targets",
           "parse_batch_sizes", "relative_paths", "build_settings", "NOT_REPLAYED"]

log = logging.getLogger("dfmpc_deploy")

TARGET_CHOICES = ("torch", "onnx", "ort", "trt", "torch-cuda")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in split_values(text, "R,G,B"))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise UsageError(f"'{text}' is not three comma-separated numbers, e.g. 0.485,0.456,0.406")
    for v in vals:
        why = float32_problem(v)
        if why:
            raise UsageError(f"'{text}': {v!r} {why}")
    return vals


def _std3(text: str) -> tuple[float, float, float]:
    vals = _floats3(text)
    if not all(v > 0 for v in vals):
        raise UsageError(f"--std '{text}': every standard deviation must be > 0, e.g. 0.229,0.224,0.225")
    return vals


@dataclass(frozen=True)
class BuildConfig:
    """Options of one build; every field with a flag is a ``build`` option (the CLI is generated from them).

    ``settings`` holds the pass settings the user gave (field name -> value, see dfmpc_deploy.passes); the recipe
    named by ``method`` decides which passes read them. ``module`` (Python API only) builds your own ``nn.Module``
    instead of a named model (``model`` then only names it; ``input_shape``, ``mean`` and ``std`` are required).
    """

    model: str
    weights: str = option("pretrained", flag="--weights", metavar="pretrained|random|FILE",
                          help="'pretrained' (download), 'random' (seeded, for size/latency/export only) or a local "
                               ".pth/.th/.safetensors state dict")
    weights_format: str = option("auto", flag="--weights-format",
                                 choices=("auto", "pytorchcv", "torchvision", "torchvision-quantized", "native"),
                                 help="layout of a --weights file: detected from its keys (auto), or pytorchcv, "
                                      "torchvision, torchvision-quantized (torchvision's quantizable models: ReLU "
                                      "instead of ReLU6) or native")
    method: str = option("dfmpc", flag="--method", metavar="METHOD",
                         help="recipe of compensation passes (listed above; default dfmpc)")
    data: Any = option(None, flag="--data", metavar="KIND:DIR",
                       help="evaluation data: imagefolder:DIR, imagenet:DIR (DIR/labels.txt with '<file> <index>' "
                            "lines), cifar10:DIR or cifar100:DIR")
    limit: int | None = option(None, flag="--limit", parse=positive_int, metavar="N",
                               help="evaluate on N evenly spaced images")
    mean: tuple[float, float, float] | None = option(None, flag="--mean", parse=_floats3, metavar="R,G,B",
                                                     help="override input normalisation mean, e.g. 0.485,0.456,0.406")
    std: tuple[float, float, float] | None = option(None, flag="--std", parse=_std3, metavar="R,G,B",
                                                    help="override input normalisation std (each > 0)")
    targets: tuple[str, ...] = option(("torch",), flag="--target", nargs="+", metavar="TARGET",
                                      help=f"artifacts to produce/time, from {', '.join(TARGET_CHOICES)} "
                                           f"(several: 'onnx ort' or 'onnx,ort'; torch = the fake-quant model only)")
    batch_sizes: tuple[int, ...] = option((1, 8, 32), flag="--batch-sizes", nargs="+", metavar="N",
                                          help="batch sizes for latency ('1 8 32' or '1,8,32')")
    pack: bool = option(True, flag="--no-pack", action="store_false", help="skip writing model.dfmpc")
    compress: bool = option(False, flag="--compress", action="store_true",
                            help="Huffman-code the integer codes in model.dfmpc (trained weights: ~0.8x the dense "
                                 "file)")
    out: Path = option(Path("out"), flag="--out", parse=Path, metavar="DIR",
                       help="output directory (refused if it exists and is not empty, unless --force)")
    force: bool = option(False, flag="--force", action="store_true", help="replace an existing --out directory")
    unsafe_pickle: bool = option(False, flag="--unsafe-pickle", action="store_true",
                                 help="allow full unpickling of a --weights file you trust (default: tensors only)")
    seed: int = option(0, flag="--seed", parse=int_in(0, 2 ** 63 - 1), metavar="N",
                       help="seed for everything random (synthesis, random weights)")
    threads: int | None = option(None, flag="--threads", parse=int_in(1, 4096), metavar="N",
                                 help="CPU threads for torch and ONNX Runtime (default: what torch picks); keeps a "
                                      "build on a busy machine from oversubscribing it")
    device: str = option("auto", flag="--device", metavar="auto|cpu|cuda",
                         help="where synthesis, rounding and statistics run (auto = CUDA when available)")
    settings: Mapping[str, Any] = field(default_factory=dict)
    module: Any = field(default=None, compare=False, repr=False)
    input_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.module is None:
            models.get_spec(self.model)  # an unknown name fails before anything is created
        elif self.input_shape is None or self.mean is None or self.std is None:
            raise UsageError(f"building your own module '{self.model}' needs input_shape=(C, H, W) and the mean and "
                             f"std of its input normalisation (they are recorded in model.dfmpc)")
        if self.module is None and (self.mean is not None or self.std is not None):
            spec = models.get_spec(self.model)
            why = normalization_problem(self.mean or spec.mean, self.std or spec.std)
            if why:
                raise UsageError(f"bad --mean/--std: {why}")
        if self.method not in RECIPES:
            raise UsageError(f"bad --method '{self.method}': choose one of {', '.join(RECIPES)}")
        object.__setattr__(self, "targets", parse_targets(self.targets, TARGET_CHOICES))
        object.__setattr__(self, "batch_sizes", parse_batch_sizes(self.batch_sizes))
        if self.compress and not self.pack:
            raise UsageError("--compress compresses model.dfmpc, which --no-pack does not write: drop one of them")
        self._check_memory()
        if self.device not in DEVICE_CHOICES:
            raise UsageError(f"bad --device '{self.device}': choose one of {', '.join(DEVICE_CHOICES)}")
        if self.data is not None and not isinstance(self.data, DataSpec):
            object.__setattr__(self, "data", parse_data_spec(str(self.data)))
        object.__setattr__(self, "out", Path(self.out))


    def _check_memory(self) -> None:
        """The largest --batch-sizes and --synth-samples must fit in memory (one line now, not the allocator's
        traceback later)."""

        if self.module is not None:
            shape = tuple(self.input_shape or (3, 224, 224))
        else:
            size = models.get_spec(self.model).input_size
            shape = (3, size, size)
        check_flag_memory("--batch-sizes", max(self.batch_sizes), shape, FORWARD_FACTOR)
        samples = self.settings.get("synth_samples") if isinstance(self.settings, Mapping) else None
        if isinstance(samples, int):
            check_flag_memory("--synth-samples", samples, shape, BACKWARD_FACTOR)


def parse_targets(values, choices: tuple[str, ...]) -> tuple[str, ...]:
    """``--target`` values (``onnx ort`` or ``onnx,ort``), each in ``choices``, duplicates dropped.

    Raises:
        UsageError: a value not in ``choices``.
    """
    targets = tuple(dict.fromkeys(split_values(values, "--target")))
    bad = [t for t in targets if t not in choices]
    if bad:
        raise UsageError(f"bad --target {', '.join(bad)}: choose from {', '.join(choices)}")
    return targets


def parse_batch_sizes(values) -> tuple[int, ...]:
    """``--batch-sizes`` values (``1 8 32`` or ``1,8,32``), each 1..65536, duplicates dropped.

    Raises:
        UsageError: an empty list or a value that is not such an integer.
    """
    try:
        sizes = tuple(int(v) for v in split_values([str(b) for b in values], "--batch-sizes"))
    except ValueError:
        sizes = ()
    if not sizes or not all(1 <= b <= 65536 for b in sizes):
        raise UsageError(f"bad --batch-sizes {' '.join(map(str, values))}: give positive integers, e.g. 1 8 32 or "
                         f"1,8,32")
    return tuple(dict.fromkeys(sizes))


def resolve_device(name: str):
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a one-line error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DfmpcError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    return torch.device(name)


def run_build(cfg: BuildConfig, progress=None, warn=None) -> Report:
    """Run the whole pipeline; returns the typed report (also written as ``cfg.out/report.{json,md,html}``).

    ``warn(message)`` receives one line per user setting the chosen recipe replaces or does not use (default: the
    ``dfmpc_deploy`` logger at WARNING); the report's ``notes`` list them too.
    """
    import torch

    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    try:
        with OutputDir(cfg.out, force=cfg.force) as tmp:
            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            rep = _run(cfg, tmp, progress, warn or (lambda m: log.warning("warning: %s", m)), device)
            write_report(tmp, rep)
        return rep
    finally:
        torch.set_num_threads(threads_before)


def relative_paths(obj, tmp: Path):
    """Artifact paths in the report are relative to --out (they were written into the temp directory)."""
    if isinstance(obj, dict):
        return {k: relative_paths(v, tmp) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_paths(v, tmp) for v in obj]
    if isinstance(obj, (str, Path)) and str(obj).startswith(str(tmp)):
        return str(Path(obj).relative_to(tmp))
    return obj


def _task(progress, label):
    return progress.task(label) if progress is not None else None


def _stage(timings: dict, name: str, t0: float) -> None:
    timings[name] = round(time.perf_counter() - t0, 3)


def _run(cfg: BuildConfig, tmp: Path, progress, warn, device) -> Report:
    import torch

    timings: dict[str, float] = {}
    t = time.perf_counter()
    if cfg.module is not None:
        lm = models.model_from_module(cfg.module, cfg.model, cfg.input_shape, cfg.mean, cfg.std)  # type: ignore[arg-type]
    else:
        lm = models.load_model(cfg.model, cfg.weights, seed=cfg.seed, unsafe_pickle=cfg.unsafe_pickle,
                               weights_format=cfg.weights_format)
    spec = lm.spec
    graph = GraphAnalysis.of(lm.module)
    _stage(timings, "load", t)
    input_shape = cfg.input_shape or (3, spec.input_size, spec.input_size)
    mean, std = cfg.mean or spec.mean, cfg.std or spec.std
    if cfg.data is not None and input_shape[1:] != (spec.input_size, spec.input_size):
        raise DfmpcError(f"--data needs square inputs (images are centre-cropped); {cfg.model} takes "
                         f"{'x'.join(map(str, input_shape))}")

    recipe = get_recipe(cfg.method)
    data = None
    if cfg.data is not None:
        t = time.perf_counter()
        data = load_dataset(cfg.data, spec.input_size, spec.resize, mean, std, cfg.limit,
                            progress=_task(progress, "load data"), num_classes=spec.num_classes)
        _stage(timings, "load_data", t)
    real = None
    if cfg.settings.get("recal") == "real" and "recal" in recipe.fields():
        if data is None:
            raise DfmpcError("--recal real (a labelled real-data reference) needs --data")
        real = data.images[torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[:200]]

    t = time.perf_counter()
    mp = base.run_recipe(recipe, lm.module, input_shape, cfg.settings, arch=lm.arch, real_inputs=real,
                    progress=progress, device=device, seed=cfg.seed, graph=graph)
    _stage(timings, "compensate", t)
    mp.input = InputSpec(tuple(input_shape), tuple(mean), tuple(std), spec.resize)  # type: ignore[arg-type]
    run = mp.config
    for msg in run.overrides:
        warn(msg)
    log.info("compensated %s in %.2f s (%s)", cfg.model, timings["compensate"], mp.estimator)

    notes = list(lm.extra.get("notes", [])) + [f"--method {cfg.method}: {msg}" for msg in run.overrides]
    if lm.weights == "random":
        notes.append("Built with seeded RANDOM weights: sizes, latency and export are real, accuracy is not.")
    if run.bn_status != "real":
        notes.append(f"The model's BN layers carry no statistics ({run.bn_status}): nothing was synthesised, the "
                     f"passes that need statistics fell back (see recipe.passes).")

    acc = None
    if data is not None:
        t = time.perf_counter()
        g = graph.graph  # the model's one trace serves every evaluation copy
        results = {"fp32": accuracy(lm.module, data, progress=_task(progress, "eval fp32"), graph=g)}
        if cfg.method == "rtn":
            results["quantized_uncompensated"] = accuracy(mp.module, data, progress=_task(progress, "eval rtn"),
                                                          graph=g)
        else:
            rtn = base.run_recipe(get_recipe("rtn"), lm.module, input_shape,
                                  {k: v for k, v in cfg.settings.items() if k in ("bits", "per_channel", "grid")},
                                  arch=lm.arch, graph=graph)
            results["quantized_uncompensated"] = accuracy(rtn.module, data, graph=g,
                                                          progress=_task(progress, "eval uncompensated"))
            results[cfg.method] = accuracy(mp.module, data, progress=_task(progress, f"eval {cfg.method}"), graph=g)
        _stage(timings, "evaluate", t)
        acc = (data.name, len(data.labels), results)

    pack_info = None
    if cfg.pack:
        t = time.perf_counter()
        pack_info = save_packed(mp, tmp / "model.dfmpc", compress=cfg.compress)
        _stage(timings, "pack", t)

    frag: dict[str, Any] = {}
    wanted = [x for x in cfg.targets if x != "torch"]
    if wanted:
        t = time.perf_counter()
        known = {}
        if acc is not None:
            known = {"torch_fp32": acc[2]["fp32"],
                     "torch_fakequant": acc[2][cfg.method if cfg.method != "rtn" else "quantized_uncompensated"]}
        frag = run_targets(mp, lm.module, input_shape, wanted, tmp, dataset=data, batch_sizes=cfg.batch_sizes,
                           progress=progress, threads=cfg.threads, known_accuracy=known)
        frag = relative_paths(frag, tmp)
        notes += frag.get("notes", [])
        _stage(timings, "targets", t)
    return _report(cfg, lm, mp, input_shape, mean, std, device, timings, notes, acc, fp32_nbytes(lm.module),
                   pack_info, frag, tuple(wanted))


#: build options a replay does not take from the report (where to write, and whether to replace it)
NOT_REPLAYED = ("out", "force")


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v.resolve())
    if isinstance(v, DataSpec):
        return f"{v.kind}:{v.path.resolve()}"
    return json_value(v)


def build_settings(cfg: BuildConfig, sha256: str | None) -> BuildSettings:
    """The report's ``build`` section: every option as the build ran with it (paths absolute) and the weights
    file's checksum (``sha256``, None when the weights are not a file)."""
    options = {f.name: _plain(getattr(cfg, f.name)) for f in options_of(BuildConfig) if f.name not in NOT_REPLAYED}
    path = str(Path(cfg.weights).resolve()) if sha256 is not None else None
    return BuildSettings(options=options, settings={k: json_value(v) for k, v in cfg.settings.items()},
                         weights_path=path, weights_sha256=None if sha256 is None else Sha256(sha256),
                         version=__version__)


def _report(cfg: BuildConfig, lm, mp, input_shape, mean, std, device, timings, notes, acc, fp32: int,
            pack_info: dict | None, frag: dict, targets: tuple[str, ...]) -> Report:
    """The typed report of the build (dfmpc_deploy.report): model, recipe as it ran, sizes, accuracy, latency."""
    import torch

    run = mp.config
    recipe = get_recipe(run.recipe)
    rows = R.layer_rows(mp)
    quant = run.record("quantize")
    widths = sorted({q.bits for q in mp.layers.values()})
    low, high = (quant.config["bits"].split("/") if quant else (widths[0], widths[-1]))
    alloc = run.record("allocate")
    mixed = alloc is not None and "bits_histogram" in alloc.info
    calib = run.record("calibrate")
    synthesis = None
    if calib is not None and calib.info.get("source") == "synthetic":
        synthesis = R.Synthesis(**{k: calib.info[k] for k in ("samples", "steps_run", "steps_max", "resolution",
                                                              "stopped_early", "loss_initial", "loss_final")},
                                seconds=calib.seconds)
    accuracy = None
    if acc is not None:
        name, n, results = acc
        results = {**results, **frag.get("accuracy", {})}
        accuracy = R.Accuracy(dataset=name, n=n, results={k: R.TopK.from_dict(v) for k, v in results.items()})
    frag_sizes = frag.get("size_bytes", {})
    sizes = R.Sizes(fp32=fp32, packed=R.PackedSize.from_size_report(pack_info) if pack_info else None,
                    onnx={k[5:]: v for k, v in frag_sizes.items() if k.startswith("onnx_")},
                    engine=frag_sizes.get("engine"))
    target_sections = {k: R.Report.section_from_dict(k, frag[k])
                       for k in ("latency_ms", "speedup", "threads", "parity", "engine", "artifacts") if k in frag}
    return R.Report(
        model=cfg.model,
        weights=lm.weights if lm.weights in ("random", "pretrained") else str(lm.weights),
        build=build_settings(cfg, lm.extra.get("sha256")),
        method=cfg.method,
        bits=R.Bits.from_rows(rows, low=int(low), high=int(high), mixed=mixed,
                              grid=quant.config.get("grid") if quant else None),
        recipe=R.Recipe(name=recipe.name, description=recipe.description, data_used=recipe.data_used,
                        fine_tuning=recipe.fine_tuning,
                        passes=tuple(R.PassRecord(name=p.name, config=p.config, seconds=p.seconds, info=p.info)
                                     for p in run.passes)),
        runtime=R.Runtime(threads=torch.get_num_threads(), device=device.type, torch=torch.__version__),
        statistics=R.Statistics(bn=run.bn_status, estimator=mp.estimator, synthesis=synthesis),
        pairs=tuple(R.Pair.from_link(p) for p in mp.analysis().pairs),
        input_shape=tuple(input_shape),
        preprocessing=R.Preprocessing(mean=tuple(mean), std=tuple(std), resize=lm.spec.resize),
        targets=targets,
        accuracy=accuracy,
        allocation=R.Allocation(**alloc.info, seconds=alloc.seconds) if mixed else None,
        packed_file="model.dfmpc" if pack_info else None,
        packing=R.Packing.from_size_report(pack_info) if pack_info else None,
        size_bytes=sizes,
        timings_s=timings,
        layers=tuple(rows),
        notes=tuple(notes),
        **target_sections,
    )
