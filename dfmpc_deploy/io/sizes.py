"""Sizes of packed models, computed from the layout rules (nothing is serialised or hashed).

* :func:`packed_nbytes` is the exact size of the file :func:`~dfmpc_deploy.io.container.save_packed` writes: the
  header's size follows from the state-dict keys, shapes and layouts (``header.header_nbytes``), each section's from
  the shapes (``layouts.layout_nbytes``; the deflate layouts are encoded, as their size depends on the data).
* :func:`size_report` splits a file into codes, scales, float tensors and metadata and compares it with the
  theoretical figures, from its header alone.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

from ..core.state import MixedPrecisionModel, QuantLayer
from .header import Header, LayerRecord, header_nbytes
from .layouts import CodeLayout, code_nbytes
from .plan import plan_file

__all__ = ["FP32_RULE", "THEORETICAL_RULE", "packed_nbytes", "code_nbytes", "fp32_nbytes", "avg_code_bits",
           "size_report"]

FP32_RULE = "4 bytes x every floating-point parameter and buffer of the state dict (integer counters excluded)"
THEORETICAL_RULE = ("codes at their bit widths (ternary 2 bits; *_min: log2(3)) + the scales and float tensors as "
                    "stored; no header")


def packed_nbytes(mp: MixedPrecisionModel, compress: bool = False) -> int:
    """Exact size in bytes of the file ``save_packed(mp, path, compress=compress)`` writes (nothing is written).

    Dense layouts (``compress=False``) are computed analytically from the keys, shapes and bit widths, without
    encoding codes or hashing; ``compress=True`` deflates each layer (its size depends on the data) but builds no
    file and hashes nothing. Uses the default ternary layout (base-3).
    """
    return plan_file(mp, CodeLayout.TERNARY_BASE3, bool(compress), payload=False).nbytes


def avg_code_bits(layers: Iterable[QuantLayer]) -> float:
    """Average bits per weight of the dense integer-code payloads of ``layers`` (ternary counts 1.6)."""
    layers = list(layers)
    return 8 * sum(code_nbytes(q.bits, q.numel) for q in layers) / max(1, sum(q.numel for q in layers))


def fp32_nbytes(module: nn.Module) -> int:
    """The FP32 reference size of ``module`` (:data:`FP32_RULE`)."""
    return sum(4 * v.numel() for v in module.state_dict().values() if v.is_floating_point())


def size_report(h: Header, fp32: int | None = None) -> dict:
    """Size accounting of a file with header ``h``.

    Args:
        h: the file's header.
        fp32: the FP32 reference size of the model; None derives the same figure from the header.

    Returns:
        dict of ints (bytes) ``fp32``, ``packed`` (file size) = ``low_bit_codes`` + ``high_bit_codes`` + ``scales``
        + ``float_tensors`` + ``metadata`` (preamble, header, digest); ``weights`` (quantized weight count),
        ``theoretical`` / ``theoretical_min`` (:data:`THEORETICAL_RULE`), ``compression`` and the
        ``bits_per_weight`` (effective), ``bits_per_weight_theoretical`` and ``bits_per_weight_min`` floats.
    """
    tensors, scales, _ = h.section_nbytes
    cat = {"low_bit_codes": 0, "high_bit_codes": 0, "scales": scales, "float_tensors": tensors}
    weights, nominal, ideal = 0, 0.0, 0.0
    for r in h.records:
        if isinstance(r, LayerRecord):
            weights += r.numel
            nominal += r.numel * r.bits
            ideal += r.numel * (math.log2(3) if r.bits == 2 else r.bits)
            cat["low_bit_codes" if r.role == "low" else "high_bit_codes"] += r.nbytes
    metadata = header_nbytes(h.arch, h.estimator, h.records, h.input, h.version)
    packed = metadata + sum(h.section_nbytes)
    if fp32 is None:
        fp32 = 4 * (weights + sum(math.prod(r.shape) for r in h.tensors if r.dtype in ("F32", "F64", "F16", "BF16")))
    rest = scales + tensors
    codes = cat["low_bit_codes"] + cat["high_bit_codes"]
    w = max(weights, 1)
    return {"fp32": fp32, "packed": packed, **cat, "metadata": metadata,
            "compression": round(fp32 / packed, 3), "weights": weights,
            "bits_per_weight": round(8 * codes / w, 4), "bits_per_weight_theoretical": round(nominal / w, 4),
            "bits_per_weight_min": round(ideal / w, 4), "theoretical": math.ceil(nominal / 8) + rest,
            "theoretical_min": math.ceil(ideal / 8) + rest, "fp32_rule": FP32_RULE,
            "theoretical_rule": THEORETICAL_RULE}
