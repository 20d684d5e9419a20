"""The Python API: every stage of the command line, for a model name or your own ``nn.Module``, with the CLI's
defaults (each function builds the same config dataclass the CLI builds, so a default lives in one place).

* ``build(model, out=..., **options)`` -> Report: ``dfmpc-deploy build`` (compensate, pack, export, evaluate, report)
* ``compensate(model, input_shape, method, **settings)`` -> MixedPrecisionModel: the recipe of passes alone
* ``pack(mp, path, input_shape=, mean=, std=)`` -> dict: write the ``.dfmpc`` file with its input record
* ``export(packed, out=..., model=, **options)`` -> ExportReport: ``dfmpc-deploy export``
* ``evaluate(packed, data, model=, **options)`` -> ``{"top1", "top5", "n"}``: ``dfmpc-deploy eval``
* ``replay(report, out=...)`` -> Report: ``dfmpc-deploy build --from-report``

Example (your own module; README, "Python API", runs the full version)::

    net = SmallCNN().eval()                      # trained, BatchNorm statistics included
    report = build(net, input_shape=(3, 32, 32), mean=MEAN, std=STD, out="out", targets=("onnx",))
    top = evaluate("out/model.dfmpc", "imagefolder:test", model=SmallCNN())
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .build import BuildConfig, run_build
from .core.config import InputSpec
from .core.progress import Progress
from .core.state import MixedPrecisionModel
from .errors import UsageError
from .io.container import save_packed
from .packed import EvalConfig, ExportConfig, run_eval, run_export
from .passes.recipes import compensate
from .replay import replay
from .report.export import ExportReport
from .report.model import Report
from .zoo.data import Dataset

__all__ = ["build", "compensate", "pack", "export", "evaluate", "replay", "InputSpec"]

_BUILD_FIELDS = {f.name for f in dataclasses.fields(BuildConfig)} - {"model", "module", "settings"}


def build(model: str | nn.Module, *, name: str | None = None, progress: bool = False, **options: Any) -> Report:
    """Run the whole ``build`` pipeline on a model name or your own module; same options and defaults as the CLI.

    Args:
        model: a registered name (``dfmpc-deploy models``) or an FP32 ``nn.Module`` with its trained weights.
        name: the name recorded for a module (default: its class name).
        progress: show progress on a terminal.
        **options: :class:`~dfmpc_deploy.build.BuildConfig` fields (``out``, ``data``, ``limit``, ``targets``,
            ``weights``, ``method``, ``seed``, ``threads``, ``force``, ...; for a module also ``input_shape``,
            ``mean`` and ``std``, required) and pass settings (``bits="2/6"``, ``synth_steps=50``, ...) by field
            name, as the CLI flags.

    Returns:
        The typed report (also written as ``out/report.{json,md,html}`` beside ``out/model.dfmpc``).

    Raises:
        DfmpcError / UsageError: as the CLI (one line).
    """
    cfg_options = {k: v for k, v in options.items() if k in _BUILD_FIELDS}
    settings = {k: v for k, v in options.items() if k not in _BUILD_FIELDS}
    if isinstance(model, nn.Module):
        cfg = BuildConfig(model=name or type(model).__name__, module=model, settings=settings, **cfg_options)
    elif isinstance(model, str):
        cfg = BuildConfig(model=model, settings=settings, **cfg_options)
    else:
        raise UsageError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    with Progress(enabled=None if progress else False) as prog:
        return run_build(cfg, progress=prog)


def pack(mp: MixedPrecisionModel, path, *, input_shape: tuple[int, int, int] | None = None,
         mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
         resize: int | None = None, compress: bool = False) -> dict:
    """Write ``mp`` as a ``.dfmpc`` file, recording its input shape and normalisation so that :func:`export` and
    :func:`evaluate` need nothing but the file.

    Args:
        mp: from :func:`compensate` (not modified).
        path: the ``.dfmpc`` file.
        input_shape, mean, std, resize: the input record (all three of shape, mean and std, or none of them: then
            ``mp.input`` is kept as it is).
        compress: Huffman-code the integer codes (as ``--compress``).

    Returns:
        The size accounting (:func:`~dfmpc_deploy.io.container.save_packed`).
    """
    given = (input_shape, mean, std)
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise UsageError("pack: give input_shape, mean and std together (they are recorded in the file)")
        mp = dataclasses.replace(mp, input=InputSpec(tuple(input_shape), tuple(mean), tuple(std), resize))  # type: ignore[arg-type]
    return save_packed(mp, path, compress=compress)


def export(packed, *, model: nn.Module | None = None, input: InputSpec | None = None, progress: bool = False,
           **options: Any) -> ExportReport:
    """``dfmpc-deploy export`` from Python: every ONNX variant / engine of a packed file, parity and latency.

    Args:
        packed: the ``.dfmpc`` file.
        model: an instance of the architecture, for a file packed from your own module (its weights are not used).
        input: the input record, for a file that has none.
        progress: show progress on a terminal.
        **options: :class:`~dfmpc_deploy.packed.ExportConfig` fields (``out``, ``targets``, ``batch_sizes``,
            ``data``, ``limit``, ``threads``, ``force``, ``strip_weights``).
    """
    with Progress(enabled=None if progress else False) as prog:
        return run_export(ExportConfig(file=packed, **options), prog, model=model, input=input)


def evaluate(packed, data: str | Dataset, *, model: nn.Module | None = None, input: InputSpec | None = None,
             **options: Any) -> dict:
    """``dfmpc-deploy eval`` from Python: top-1 / top-5 of a packed file.

    Args:
        packed: the ``.dfmpc`` file.
        data: ``KIND:DIR`` (normalised as the file records) or a :class:`~dfmpc_deploy.zoo.data.Dataset` of
            images you normalised yourself.
        model: an instance of the architecture, for a file packed from your own module.
        input: the input record, for a file that has none.
        **options: :class:`~dfmpc_deploy.packed.EvalConfig` fields (``limit``, ``engine``, ``threads``).

    Returns:
        ``{"top1": float, "top5": float, "n": int}`` (percent).
    """
    return run_eval(EvalConfig(file=packed, data=data, **options), model=model, input=input)
