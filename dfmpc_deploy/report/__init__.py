"""The build report: a typed :class:`Report` (format 2), written as report.json, report.md and report.html.

Build one at the end of a build from its sections and write it::

    from dfmpc_deploy.report import Report, write_report, layer_rows
    write_report(out_dir, Report(model=..., weights=..., method=..., bits=..., recipe=..., ...))

``report.schema.json`` (package data) is the JSON Schema of ``Report.to_dict()``; ``read_report`` reads a file back.
"""
from .files import read_report, report_json, write_report
from .html import render_html
from .legacy import report_from_v1
from .markdown import render_markdown
from .model import (
    BUILD_STAGES,
    FORMAT_VERSION,
    Accuracy,
    Allocation,
    Bits,
    BuildSettings,
    Engine,
    EngineBuild,
    LatencyStats,
    LayerRow,
    PackedSize,
    Packing,
    Pair,
    Parity,
    PassRecord,
    Preprocessing,
    Recipe,
    Report,
    ReportError,
    Runtime,
    Sizes,
    Statistics,
    Synthesis,
    TopK,
    json_config,
    layer_rows,
)
from .schema import load_schema, report_schema, validate_report_json

__all__ = ["FORMAT_VERSION", "BUILD_STAGES", "Report", "ReportError", "Bits", "PassRecord", "Recipe", "Runtime",
           "BuildSettings", "Synthesis", "Statistics", "Pair", "Preprocessing", "TopK", "Accuracy", "Allocation",
           "Packing", "PackedSize", "Sizes", "LatencyStats", "Parity", "EngineBuild", "Engine", "LayerRow",
           "layer_rows", "json_config", "write_report", "read_report", "report_json", "render_markdown",
           "render_html", "report_from_v1", "report_schema", "load_schema", "validate_report_json"]
