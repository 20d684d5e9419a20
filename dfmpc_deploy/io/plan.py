"""What a MixedPrecisionModel becomes in a ``.dfmpc`` file: its header records and payload sections.

One function, :func:`plan_file`, serves both the writer (``payload=True``: validated, encoded, hashed) and the
analytic size (``payload=False``: sizes only, nothing serialised or hashed), so the two cannot disagree.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.state import MixedPrecisionModel, QuantLayer
from ..errors import DfmpcError
from .header import (
    KINDS,
    MAX_ARCH_BYTES,
    MAX_DIMS,
    MAX_ESTIMATOR_BYTES,
    MAX_NAME_BYTES,
    ROLE_CODES,
    Header,
    LayerRecord,
    TensorRecord,
    header_nbytes,
    layer_shape_ok,
    printable,
)
from .layouts import MAX_ELEMENTS, CodeLayout, encode_codes, layout_nbytes

__all__ = ["Plan", "plan_file", "torch_dtype", "dtype_name", "raw_bytes", "uniform", "check_finite",
           "check_variance", "check_layer_scales"]

_TORCH = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in _TORCH.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a file dtype name (``F32``, ``I64``, ...)."""
    return _TORCH[name]


def dtype_name(dtype: torch.dtype) -> str | None:
    """The file dtype name of a torch dtype, or None if the format cannot store it."""
    return _NAMES.get(dtype)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as little-endian bytes, C order."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def uniform(t: torch.Tensor) -> bool:
    """True if ``t`` has more than one element and all are bit-identical (so storing one is exact)."""
    if t.numel() < 2:
        return False
    bits = t.detach().float().contiguous().view(torch.int32)
    return bool((bits == bits[0]).all())


def check_finite(t: torch.Tensor, what: str, exc=DfmpcError, fix: str = "") -> None:
    """Raise ``exc`` naming ``what`` if a floating-point ``t`` holds NaN or infinity."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise exc(f"{what} holds {bad} non-finite value(s) (NaN/Inf){fix}")


def check_variance(name: str, t: torch.Tensor, what: str, exc=DfmpcError, fix: str = "") -> None:
    """Raise ``exc`` if ``t`` is a BatchNorm ``running_var`` with a negative value (``var + eps`` must be > 0).

    Zero is legitimate: a channel whose quantized weights are all 0 outputs a constant, whose re-estimated variance
    is exactly 0 (BatchNorm divides by ``sqrt(var + eps)``).
    """
    if name.endswith("running_var") and t.is_floating_point() and t.numel() and bool((t < 0).any()):
        raise exc(f"{what} has {int((t < 0).sum())} negative value(s) (min {float(t.min()):.3g}); BatchNorm variances "
                  f"cannot be negative{fix}")


def check_layer_scales(bits: int, scale: torch.Tensor, in_scale: torch.Tensor | None,
                       codes_all_zero: Callable[[], bool], what: str, exc=DfmpcError, fix: str = "") -> None:
    """The scales of one layer must give finite float32 weights for every code the layer can hold.

    Rules: ``scale`` and ``in_scale`` finite; ``(2^bits - 1) * max|scale| * max|in_scale|`` (1 for ternary) at most
    half the float32 maximum (no weight, however it is rounded, overflows); and, for ternary layers, not every scale 0
    unless every code is 0 (else the layer silently outputs zeros: a failed quantizer). A k-bit layer of all-zero
    scales is a pruned layer (its grid of odd codes has no zero). ``codes_all_zero`` is called only then.
    """
    check_finite(scale, f"{what}: the scale", exc, fix)
    if in_scale is not None:
        check_finite(in_scale, f"{what}: the in_scale", exc, fix)
    if scale.numel():
        top = 1 if bits == 2 else (1 << bits) - 1
        peak = top * float(scale.abs().max()) * (float(in_scale.abs().max()) if in_scale is not None and
                                                 in_scale.numel() else 1.0)
        if peak > _MAX_WEIGHT:
            raise exc(f"{what}: scales up to {float(scale.abs().max()):.3g} make weights up to {peak:.3g}, beyond "
                      f"float32{fix}")
        # A pruned layer (every weight 0) is legitimate. Ternary codes hold it as all-zero codes; the k-bit grid has no
        # zero level (odd codes), so there it is every scale 0, whatever the codes.
        if bits == 2 and not bool(scale.any()) and not codes_all_zero():
            raise exc(f"{what}: every scale is 0 but the codes are not all zero, so the layer outputs zeros{fix}")


_MAX_WEIGHT = float(torch.finfo(torch.float32).max) / 2


def _utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8; text that has none (lone surrogates) is refused in one line."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise DfmpcError(f"{printable(text)!r} is not valid Unicode text; rename it") from None


def _sha256(pieces: list[bytes]) -> bytes:
    h = hashlib.sha256()
    for b in pieces:
        h.update(b)
    return h.digest()


@dataclass
class Plan:
    """The file for one model: its header (digests filled in when ``payload``) and the section byte pieces."""

    header: Header
    nbytes: int
    tensors: list[bytes] = field(default_factory=list)
    scales: list[bytes] = field(default_factory=list)
    codes: list[bytes] = field(default_factory=list)


_PACK_FIX = "; the model is broken (re-run the method, e.g. with another --recal, or report a bug)"


def _layer_record(q: QuantLayer, key: str, index: dict[str, int], ternary_layout: CodeLayout, compress: bool,
                  payload: bool) -> tuple[LayerRecord, bytes | None, list[bytes]]:
    shape = tuple(q.codes.shape)
    if q.role not in ROLE_CODES.values() or q.kind not in KINDS.values() or not 2 <= q.bits <= 8:
        raise DfmpcError(f"layer '{printable(q.fqn)}': role {q.role!r} / kind {q.kind!r} / bits {q.bits!r} cannot "
                         f"be packed")
    if tuple(q.scale.shape) != shape[:1] or (q.in_scale is not None and (
            len(shape) < 2 or tuple(q.in_scale.shape) != (shape[1],))):
        raise DfmpcError(f"layer '{printable(q.fqn)}': scale must be (out,) and in_scale (in,) for weight "
                         f"{list(shape)}")
    if q.partner is not None and q.partner not in index:
        raise DfmpcError(f"layer '{printable(q.fqn)}': partner {printable(str(q.partner))!r} is not a quantized "
                         f"layer of the model")
    if not q.fqn or not layer_shape_ok(q.kind, shape) or math.prod(shape) > MAX_ELEMENTS or max(shape) >= 1 << 32:
        raise DfmpcError(f"layer '{printable(q.fqn)}': a {q.kind} weight of shape {list(shape)} is beyond the "
                         f"format's limits (2-D linear or 3- to 5-D conv, no empty dimension, < 2^31 weights)")
    grid = "dorefa" if q.bits == 2 else q.grid  # ternary codes have no grid; k-bit: int or DoReFa (flag bit 3)
    if grid not in ("int", "dorefa"):
        raise DfmpcError(f"layer '{printable(q.fqn)}': grid {q.grid!r} cannot be packed (int or dorefa)")
    scale_once, in_once = uniform(q.scale), q.in_scale is not None and uniform(q.in_scale)
    data, pieces = None, []
    if payload or compress:
        try:
            layout, codes = encode_codes(q.codes, q.bits, ternary_layout, compress, grid)
        except ValueError as err:
            raise DfmpcError(f"layer '{printable(q.fqn)}': {err}") from None
        data, nb = codes.tobytes(), int(codes.size)
    else:
        layout = ternary_layout if q.bits == 2 else CodeLayout.KBIT
        nb = layout_nbytes(layout, q.bits, q.numel)
    if payload:
        scale = q.scale.detach().float()
        ins = None if q.in_scale is None else q.in_scale.detach().float()
        check_layer_scales(q.bits, scale, ins, lambda: not bool(q.codes.any()),
                           f"cannot pack layer '{printable(q.fqn)}'", fix=_PACK_FIX)
        pieces.append(raw_bytes(scale[:1] if scale_once else scale))
        if ins is not None:
            pieces.append(raw_bytes(ins[:1] if in_once else ins))
    rec = LayerRecord(key, q.kind, q.bits, CodeLayout(layout), q.role, shape,
                      None if q.partner is None else index[q.partner], q.in_scale is not None, scale_once, in_once, nb,
                      grid)
    return rec, data, pieces


def plan_file(mp: MixedPrecisionModel, ternary_layout: CodeLayout = CodeLayout.TERNARY_BASE3, compress: bool = False,
              payload: bool = True) -> Plan:
    """Lay out ``mp`` as a ``.dfmpc`` file.

    Args:
        mp: the model; every layer's weight is stored as codes + scales, every other state-dict entry as is.
        ternary_layout: dense layout of ternary layers.
        compress: deflate each layer where that is smaller (encodes every layer to learn its size).
        payload: also validate and encode the payload and fill in the section digests; False computes the sizes
            only (no serialisation, no hashing; with ``compress`` the codes are still deflated).

    Returns:
        Plan with the header, the exact file size and (with ``payload``) the section pieces.

    Raises:
        DfmpcError: the model cannot be packed (naming the layer or tensor and why).
    """
    sd = mp.module.state_dict()
    keys = {f"{fqn}.weight": fqn for fqn in mp.layers}
    missing = [k for k in keys if k not in sd]
    if missing:
        raise DfmpcError(f"layer '{printable(keys[missing[0]])}' has no weight in the module's state dict; pack the "
                         f"MixedPrecisionModel returned by compensate()")
    position = {k: i for i, k in enumerate(sd)}
    index = {fqn: position[k] for k, fqn in keys.items()}  # partner -> its record number
    arch, est = str(mp.arch), str(mp.estimator or "")
    if not 1 <= _utf8_len(arch) <= MAX_ARCH_BYTES or _utf8_len(est) > MAX_ESTIMATOR_BYTES:
        raise DfmpcError(f"arch name {printable(arch)!r} must be 1..{MAX_ARCH_BYTES} bytes and the estimator label "
                         f"at most {MAX_ESTIMATOR_BYTES} bytes of UTF-8")
    plan = Plan(Header(arch, est, ()), 0)
    records: list = []
    for key, t in sd.items():
        if _utf8_len(key) > MAX_NAME_BYTES:
            raise DfmpcError(f"state-dict key {printable(key)!r} is longer than {MAX_NAME_BYTES} bytes of UTF-8, "
                             f"which the format cannot store; rename the module")
        if key in keys:
            q = mp.layers[keys[key]]
            rec, data, pieces = _layer_record(q, key, index, ternary_layout, compress, payload)
            if payload and not torch.equal(t.detach().cpu(), q.weight()):  # after the scale checks: NaN != NaN
                raise DfmpcError(f"layer '{printable(q.fqn)}': the module's weight is not codes * scale; pack the "
                                 f"MixedPrecisionModel returned by compensate() without editing its weights")
            records.append(rec)
            if payload and data is not None:
                plan.codes.append(data)
                plan.scales.extend(pieces)
            continue
        name = dtype_name(t.dtype)
        if name is None or t.dim() > MAX_DIMS or max(t.shape, default=0) >= 1 << 32 or t.numel() > MAX_ELEMENTS:
            raise DfmpcError(f"state-dict entry '{printable(key)}' ({t.dtype}, shape {list(t.shape)}) cannot be "
                             f"stored in a .dfmpc file")
        if payload:
            check_finite(t, f"cannot pack '{printable(key)}': it", fix=_PACK_FIX)
            check_variance(key, t, f"cannot pack '{printable(key)}': it", fix=_PACK_FIX)
            plan.tensors.append(raw_bytes(t))
        records.append(TensorRecord(key, name, tuple(t.shape)))
    digests = tuple(_sha256(p) if payload else bytes(32) for p in (plan.tensors, plan.scales, plan.codes))
    plan.header = Header(arch, est, tuple(records), digests, mp.input)  # type: ignore[arg-type]
    plan.nbytes = header_nbytes(arch, est, records, mp.input) + sum(plan.header.section_nbytes)
    if payload:  # the pieces must be what the records say
        got = tuple(sum(len(b) for b in p) for p in (plan.tensors, plan.scales, plan.codes))
        if got != plan.header.section_nbytes:
            raise AssertionError(f"section sizes {got} != {plan.header.section_nbytes}")
    return plan

