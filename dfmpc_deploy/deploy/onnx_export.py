"""Export a :class:`~dfmpc_deploy.artifacts.MixedPrecisionModel` to ONNX, in five variants.

The model is traced once with the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, which works offline),
input ``input`` (N, C, H, W) float32 and output ``output``, batch dimension symbolic (``batch``). Before tracing, every
BatchNorm2d that directly follows a Conv2d is folded into it (``W' = W gamma/sigma``, ``b' = beta + (b - mu)
gamma/sigma``); since that is a per-output-channel factor, a folded quantized weight is still ``codes * scale'`` with
integer codes. Variants:

``fp32`` The dequantised model as FP32 initializers. ``fp16`` ``fp32`` with every float tensor in FP16; graph input
and output stay FP32 (a Cast at each end). ``wdq`` Each quantized Conv/Gemm weight is an INT8 initializer (the integer
codes, sign-flipped per channel where the folded scale is negative) followed by ``DequantizeLinear`` with a
per-output-channel FP32 scale, zero-point 0, ``axis=0`` (symmetric, the form TensorRT accepts). ``int4=True`` stores
layers whose codes fit [-8, 7] (ternary, 3-bit, 4-bit ``int`` grid) as INT4 (opset >= 21; wdq only, see
:func:`export_onnx`). Codes on the ``int`` grid are INT8 as they are (up to 8 bits, -128 included). 8-bit DoReFa codes
(odd integers up to +-255) do not fit INT8, nor does an int code -128 in a channel whose folded scale is negative (it
flips to +128): those channels are requantised to symmetric INT8 and a note says so.
A compensation ``in_scale`` (DF-MPC Eq. 7, only after non-homogeneous activations such as ReLU6) is a
``Mul`` by a (1, C, 1, 1) constant on the activation in front of the layer, so the weight stays integer.
``w8a8``
    ``wdq`` plus a ``QuantizeLinear -> DequantizeLinear`` pair (per-tensor symmetric INT8, zero-point 0) on the input
    of every quantized Conv/Gemm (after the ``in_scale`` Mul), with data-free ranges from
    :func:`calib_free.ranges.estimate_act_ranges` (BN statistics only, k = 3.92 for 8 bits; propagated from the
    weights when the BN layers carry none). This is the TensorRT form.
``w8a8_ort``
    The ONNX Runtime form of the same quantization: layer inputs *and* outputs (after the ReLU when there is one) get
    asymmetric UINT8 Q/DQ (a post-ReLU tensor uses all 256 levels with zero-point 0) and biases are INT32 with scale
    ``s_x * s_w``. ORT's CPU provider fuses exactly this pattern into QLinearConv / QLinearAdd; for ``w8a8`` it keeps
    DequantizeLinear + float Conv, which is *slower* than FP32. TensorRT rejects INT32/UINT8 DQ, so this file is for
    ORT only. The extra output quantization makes it slightly less accurate than ``w8a8``.

Tolerances (checked by the tests and by :func:`dfmpc_deploy.ort.parity`): ``fp32``/``wdq`` match PyTorch to ~1e-4
relative to the logit range (float re-association only; exact codes), ``fp16`` to ~1e-2, ``w8a8`` is a different
(activation-quantized) model and is judged by top-1.

Every file passes ``onnx.checker.check_model(full_check=True)`` and is written atomically.
"""
from __future__ import annotations

import copy
import inspect
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from calib_free.ranges import estimate_act_ranges, estimate_output_ranges, input_range_from_normalization

from .._deps import require
from ..core.state import MixedPrecisionModel
from ..core.stats import bn_status
from ..errors import DfmpcError
from ..io.atomic import atomic_write_bytes
from ..zoo.models import REGISTRY
from .onnx_rewrite import INPUT_NAME, OUTPUT_NAME, QuantizedWeight, Rewriter, find_initializer, to_fp16

__all__ = ["VARIANTS", "OnnxExport", "OnnxBase", "export_onnx", "export_variants", "onnx_from_mp",
           "base_onnx_from_mp", "variant_from_base"]

log = logging.getLogger("dfmpc_deploy")

VARIANTS = ("fp32", "fp16", "wdq", "w8a8", "w8a8_ort")
DEFAULT_OPSET = 17
_TORCH_MAX_OPSET = 20  # the TorchScript exporter's highest opset; 21 only adds INT4/UINT4 types to the ops we use


@dataclass
class OnnxExport:
    """One written ONNX file.

    Attributes:
        path: the file.
        variant: one of :data:`VARIANTS`.
        size_bytes: file size.
        notes: what the export had to approximate or decide (requantised 8-bit layers, missing ranges, ...).
    """

    path: Path
    variant: str
    size_bytes: int
    notes: list[str] = field(default_factory=list)


@dataclass
class OnnxBase:
    """The traced FP32 model (BN folded) and what the quantized variants need to rewrite it.

    Attributes:
        model: the FP32 ``onnx.ModelProto`` every variant is derived from (never modified).
        weights: ``{fqn: QuantizedWeight}`` for every quantized layer.
        mp: the compensated model it was traced from.
        notes: what the trace had to approximate (requantised 8-bit layers, ...).
    """

    model: Any  # onnx.ModelProto (onnx is an optional dependency)
    weights: dict[str, QuantizedWeight]
    mp: MixedPrecisionModel
    notes: list[str]


def _fold_bn(mp: MixedPrecisionModel) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """Copy of ``mp.module`` with BN folded into the preceding convs; returns it and the folded per-channel factor.

    The graph is ``mp``'s analysis (traced once per model, :meth:`MixedPrecisionModel.analysis`), run on a deep copy;
    the conv -> BN matches are its units (the BN is the conv's sole consumer).
    """
    analysis = mp.analysis()
    gm = analysis.graph_module(copy.deepcopy(mp.module).eval())
    mods = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}  # the copied graph keeps the node names
    factor: dict[str, torch.Tensor] = {}
    for name, unit in analysis.units.items():
        conv, bn = mods.get(name), mods.get(unit.bn) if unit.bn is not None else None
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            continue
        running_mean, running_var = bn.running_mean, bn.running_var
        if running_mean is None or running_var is None:  # batch statistics even in eval mode: nothing to fold
            continue
        conv_node = nodes[unit.node.name]
        bn_node = nodes[next(iter(unit.node.users)).name]  # a unit's BN is its layer's sole consumer
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(bn.num_features).double()
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(bn.num_features).double()
        a = gamma / torch.sqrt(running_var.double() + bn.eps)
        b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(a)
        with torch.no_grad():
            conv.weight.copy_((conv.weight.double() * a.reshape(-1, 1, 1, 1)).float())
            conv.bias = nn.Parameter((beta + (b0 - running_mean.double()) * a).float())
        factor[name] = a
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, factor


def _int_weights(mp: MixedPrecisionModel, folded: nn.Module, factor: dict[str, torch.Tensor],
                 notes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Integer weights (codes with |scale|) per layer, and the exact float weights written into ``folded``."""
    mods = dict(mp.module.named_modules())
    fmods = dict(folded.named_modules())
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for fqn, q in mp.layers.items():
        w_mod = mods[fqn].weight.detach().float()
        if not torch.allclose(w_mod, q.weight(), rtol=1e-5, atol=1e-7):
            raise DfmpcError(f"layer '{fqn}': module weight differs from codes*scale; the MixedPrecisionModel is "
                             f"inconsistent (was mp.module modified after compensate?)")
        s = q.scale.double() * factor.get(fqn, torch.ones_like(q.scale, dtype=torch.float64))
        per_out = (-1, *([1] * (q.codes.dim() - 1)))
        codes = q.codes.to(torch.int32) * torch.where(s < 0, -1, 1).reshape(per_out)  # TRT: scale > 0
        s = s.abs().float()
        in_scale = q.in_scale.float() if q.in_scale is not None else None
        w = codes.float() * s.reshape(per_out)  # the exact dequantised (BN-folded) weight, for fp32/fp16
        flat = codes.flatten(1)
        over = (flat > 127).any(1) | (flat < -128).any(1)  # INT8 holds [-128, 127]
        if bool(over.any()):
            s_new = w.flatten(1).abs().amax(1) / 127
            requant = torch.round(w / torch.where(s_new > 0, s_new, 1).reshape(per_out)).to(torch.int32)
            codes = torch.where(over.reshape(per_out), requant, codes)
            s = torch.where(over, s_new, s)
            err = float((codes * s.reshape(per_out) - w).abs().max() / w.abs().max().clamp(min=1e-30))
            what = (f"{q.bits}-bit DoReFa codes (odd integers up to +-{2 ** q.bits - 1})" if q.grid == "dorefa"
                    else "int codes of -128 in channels with a negative folded scale (+128 after the sign flip)")
            notes.append(f"layer '{fqn}': {what} do not fit INT8; {int(over.sum())} of {len(over)} channels "
                         f"requantised to symmetric INT8 for the integer variants "
                         f"(max change {100 * err:.2f}% of the largest weight)")
        s = torch.where((s > 0) & (codes.flatten(1).abs().amax(1) > 0), s, torch.ones_like(s))
        if in_scale is not None:
            w = w * in_scale.reshape(1, -1, *([1] * (w.dim() - 2)))
        with torch.no_grad():
            fmods[fqn].weight.copy_(w)
        out[fqn] = (codes.to(torch.int8).numpy(), s.numpy(), None if in_scale is None else in_scale.numpy())
    return out


def base_onnx_from_mp(mp: MixedPrecisionModel, input_shape: tuple[int, int, int],
                      opset: int = DEFAULT_OPSET) -> OnnxBase:
    """Trace ``mp`` once into an FP32 ONNX model (BN folded); the variants are derived from it.

    Args:
        mp: the compensated model.
        input_shape: (C, H, W) of one input.
        opset: ONNX opset (13..23; the trace uses min(opset, 20) and the import is raised after).
    """
    onnx = require("onnx", "onnx")
    if not 13 <= opset <= 23:
        raise DfmpcError(f"opset {opset} not supported: per-channel DequantizeLinear needs >= 13 (INT4 >= 21); use 17")
    notes: list[str] = []
    folded, factor = _fold_bn(mp)
    ints = _int_weights(mp, folded, factor, notes)
    x = torch.zeros((2, *input_shape))
    buf = io.BytesIO()
    # torch >= 2.5 has the dynamo exporter (the default from 2.9); the TorchScript one works offline and keeps names
    legacy: dict[str, Any] = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        # a file object is valid for the TorchScript exporter, but not in torch's stubs
        torch.onnx.export(folded, (x,), buf, **legacy,  # type: ignore[arg-type]
                          opset_version=min(opset, _TORCH_MAX_OPSET),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          training=torch.onnx.TrainingMode.EVAL)
    model = onnx.load_from_string(buf.getvalue())
    _drop_initializer_identities(model)
    if opset > _TORCH_MAX_OPSET:
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
    inits = {i.name: i for i in model.graph.initializer}
    weights: dict[str, QuantizedWeight] = {}
    fmods = dict(folded.named_modules())
    for fqn, (q, s, ins) in ints.items():
        name, axis = f"{fqn}.weight", 0
        if name not in inits:
            name, axis = find_initializer(onnx, inits, fmods[fqn].weight.detach().numpy(), fqn)
        weights[fqn] = QuantizedWeight(name, axis, q, s, ins)
    return OnnxBase(model, weights, mp, notes)


def _drop_initializer_identities(model) -> None:
    """The exporter de-duplicates equal initializers (e.g. all-zero folded biases) behind Identity nodes; read the
    initializer directly instead, so every Conv/Gemm sees a plain initializer (ORT's QDQ fusion needs that)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    outs = {o.name for o in g.output}
    alias = {n.output[0]: n.input[0] for n in g.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outs}
    nodes = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in nodes:
        n.input[:] = [alias.get(x, x) for x in n.input]
    del g.node[:]
    g.node.extend(nodes)


def _ranges(mp: MixedPrecisionModel, input_range, notes: list[str]) -> tuple[dict, dict]:
    """Data-free (input ranges, output ranges) of every quantized layer (calib_free.ranges)."""

    if input_range is None and mp.input is not None:  # recorded by build (and in .dfmpc files of format 3)
        input_range = input_range_from_normalization(mp.input.mean, mp.input.std)
    if input_range is None:
        spec = REGISTRY.get(mp.arch)
        if spec is not None:
            input_range = input_range_from_normalization(spec.mean, spec.std)
        else:
            notes.append(f"w8a8: input normalisation of '{mp.arch}' unknown; input range assumed N(0, 1) +- k")

    statistics = "propagate" if bn_status(mp.module) == "identity" else "bn"
    if statistics == "propagate":
        notes.append("w8a8: the BN layers carry no statistics; activation ranges propagated from the weights")
    graph = mp.analysis().graph  # traced once per model; the ranges walk it on mp.module's modules
    try:
        return (estimate_act_ranges(mp.module, input_range=input_range, statistics=statistics, graph=graph),
                estimate_output_ranges(mp.module, input_range=input_range, statistics=statistics, graph=graph))
    except ValueError as err:
        raise DfmpcError(f"w8a8: {err}") from err


def variant_from_base(base: OnnxBase, variant: str, int4: bool = False, ranges: tuple[dict, dict] | None = None,
                      input_range=None) -> tuple[Any, list[str]]:
    """Derive one variant (see module docstring) from :func:`base_onnx_from_mp`'s model.

    Args:
        base: the traced model.
        variant: one of :data:`VARIANTS`.
        int4: INT4 storage for layers whose codes fit [-8, 7] (needs opset >= 21; applied to ``wdq`` only).
        ranges: ``(input ranges, output ranges)``, ``{fqn: ActRange}`` each, for w8a8 / w8a8_ort; default: estimated.
        input_range: normalised input ``(lo, hi)`` for the estimate (default: from ``mp.input``'s normalisation, else
            the registry's for ``mp.arch``).

    Returns:
        (onnx.ModelProto, notes). The model has passed ``onnx.checker.check_model(full_check=True)``.
    """
    onnx = require("onnx", "onnx")
    if variant not in VARIANTS:
        raise DfmpcError(f"unknown ONNX variant '{variant}': choose one of {', '.join(VARIANTS)}")
    opset = next(i.version for i in base.model.opset_import if i.domain in ("", "ai.onnx"))
    if int4 and opset < 21:
        raise DfmpcError(f"INT4 weights need opset >= 21 (got {opset}); pass opset=21")
    model = copy.deepcopy(base.model)
    notes = list(base.notes) if variant not in ("fp32", "fp16") else []
    if variant == "fp16":
        to_fp16(onnx, model)
    elif variant != "fp32":
        if variant.startswith("w8a8") and ranges is None:
            ranges = _ranges(base.mp, input_range, notes)
        if int4 and variant != "wdq":
            notes.append(f"{variant}: INT8 weights everywhere (int4 applies to wdq only: TensorRT-RTX 1.7.1 rejects "
                         f"INT4 weights with INT8 activations, Myelin CHECK(dtype == W.type()))")
        Rewriter(onnx, model, notes).quantize(base.weights, variant, int4 and variant == "wdq", ranges)
    model.producer_name = "dfmpc-deploy"
    meta = {"dfmpc.variant": variant, "dfmpc.arch": base.mp.arch, "dfmpc.notes": json.dumps(notes)}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:  # a bug in the rewrite, but say which variant
        raise DfmpcError(f"the exported '{variant}' ONNX model fails onnx.checker: {err}") from err
    return model, notes


def onnx_from_mp(mp: MixedPrecisionModel, input_shape: tuple[int, int, int], variant: str,
                 opset: int = DEFAULT_OPSET, int4: bool = False, ranges: tuple[dict, dict] | None = None,
                 input_range=None) -> tuple[Any, list[str]]:
    """In-memory export of one variant: ``(onnx.ModelProto, notes)``. Arguments as in :func:`export_onnx`."""
    return variant_from_base(base_onnx_from_mp(mp, input_shape, opset), variant, int4, ranges, input_range)


def export_onnx(mp: MixedPrecisionModel, path, input_shape: tuple[int, int, int], variant: str = "wdq",
                opset: int = DEFAULT_OPSET, int4: bool = False, ranges: tuple[dict, dict] | None = None,
                input_range=None) -> Path:
    """Write one ONNX variant of ``mp`` atomically.

    Args:
        mp: the compensated model (from :func:`dfmpc_deploy.compensate`).
        path: output ``.onnx`` file.
        input_shape: (C, H, W); the batch dimension is symbolic.
        variant: ``fp32`` | ``fp16`` | ``wdq`` | ``w8a8`` | ``w8a8_ort`` (module docstring).
        opset: ONNX opset, 13..23 (default 17, read by ONNX Runtime and TensorRT(-RTX)); 21+ for ``int4``.
        int4: in ``wdq``, store layers whose codes fit [-8, 7] (ternary, 3-bit, 4-bit int) as INT4 (the w8a8 forms
            keep INT8:
            TensorRT wants the weight and activation of a conv in the same integer type).
        ranges: ``(input ranges, output ranges)``, each ``{fqn: calib_free.ranges.ActRange}``, for the w8a8
            variants; default: estimated from the BN statistics (:mod:`calib_free.ranges`).
        input_range: ``(lo, hi)`` of the normalised input for that estimate; default: from ``mp.input`` (what
            build records, and a packed file of format 3), else the model registry's normalisation of ``mp.arch``
            (N(0, 1) for unknown models, with a note).

    Returns:
        The path written.

    Raises:
        DfmpcError: unknown variant, bad opset, untraceable model, or an export that fails onnx.checker.
        MissingDependencyError: onnx is not installed.

    Example::

        >>> mp = compensate(net, (3, 16, 16), recal="none", rounding="nearest")
        >>> export_onnx(mp, tmp_path / "m.onnx", (3, 16, 16), "w8a8")
        PosixPath('.../m.onnx')
    """
    path = Path(path)
    return export_variants(mp, path.parent, input_shape, [variant], opset, int4, ranges, input_range,
                           names={variant: path.name})[variant].path


def export_variants(mp: MixedPrecisionModel, out_dir, input_shape: tuple[int, int, int],
                    variants=VARIANTS, opset: int = DEFAULT_OPSET, int4: bool = False,
                    ranges: tuple[dict, dict] | None = None, input_range=None,
                    names: dict[str, str] | None = None) -> dict[str, OnnxExport]:
    """Trace once and write several variants as ``out_dir/model_<variant>.onnx`` (or ``names[variant]``).

    Arguments as in :func:`export_onnx`.

    Returns:
        ``{variant: OnnxExport}`` in the order of ``variants``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("export_onnx: tracing %s (opset %d) for %s", mp.arch, opset, ", ".join(variants))
    base = base_onnx_from_mp(mp, input_shape, opset)
    range_notes: list[str] = []
    if any(v.startswith("w8a8") for v in variants) and ranges is None:
        ranges = _ranges(mp, input_range, range_notes)
    res = {}
    for v in variants:
        model, notes = variant_from_base(base, v, int4, ranges, input_range)
        if v.startswith("w8a8"):
            notes = range_notes + notes
        p = out_dir / (names or {}).get(v, f"model_{v}.onnx")
        atomic_write_bytes(p, model.SerializeToString())
        res[v] = OnnxExport(p, v, p.stat().st_size, notes)
        log.info("export_onnx: wrote %s (%d bytes)", p, res[v].size_bytes)
    log.info("export_onnx: finished in %.2f s", time.perf_counter() - t0)
    return res
