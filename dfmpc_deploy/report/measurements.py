"""Measured sections of the report: accuracy, sizes, latency, parity, engines, packing and bit allocation.

``accuracy`` and ``size_bytes`` are written flat, in the shapes report.json has always had (checks outside this
project read them): ``{"dataset", "n", <name>: {"top1", "top5", "n"}}`` and ``{"fp32", "packed", <part>...,
"onnx_<variant>", "engine": {variant: bytes}}``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._codec import Invalid, Section, convert, doc_line, opt, req

__all__ = ["TopK", "Accuracy", "Allocation", "Packing", "PackedSize", "Sizes", "LatencyStats", "Parity", "EngineBuild",
           "Engine"]


@dataclass(frozen=True, kw_only=True)
class TopK(Section):
    """Top-1 / top-5 accuracy of one model on the dataset."""

    top1: float = req("top-1 accuracy, percent", minimum=0, maximum=100)
    top5: float = req("top-5 accuracy, percent (>= top1)", minimum=0, maximum=100)
    n: int = req("images evaluated", minimum=1)

    def _check(self) -> None:
        if self.top5 < self.top1:
            raise Invalid(".top5", f"{self.top5} is below top1 = {self.top1}", type_error=False)


_ACC_META = ("dataset", "n")


@dataclass(frozen=True, kw_only=True)
class Accuracy(Section):
    """Accuracy per model; written flat: ``{"dataset", "n", <name>: {"top1", "top5", "n"}, ...}``.

    Names: ``fp32``, ``quantized_uncompensated``, the method name, and from the targets ``torch_fp32``,
    ``torch_fakequant``, ``onnx_<variant>``.
    """

    dataset: str = req("dataset spec (``imagefolder:<dir>``, ...)")
    n: int = req("images in the dataset", minimum=1)
    results: dict[str, TopK] = req("top-1/top-5 per model name")

    def _check(self) -> None:
        for k in self.results:
            if k in _ACC_META:
                raise Invalid(f".results[{k!r}]", f"{k!r} is reserved for the dataset fields", type_error=False)

    def _encode(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "n": self.n, **{k: v.to_dict() for k, v in self.results.items()}}

    @classmethod
    def _decode(cls, data, path):
        for k in _ACC_META:
            if k not in data:
                raise Invalid(f"{path}.{k}", "missing required key")
        results = {k: convert(TopK, v, f"{path}[{k!r}]", json=True) for k, v in data.items() if k not in _ACC_META}
        return cls._build({"dataset": data["dataset"], "n": data["n"], "results": results}, path)

    @classmethod
    def _json_schema(cls, sub):
        return {"type": "object", "description": doc_line(cls), "properties": {
            "dataset": {"description": "dataset spec", **sub(str)},
            "n": {"description": "images in the dataset", **sub(int), "minimum": 1}},
            "required": list(_ACC_META), "additionalProperties": sub(TopK)}


@dataclass(frozen=True, kw_only=True)
class Allocation(Section):
    """The per-layer bit allocation under a size budget (``--size-budget-mb`` / ``--avg-bits``)."""

    bits_histogram: dict[str, int] = req("layers per bit width")
    code_bytes: int = req("bytes of the packed codes", minimum=0)
    budget_bytes: int = req("the size budget", minimum=0)
    avg_code_bits: float = req("code bits per weight", minimum=0)
    predicted_kl: float = req("predicted KL divergence of the allocation")
    seconds: float = req("scoring and choosing time", minimum=0)


@dataclass(frozen=True, kw_only=True)
class Packing(Section):
    """Accounting of the packed ``.dfmpc`` file (sizes themselves are in ``size_bytes``)."""

    compression: float = req("fp32 bytes / packed bytes", minimum=0)
    weights: int = req("quantized weights", minimum=0)
    bits_per_weight: float = req("code bits per weight in the file", minimum=0)
    bits_per_weight_theoretical: float = req("nominal bits per weight (ternary 2)", minimum=0)
    bits_per_weight_min: float = req("bits per weight with ternary at log2(3)", minimum=0)
    fp32_rule: str = req("how the FP32 size is counted")
    theoretical_rule: str = req("how the theoretical sizes are counted")

    @classmethod
    def from_size_report(cls, rep: Mapping[str, Any]) -> Packing:
        """Pick the packing fields from :func:`dfmpc_deploy.io.container.save_packed`'s size report."""
        return cls(**{f.name: rep[f.name] for f in fields(cls)})


@dataclass(frozen=True, kw_only=True)
class PackedSize(Section):
    """The packed file's size and its composition, bytes (written flat into ``size_bytes``)."""

    packed: int = req("the .dfmpc file", minimum=0)
    low_bit_codes: int = req("codes of the low-bit layers", minimum=0)
    high_bit_codes: int = req("codes of the high-bit layers", minimum=0)
    scales: int = req("per-channel scales", minimum=0)
    float_tensors: int = req("float tensors (BN, biases)", minimum=0)
    metadata: int = req("header", minimum=0)
    theoretical: int = req("codes at their nominal widths + scales + float tensors", minimum=0)
    theoretical_min: int = req("the same with ternary at log2(3) bits", minimum=0)

    @property
    def parts(self) -> tuple[tuple[str, int], ...]:
        """The five parts that add up to ``packed``."""
        return (("low_bit_codes", self.low_bit_codes), ("high_bit_codes", self.high_bit_codes),
                ("scales", self.scales), ("float_tensors", self.float_tensors), ("metadata", self.metadata))

    @classmethod
    def from_size_report(cls, rep: Mapping[str, Any]) -> PackedSize:
        """Pick the byte counts from :func:`dfmpc_deploy.io.container.save_packed`'s size report."""
        return cls(**{f.name: rep[f.name] for f in fields(cls)})


_PACKED_KEYS = tuple(f.name for f in fields(PackedSize))


@dataclass(frozen=True, kw_only=True)
class Sizes(Section):
    """File sizes, bytes; written flat: ``{"fp32", "packed", "low_bit_codes", ..., "onnx_<variant>", "engine"}``."""

    fp32: int = req("FP32 reference size (rule in packing.fp32_rule)", minimum=0)
    packed: PackedSize | None = opt("the packed file (absent with --no-pack)")
    onnx: dict[str, int] = req("ONNX file per variant (written as onnx_<variant>)", default={})
    engine: dict[str, int] | None = opt("TensorRT engine per variant (absent when none was built)")

    def _check(self) -> None:
        if "" in self.onnx:
            raise Invalid(".onnx", "empty variant name", type_error=False)
        for name, sizes in (("onnx", self.onnx), ("engine", self.engine or {})):
            for k, v in sizes.items():
                if v < 0:
                    raise Invalid(f".{name}[{k!r}]", f"{v} is below the minimum 0", type_error=False)

    def _encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fp32": self.fp32}
        if self.packed is not None:
            out.update(self.packed.to_dict())
        out.update({f"onnx_{k}": v for k, v in self.onnx.items()})
        if self.engine is not None:
            out["engine"] = dict(self.engine)
        return out

    @classmethod
    def _decode(cls, data, path):
        known = {"fp32", "engine", *_PACKED_KEYS}
        unknown = [k for k in data if k not in known and not (k.startswith("onnx_") and len(k) > 5)]
        if unknown:
            raise Invalid(path, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:5]))}"
                                " (size_bytes has fp32, the packed file's parts, onnx_<variant> and engine)")
        if "fp32" not in data:
            raise Invalid(f"{path}.fp32", "missing required key")
        onnx = {k[5:]: v for k, v in data.items() if k.startswith("onnx_")}
        kw: dict[str, Any] = {"fp32": data["fp32"], "onnx": onnx}
        present = [k for k in _PACKED_KEYS if k in data]
        if present:
            missing = [k for k in _PACKED_KEYS if k not in data]
            if missing:
                raise Invalid(f"{path}.{missing[0]}", "missing required key (the packed file's sizes come together)")
            kw["packed"] = convert(PackedSize, {k: data[k] for k in _PACKED_KEYS}, path, json=True)
        if "engine" in data:
            kw["engine"] = convert(dict[str, int], data["engine"], f"{path}.engine", json=True)
        kw["onnx"] = convert(dict[str, int], kw["onnx"], path, json=True)
        return cls._build(kw, path)

    @classmethod
    def _json_schema(cls, sub):
        nonneg = {**sub(int), "minimum": 0}
        props = {"fp32": {"description": "FP32 reference size", **nonneg}}
        props.update({f.name: {"description": f.metadata["doc"], **nonneg} for f in fields(PackedSize)})
        props["engine"] = {"description": "TensorRT engine per variant", "type": "object",
                           "additionalProperties": nonneg}
        return {"type": "object", "description": doc_line(cls), "properties": props, "required": ["fp32"],
                "patternProperties": {"^onnx_[\\s\\S]": {"description": "ONNX file of one variant", **nonneg}},
                "dependentRequired": {k: [x for x in _PACKED_KEYS if x != k] for k in _PACKED_KEYS},
                "additionalProperties": False}


@dataclass(frozen=True, kw_only=True)
class LatencyStats(Section):
    """Latency of one model at one batch size, milliseconds."""

    p50: float = req("median", minimum=0)
    p90: float = req("90th percentile", minimum=0)
    p99: float = req("99th percentile", minimum=0)
    mean: float = req("mean", minimum=0)
    iters: int = req("timed runs", minimum=1)

    def _check(self) -> None:
        if not self.p50 <= self.p90 <= self.p99:
            raise Invalid(".p90", f"percentiles out of order: p50 {self.p50}, p90 {self.p90}, p99 {self.p99}",
                          type_error=False)


@dataclass(frozen=True, kw_only=True)
class Parity(Section):
    """Outputs of an exported artifact against the PyTorch model on the same inputs."""

    max_abs_diff: float = req("max |artifact - torch| over the logits", minimum=0)
    max_abs_ref: float = req("max |torch| over the logits (scale of the difference)", minimum=0)
    top1_agreement: float = req("fraction of inputs with the same top-1 class", minimum=0, maximum=1)
    n: int = req("inputs compared", minimum=1)
    ok: bool | None = req("the check passed / failed; null: judged by top-1 (activation-quantized variants)")


@dataclass(frozen=True, kw_only=True)
class EngineBuild(Section):
    """One TensorRT engine."""

    build_seconds: float = req("build time", minimum=0)
    size_bytes: int = req("plan file size", minimum=0)
    stripped: bool = req("weight-stripped plan (refitted from the ONNX file at load)")
    path: str = req("plan file, relative to the output directory")


@dataclass(frozen=True, kw_only=True)
class Engine(Section):
    """The TensorRT engines built."""

    backend: str = req("tensorrt or tensorrt_rtx, with its version")
    builds: dict[str, EngineBuild] = req("engine per variant")
