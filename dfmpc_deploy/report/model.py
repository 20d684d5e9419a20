"""The build report as typed, frozen dataclasses (format 2): what report.json holds, and what Markdown and HTML show.

A :class:`Report` is built once, at the end of a build, from its sections; every section checks its fields at
construction (``TypeError`` / ``ValueError`` name the field: a bug in the caller), serialises with ``to_dict()`` and
reads back with ``from_dict()`` (strict: unknown keys, missing keys, wrong types, NaN and a wrong
``format_version`` raise :class:`ReportError`, one line naming the path). ``report.schema.json`` is generated from
these classes (``python -m dfmpc_deploy.report``) and a test keeps it in step.

Keys read by checks outside this project keep their format-1 shapes exactly: ``accuracy`` (``{"dataset", "n",
<name>: {"top1", "top5", "n"}}``), ``size_bytes`` (``{"fp32", "packed", ..., "onnx_<variant>", "engine":
{variant: bytes}}``) and ``latency_ms`` (``{target: {variant: {batch: {"p50", "p90", "p99", "mean", "iters"}}}}`` or
``"skipped: ..."`` per target).

Example::

    >>> bits = Bits(low=2, high=6, mixed=False, avg_code_bits=3.9978, grid="int")
    >>> bits.display()
    '2/6 int'
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ._codec import (
    BatchSize,
    Invalid,
    Json,
    JsonScalar,
    ReportError,
    Section,
    Sha256,
    decoded,
    field_from_json,
    opt,
    req,
)
from .measurements import (
    Accuracy,
    Allocation,
    Engine,
    EngineBuild,
    LatencyStats,
    PackedSize,
    Packing,
    Parity,
    Sizes,
    TopK,
)

if TYPE_CHECKING:
    from ..core.state import MixedPrecisionModel

__all__ = ["FORMAT_VERSION", "ReportError", "Bits", "PassRecord", "Recipe", "Runtime", "BuildSettings", "Synthesis",
           "Statistics",
           "Pair", "Preprocessing", "TopK", "Accuracy", "Allocation", "Packing", "PackedSize", "Sizes",
           "LatencyStats", "Parity", "EngineBuild", "Engine", "LayerRow", "Report", "layer_rows", "json_config",
           "BUILD_STAGES"]

#: report.json format. 1: the untyped dict of dfmpc-deploy <= 0.1 (see legacy.py); 2: this module.
FORMAT_VERSION = 2

#: The build stages timed in ``timings_s`` (seconds of the passes are in ``recipe.passes``).
BUILD_STAGES = ("load", "load_data", "compensate", "evaluate", "pack", "targets")

Role = Literal["low", "high-compensating", "high"]


# ---------------------------------------------------------------------------------------------- what was built


@dataclass(frozen=True, kw_only=True)
class Bits(Section):
    """The bit widths: a fixed low/high pairing or a per-layer allocation between ``low`` and ``high``."""

    low: int = req("bits of the low-bit layers (2 = ternary, 3..8 = k-bit on ``grid``)", minimum=2, maximum=8)
    high: int = req("bits of every other quantized layer", minimum=2, maximum=8)
    mixed: bool = req("true when each layer's width was chosen by the allocation (``allocation``)")
    avg_code_bits: float = req("packed code bits per quantized weight (ternary base-3 counts 1.6)", minimum=0)
    grid: Literal["int", "dorefa"] | None = opt("the k-bit grid (``--grid``): ``int`` (zero level) or ``dorefa`` "
                                                "(the paper's Eq. 6); absent in reports of builds before the choice "
                                                "existed, which were all DoReFa")

    def _check(self) -> None:
        if self.low > self.high:
            raise Invalid(".low", f"{self.low} is above high = {self.high}", type_error=False)

    @property
    def grid_name(self) -> str:
        """``int`` or ``DoReFa`` (DoReFa when the report predates ``grid``)."""
        return "int" if self.grid == "int" else "DoReFa"

    def _name(self, bits: int) -> str:
        return "ternary" if bits == 2 else f"{bits}-bit {self.grid_name}"

    @property
    def low_name(self) -> str:
        """``ternary`` or ``k-bit int`` / ``k-bit DoReFa``."""
        return self._name(self.low)

    @property
    def high_name(self) -> str:
        """``k-bit int`` / ``k-bit DoReFa`` (``ternary`` for 2/2)."""
        return self._name(self.high)

    def display(self) -> str:
        """``2/6 int`` (``2/6 DoReFa``; ``2/6`` when the grid is not recorded), or ``mixed 2..6 int (3.97
        bits/weight)`` for an allocation."""
        grid = "" if self.grid is None or self.high == 2 else f" {self.grid_name}"
        if self.mixed:
            return f"mixed {self.low}..{self.high}{grid} ({self.avg_code_bits:.2f} bits/weight)"
        return f"{self.low}/{self.high}{grid}"

    __str__ = display

    @classmethod
    def from_rows(cls, rows: Iterable[LayerRow], *, low: int, high: int, mixed: bool = False,
                  grid: Literal["int", "dorefa"] | None = None) -> Bits:
        """``avg_code_bits`` counted from the layer rows, as :func:`dfmpc_deploy.io.container.avg_code_bits` does.

        Args:
            rows: the layer rows (:func:`layer_rows`).
            low, high: the bit widths (the quantize pass's ``bits``).
            mixed: True for a per-layer allocation.
            grid: the k-bit grid, when known.
        """
        from ..io.layouts import code_nbytes  # lazy: io.layouts imports torch, and the report reads without it

        rows = list(rows)
        n = sum(r.params for r in rows)
        avg = 8 * sum(code_nbytes(r.bits, r.params) for r in rows) / max(1, n)
        return cls(low=low, high=high, mixed=mixed, avg_code_bits=round(avg, 4), grid=grid)


@dataclass(frozen=True, kw_only=True)
class PassRecord(Section):
    """One pass of the recipe as it ran: its exact configuration, its time and what it reports."""

    name: str = req("pass name")
    config: dict[str, Json] = req("the exact configuration the pass ran with, field by field")
    seconds: float = req("wall time of the pass", minimum=0)
    info: dict[str, JsonScalar | dict[str, JsonScalar]] = req("diagnostics of the pass (losses, counts)", default={})


@dataclass(frozen=True, kw_only=True)
class Recipe(Section):
    """The method that ran: a named list of passes."""

    name: str = req("method name (``--method``)")
    description: str = req("one line")
    data_used: Literal["none", "synthetic", "real"] = req("what the method reads besides the weights")
    fine_tuning: bool = req("whether weights were trained by gradient steps after quantization")
    passes: tuple[PassRecord, ...] = req("the passes, in order")


@dataclass(frozen=True, kw_only=True)
class Runtime(Section):
    """Where the build ran."""

    threads: int = req("torch intra-op threads", minimum=1)
    device: Literal["cpu", "cuda"] = req("device of the quantization passes")
    torch: str = req("torch version")


@dataclass(frozen=True, kw_only=True)
class BuildSettings(Section):
    """The build's own settings as given, and the weights file's checksum: with ``recipe.passes`` (the exact pass
    configurations) and ``runtime`` (threads, device), what ``build --from-report`` replays."""

    options: dict[str, Json] = req("every build option (field: value) but --out and --force, as the build ran with "
                                   "it (null = the default); data paths absolute")
    settings: dict[str, Json] = req("the pass settings given (field: value); recipe.passes has every pass's full "
                                    "configuration")
    weights_path: str | None = req("absolute path of the weights file, or null (pretrained, random, a module)")
    weights_sha256: Sha256 | None = req("SHA-256 of the weights file (hex), or null")
    version: str = req("dfmpc-deploy version that built it")


@dataclass(frozen=True, kw_only=True)
class Synthesis(Section):
    """The data-free input synthesis (BN-statistics matching) behind the re-estimated statistics."""

    samples: int = req("synthesised inputs", minimum=1)
    steps_run: int = req("optimiser steps taken", minimum=0)
    steps_max: int = req("step budget", minimum=0)
    resolution: int = req("side of the synthesised images, pixels", minimum=1)
    loss_initial: float = req("BN-statistics matching loss before the first full-size step")
    loss_final: float = req("loss after the last step")
    stopped_early: bool = req("true when the loss stopped improving before the budget")
    seconds: float = req("wall time", minimum=0)

    def _check(self) -> None:
        if self.steps_run > self.steps_max:
            raise Invalid(".steps_run", f"{self.steps_run} is above steps_max = {self.steps_max}", type_error=False)


@dataclass(frozen=True, kw_only=True)
class Statistics(Section):
    """Where the quantized model's BatchNorm statistics came from."""

    bn: Literal["real", "identity", "absent"] = req(
        "what the model's BN layers carried: trained statistics, identity (folded or reset), or no BN layers")
    estimator: str = req("how the low-bit layers' statistics were obtained, one line")
    synthesis: Synthesis | None = req("the input synthesis, or null when nothing was synthesised")


@dataclass(frozen=True, kw_only=True)
class Pair(Section):
    """One (low-bit, compensating high-bit) layer pair found in the traced graph."""

    low: str = req("fqn of the low-bit layer")
    high: str = req("fqn of the high-bit layer it feeds")
    bn: str | None = req("fqn of the BatchNorm between them, or null")
    act: str = req("activation between them (relu, relu6, identity, ...)")

    @classmethod
    def from_link(cls, link: Any) -> Pair:
        """From a :class:`dfmpc_deploy.core.graph.Link` (anything with ``low``, ``high``, ``bn``, ``act``)."""
        return cls(low=link.low, high=link.high, bn=link.bn, act=link.act)


@dataclass(frozen=True, kw_only=True)
class Preprocessing(Section):
    """How images were normalised for the model."""

    mean: tuple[float, float, float] = req("per-channel mean")
    std: tuple[float, float, float] = req("per-channel standard deviation")
    resize: int | None = req("shorter side before the centre crop, or null (no resize)")


@dataclass(frozen=True, kw_only=True)
class LayerRow(Section):
    """One quantized layer."""

    layer: str = req("fully qualified module name")
    kind: str = req("conv or linear")
    role: Role = req("low | high-compensating | high")
    bits: int = req("code bits (2 = ternary)", minimum=1, maximum=32)
    format: Literal["ternary", "uniform", "float"] = req("weight format")
    shape: tuple[int, ...] = req("weight shape")
    params: int = req("weights", minimum=0)
    partner: str | None = req("the other layer of its pair, or null")
    c_folded: bool | None = opt("whether the compensation c was folded into the model (with c_*)")
    c_min: float | None = opt("compensation coefficient c: minimum over the output channels")
    c_mean: float | None = opt("c: mean")
    c_max: float | None = opt("c: maximum")
    zero_fraction: float | None = opt("fraction of zero codes (ternary layers)", minimum=0, maximum=1)

    def _check(self) -> None:
        c = (self.c_folded, self.c_min, self.c_mean, self.c_max)
        if any(x is None for x in c) and not all(x is None for x in c):
            raise Invalid(".c_mean", "c_folded, c_min, c_mean and c_max come together", type_error=False)
        if self.c_mean is not None and not self.c_min <= self.c_mean <= self.c_max:  # type: ignore[operator]
            raise Invalid(".c_mean", f"c_min {self.c_min} <= c_mean {self.c_mean} <= c_max {self.c_max} does not "
                                     "hold", type_error=False)

    @property
    def has_c(self) -> bool:
        """Whether c was solved for this layer (then ``c_folded``, ``c_min``, ``c_mean``, ``c_max`` are set)."""
        return self.c_mean is not None

    @classmethod
    def _json_schema(cls, sub):
        s = super()._json_schema(sub)
        s["dependentRequired"] = {k: [x for x in _C_KEYS if x != k] for k in _C_KEYS}
        return s


_C_KEYS = ("c_folded", "c_min", "c_mean", "c_max")


TargetLatency = dict[str, dict[BatchSize, LatencyStats]] | str


@dataclass(frozen=True, kw_only=True)
class Report(Section):
    """A dfmpc-deploy build (report.json, format 2).

    Built once, at the end of a build, from its sections (keyword arguments; optional sections default to None and
    are left out of report.json)::

        rows = layer_rows(mp)
        report = Report(
            model="resnet20_cifar10_optA", weights="pretrained", method="dfmpc",
            bits=Bits.from_rows(rows, low=2, high=6, mixed=False),
            recipe=Recipe(name="dfmpc", description=spec.description, data_used="synthetic", fine_tuning=False,
                          passes=(PassRecord(name="compensate", config=json_config(cfg), seconds=3.04), ...)),
            runtime=Runtime(threads=torch.get_num_threads(), device="cpu", torch=torch.__version__),
            statistics=Statistics(bn="real", estimator=mp.estimator, synthesis=Synthesis(...)),
            pairs=tuple(Pair.from_link(link) for link in links), input_shape=(3, 32, 32),
            preprocessing=Preprocessing(mean=mean, std=std, resize=None),
            size_bytes=Sizes(fp32=fp32, packed=PackedSize.from_size_report(info)),
            packed_file="model.dfmpc", packing=Packing.from_size_report(info),
            latency_ms=Report.section_from_dict("latency_ms", frag["latency_ms"]),
            timings_s={"load": 0.02, "compensate": 3.04}, layers=rows, notes=notes)
    """

    format_version: ClassVar[int] = FORMAT_VERSION

    model: str = req("model name")
    weights: str = req('weights file, or "random" / "pretrained"')
    method: str = req("the --method asked for (recipe.name differs when the recipe fell back, see notes)")
    bits: Bits = req("bit widths")
    recipe: Recipe = req("the method and its passes as they ran")
    runtime: Runtime | None = opt("where the build ran (absent in reports converted from format 1)")
    build: BuildSettings | None = opt("the settings as given and the weights checksum, for build --from-report "
                                      "(absent in reports of dfmpc-deploy <= 0.2.0)")
    statistics: Statistics | None = opt("BN statistics source (absent in reports converted from format 1)")
    pairs: tuple[Pair, ...] | None = opt("layer pairs from the graph (absent in reports converted from format 1)")
    input_shape: tuple[int, int, int] = req("C, H, W")
    preprocessing: Preprocessing = req("image normalisation")
    targets: tuple[str, ...] = req("targets run besides torch (onnx, ort, trt, torch-cuda)", default=())
    accuracy: Accuracy | None = opt("accuracy (absent without --data)")
    allocation: Allocation | None = opt("the bit allocation (absent for a fixed pairing)")
    packed_file: str | None = opt("the .dfmpc file, relative to the output directory (absent with --no-pack)")
    packing: Packing | None = opt("packed-file accounting (absent with --no-pack)")
    size_bytes: Sizes = req("file sizes, bytes")
    latency_ms: dict[str, TargetLatency] | None = opt(
        'latency per target: {variant: {batch: stats}} or "skipped: <reason>" (absent without latency targets)')
    speedup: dict[str, dict[str, dict[BatchSize, float]]] | None = opt(
        "fp32 p50 / variant p50 per target, variant and batch")
    threads: dict[str, int] | None = opt("threads per latency target")
    parity: dict[str, Parity] | None = opt("exported artifacts against torch")
    engine: Engine | str | None = opt('TensorRT engines, or "skipped: <reason>" / "not requested"')
    artifacts: dict[str, str] | None = opt("artifact files, relative to the output directory")
    timings_s: dict[str, float] = req("seconds per build stage (load, load_data, compensate, evaluate, pack, "
                                      "targets)")
    layers: tuple[LayerRow, ...] = req("one row per quantized layer, in module order")
    notes: tuple[str, ...] = req("warnings and remarks, one line each", default=())

    def _check(self) -> None:
        if any(d <= 0 for d in self.input_shape):
            raise Invalid(".input_shape", f"{list(self.input_shape)} has a non-positive size", type_error=False)
        for k, v in self.timings_s.items():
            if v < 0:
                raise Invalid(f".timings_s[{k!r}]", f"{v} is below the minimum 0", type_error=False)

    @property
    def random_weights(self) -> bool:
        """Built with seeded random weights: sizes, latency and export are real, accuracy is meaningless."""
        return self.weights == "random"

    def _encode(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **super()._encode()}

    @classmethod
    def _decode(cls, data, path):
        if "format_version" not in data:
            raise Invalid(f"{path}.format_version", "missing required key")
        v = data["format_version"]
        if v != FORMAT_VERSION or isinstance(v, bool):
            hint = (" (written by dfmpc-deploy <= 0.1: convert it with dfmpc_deploy.report.report_from_v1)"
                    if v == 1 else "")
            raise Invalid(f"{path}.format_version", f"{v!r} is not supported, this version reads "
                                                    f"{FORMAT_VERSION}{hint}", type_error=False)
        return super()._decode({k: x for k, x in data.items() if k != "format_version"}, path)

    @classmethod
    def _json_schema(cls, sub):
        s = super()._json_schema(sub)
        s["properties"] = {"format_version": {"description": "report.json format", "const": FORMAT_VERSION},
                           **s["properties"]}
        s["required"] = ["format_version", *s["required"]]
        return s

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Read a report from its ``to_dict()`` form (parsed report.json).

        Raises:
            ReportError: wrong ``format_version``, unknown or missing key, wrong type or NaN (one line, with the
                path, e.g. ``report.layers[3].bits: expected an integer, got '2'``).
        """
        if not isinstance(data, Mapping):
            raise ReportError(f"report: expected a JSON object, got {type(data).__name__}")
        return decoded(cls, data, "report")

    @classmethod
    def section_from_dict(cls, name: str, value: Any) -> Any:
        """Decode one top-level section from its JSON form, e.g. ``Report.section_from_dict("latency_ms", frag)``.

        Raises:
            ReportError: ``name`` is not a field, or ``value`` does not fit it.
        """
        return field_from_json(cls, name, value, "report")


# ---------------------------------------------------------------------------------------------- constructors


def layer_rows(mp: MixedPrecisionModel) -> list[LayerRow]:
    """One :class:`LayerRow` per quantized layer of ``mp``, in module order.

    c statistics (rounded to 4 decimals) are given for layers with a solved compensation ``c``; the zero fraction
    for ternary layers.

    Args:
        mp: the compensated model (``mp.layers``: ``{fqn: QuantLayer}``).

    Returns:
        The rows, ready for ``Report(layers=...)``.
    """
    rows = []
    for q in mp.layers.values():
        c: dict[str, Any] = {}
        if q.c is not None:
            c = {"c_folded": bool(q.c_folded), "c_min": round(float(q.c.min()), 4),
                 "c_mean": round(float(q.c.mean()), 4), "c_max": round(float(q.c.max()), 4)}
        zero = round(float((q.codes == 0).float().mean()), 4) if q.bits == 2 else None
        rows.append(LayerRow(layer=q.fqn, kind=q.kind, role=getattr(q.role, "value", q.role),  # type: ignore[arg-type]
                             bits=q.bits,
                             format=q.fmt.value,  # role and format: Literals checked at construction
                             shape=tuple(q.codes.shape), params=q.numel, partner=q.partner, zero_fraction=zero, **c))
    return rows


def json_config(cfg: Any) -> dict[str, Any]:
    """A config dataclass (or mapping) as ``{field: JSON value}`` for :attr:`PassRecord.config`.

    Enums become their values, dataclasses (``BitsSpec``) dicts, tuples and sets lists, paths strings.
    """
    import dataclasses
    import enum
    from pathlib import PurePath

    def conv(v):
        if isinstance(v, enum.Enum):
            return conv(v.value)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, (set, frozenset)):
            return sorted(conv(x) for x in v)
        if isinstance(v, PurePath):
            return str(v)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"config value {v} cannot be written to JSON")
        return v

    out = conv(cfg)
    if not isinstance(out, dict):
        raise TypeError(f"json_config: expected a dataclass or mapping, got {type(cfg).__name__}")
    return out
