"""The report of ``dfmpc-deploy export`` (DIR/report.json): what was made from a packed ``.dfmpc`` file alone.

A typed, frozen :class:`ExportReport` built from the same measured sections as the build report (sizes, latency,
parity, engines, accuracy), checked at construction and read back strictly (``from_dict``), with its own
``format_version``. The keys and shapes of ``size_bytes``, ``latency_ms``, ``parity``, ``engine`` and ``accuracy`` are
those of the build's report.json, so the same checks read both.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..io.atomic import atomic_write_text
from ._codec import BatchSize, Invalid, ReportError, Section, Sha256, decoded, field_from_json, opt, req
from .measurements import Accuracy, Engine, LatencyStats, Parity, Sizes
from .model import Preprocessing

__all__ = ["EXPORT_FORMAT_VERSION", "ExportReport", "write_export_report", "export_report_json"]

#: format of export's report.json
EXPORT_FORMAT_VERSION = 1

TargetLatency = dict[str, dict[BatchSize, LatencyStats]] | str


@dataclass(frozen=True, kw_only=True)
class ExportReport(Section):
    """``dfmpc-deploy export``: the artifacts made from one packed file, their sizes, latency and parity.

    Parity is measured against the packed model's own outputs (the file loaded in PyTorch), on the first 64 images
    of ``--data`` or 8 seeded random inputs.
    """

    format_version: ClassVar[int] = EXPORT_FORMAT_VERSION

    packed_file: str = req("the .dfmpc file exported (absolute path)")
    packed_sha256: Sha256 = req("SHA-256 of the .dfmpc file")
    packed_format_version: int = req(".dfmpc format version of the file", minimum=2)
    arch: str = req("architecture recorded in the file")
    estimator: str = req("how the file's low-bit BN statistics were obtained (recorded in the file)")
    input_shape: tuple[int, int, int] = req("C, H, W")
    preprocessing: Preprocessing = req("image normalisation")
    input_source: Literal["file", "registry", "caller"] = req(
        "where the input shape and normalisation came from: the file (format 3), the model registry (a format-2 "
        "file of a registered architecture) or the caller (Python API)")
    targets: tuple[str, ...] = req("targets exported (onnx, ort, trt, torch-cuda)")
    size_bytes: Sizes = req("file sizes, bytes (fp32 = the FP32 reference size of the architecture)")
    accuracy: Accuracy | None = opt("top-1/top-5 on --data: the packed model in torch and every ONNX variant on ORT")
    latency_ms: dict[str, TargetLatency] | None = opt("latency per target: {variant: {batch: stats}}")
    speedup: dict[str, dict[str, dict[BatchSize, float]]] | None = opt("fp32 p50 / variant p50 per target")
    threads: dict[str, int] | None = opt("threads per latency target")
    parity: dict[str, Parity] = req("every artifact against the packed model's own outputs", default={})
    engine: Engine | str | None = opt('TensorRT engines, or "skipped: <reason>" / "not requested"')
    artifacts: dict[str, str] = req("artifact files, relative to the output directory", default={})
    timings_s: dict[str, float] = req("seconds per stage (load, load_data, targets)")
    notes: tuple[str, ...] = req("warnings and remarks, one line each", default=())
    version: str = req("dfmpc-deploy version that exported")

    def _check(self) -> None:
        if any(d <= 0 for d in self.input_shape):
            raise Invalid(".input_shape", f"{list(self.input_shape)} has a non-positive size", type_error=False)

    def _encode(self) -> dict[str, Any]:
        return {"format_version": EXPORT_FORMAT_VERSION, **super()._encode()}

    @classmethod
    def _decode(cls, data, path):
        v = data.get("format_version")
        if v != EXPORT_FORMAT_VERSION or isinstance(v, bool):
            raise Invalid(f"{path}.format_version", f"{v!r} is not supported, this version reads "
                                                    f"{EXPORT_FORMAT_VERSION}", type_error=False)
        return super()._decode({k: x for k, x in data.items() if k != "format_version"}, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportReport:
        """Read an export report from its ``to_dict()`` form.

        Raises:
            ReportError: wrong ``format_version``, unknown or missing key, wrong type (one line with the path).
        """
        if not isinstance(data, Mapping):
            raise ReportError(f"export report: expected a JSON object, got {type(data).__name__}")
        return decoded(cls, data, "export report")

    @classmethod
    def section_from_dict(cls, name: str, value: Any) -> Any:
        """Decode one field from its JSON form (e.g. a :func:`~dfmpc_deploy.deploy.targets.run_targets` fragment).

        Raises:
            ReportError: ``value`` does not fit the field.
        """
        return field_from_json(cls, name, value, "export report")


def export_report_json(report: ExportReport) -> str:
    """The report's JSON text: 2-space indent, trailing newline, no NaN or infinity."""
    return report.to_json()


def write_export_report(out_dir: str | os.PathLike, report: ExportReport) -> Path:
    """Write ``out_dir/report.json`` atomically; returns its path."""
    path = Path(out_dir) / "report.json"
    atomic_write_text(path, export_report_json(report))
    return path
