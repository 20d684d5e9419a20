"""Graph rewrites behind export_onnx.py's quantized variants: weight DequantizeLinear, compensation Mul, activation
Q/DQ pairs (``wdq``, ``w8a8``, ``w8a8_ort``) and the FP16 conversion. The variants themselves are documented in
export_onnx.py; this module only edits an ``onnx.ModelProto`` in place (``onnx`` is passed in, imported lazily by
the caller).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ..errors import DfmpcError

__all__ = ["QuantizedWeight", "Rewriter", "to_fp16", "find_initializer", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME, OUTPUT_NAME = "input", "output"


class QuantizedWeight(NamedTuple):
    """One quantized Conv/Gemm weight as the rewrite stores it.

    Attributes:
        name: the float initializer it replaces in the traced graph.
        axis: its output-channel axis there (0, or 1 for a transposed MatMul weight).
        codes: int8 integer codes, weight-shaped (sign-flipped per channel where the folded scale was negative).
        scale: (out,) float32 per-output-channel scale (> 0).
        in_scale: (in,) float32 compensation scale on the layer's input (DF-MPC Eq. 7), or None.
    """

    name: str
    axis: int
    codes: np.ndarray
    scale: np.ndarray
    in_scale: np.ndarray | None


def find_initializer(onnx, inits: dict, w: np.ndarray, fqn: str) -> tuple[str, int]:
    """The exporter renamed a weight (or transposed it for MatMul): find it by value."""
    for name, t in inits.items():
        a = onnx.numpy_helper.to_array(t)
        if a.shape == w.shape and np.array_equal(a, w):
            return name, 0
        if w.ndim == 2 and a.shape == w.T.shape and np.array_equal(a, w.T):
            return name, 1
    raise DfmpcError(f"layer '{fqn}': its weight was not found among the exported ONNX initializers")


class Rewriter:
    """Inserts weight DequantizeLinear, in_scale Mul and activation Q/DQ nodes into a traced graph.

    A quantized activation tensor ``t`` gets ``Q -> DQ`` right after its producer. ``w8a8`` quantizes layer inputs,
    symmetric INT8, and only the quantized layers read the DQ output (a residual shortcut keeps the float tensor, so
    clipping is not carried down the residual stream; TensorRT runs those adds in the network's float type).
    ``w8a8_ort`` also quantizes layer outputs (after the fused ReLU where there is one), asymmetric UINT8, every
    consumer reads the DQ output, and biases are INT32 with scale ``s_x * s_w`` - the pattern ONNX Runtime fuses into
    QLinearConv / QLinearAdd.
    """

    def __init__(self, onnx, model, notes: list[str]):
        self.onnx, self.h, self.nph, self.TP = onnx, onnx.helper, onnx.numpy_helper, onnx.TensorProto
        self.g, self.notes = model.graph, notes
        self.head: list = []
        self.after: dict[int, list] = {}  # nodes to insert after original node index
        self.before: dict[int, list] = {}
        self.inits: list = []
        self.qparams: dict[str, tuple[str, float, int]] = {}  # tensor -> (dq output, scale, zero point)
        self.q_names: set[str] = set()
        self.only: dict[str, set[int]] = {}  # tensor -> the node indices that read its DQ (absent: every consumer)
        self.producer = {o: i for i, n in enumerate(self.g.node) for o in n.output}
        self.graph_outputs = {o.name for o in self.g.output}

    def consumers(self, name: str) -> list[int]:
        return [i for i, n in enumerate(self.g.node) if name in n.input]

    def quantize(self, weights: Mapping[str, QuantizedWeight], variant: str, int4: bool, ranges) -> None:
        """Rewrite the graph into ``variant`` (``wdq``, ``w8a8`` or ``w8a8_ort``; see export_onnx.py).

        Args:
            weights: ``{fqn: QuantizedWeight}`` for every quantized layer.
            variant: the target form.
            int4: store codes that fit [-8, 7] as INT4.
            ranges: ``(input ranges, output ranges)``, ``{fqn: calib_free.ranges.ActRange}`` each, or None.
        """
        ort_style = variant == "w8a8_ort"
        in_r, out_r = ranges if ranges is not None else ({}, {})
        uses: list[tuple[int, str, np.ndarray, np.ndarray | None]] = []
        missing: list[str] = []
        for fqn, (name, axis, q, s, ins) in weights.items():
            cons = self.consumers(name)
            if not cons:
                raise DfmpcError(f"layer '{fqn}': initializer '{name}' has no consumer in the exported graph")
            self.weight_dq(fqn, name, axis, q, s, int4 and int(q.max()) <= 7 and int(q.min()) >= -8)
            uses += [(idx, fqn, s, ins) for idx in cons]
        for idx, fqn, s_w, ins in sorted(uses, key=lambda u: u[0]):  # graph order
            node = self.g.node[idx]
            x = node.input[0]
            if ins is not None:
                shape = (1, len(ins), 1, 1) if node.op_type == "Conv" else (1, len(ins))
                self.inits.append(self.nph.from_array(ins.reshape(shape).astype(np.float32), f"{fqn}.in_scale"))
                self.before.setdefault(idx, []).append(
                    self.h.make_node("Mul", [x, f"{fqn}.in_scale"], [f"{fqn}.input_scaled"], name=f"{fqn}/in_scale"))
                x = node.input[0] = f"{fqn}.input_scaled"
            if not variant.startswith("w8a8"):
                continue
            if fqn not in in_r:
                missing.append(fqn)
                continue
            lo, hi = _bounds(in_r[fqn], ins)
            self.act_qdq(x, lo, hi, ort_style, place=("before", idx) if ins is not None else None)
            if not ort_style:
                self.only.setdefault(x, set()).add(idx)
            if ort_style:
                self.bias_q(idx, fqn, s_w)
                self.output_qdq(idx, fqn, out_r.get(fqn))
        if missing:
            self.notes.append(f"{variant}: no data-free range for {len(missing)} layer input(s) ("
                              f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they stay float")
        self.finish()

    def weight_dq(self, fqn: str, name: str, axis: int, q: np.ndarray, s: np.ndarray, use4: bool) -> None:
        dt = self.TP.INT4 if use4 else self.TP.INT8
        qi = self.h.make_tensor(f"{fqn}.weight_q", dt, q.shape, q.flatten().tolist() if use4 else q.tobytes(),
                                raw=not use4)
        self.inits += [qi, self.nph.from_array(s.astype(np.float32), f"{fqn}.weight_scale"),
                       self.h.make_tensor(f"{fqn}.weight_zp", dt, (len(s),), [0] * len(s))]
        self.head.append(self.h.make_node("DequantizeLinear", [qi.name, f"{fqn}.weight_scale", f"{fqn}.weight_zp"],
                                          [name], name=f"{fqn}/weight_dq", axis=axis))
        self.g.initializer.remove(next(i for i in self.g.initializer if i.name == name))

    def act_qdq(self, t: str, lo: float, hi: float, asym: bool, place=None) -> None:
        """Q/DQ on tensor ``t`` (once): symmetric INT8, or asymmetric UINT8 covering [min(lo, 0), max(hi, 0)]."""
        if t in self.qparams or t in self.graph_outputs:
            return
        if asym:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = max(hi - lo, 1e-8) / 255
            zp, dt = int(np.clip(round(-lo / scale), 0, 255)), self.TP.UINT8
        else:
            scale, zp, dt = max(abs(lo), abs(hi), 1e-8) / 127, 0, self.TP.INT8
        base = t.strip("/").replace("/", "_")
        self.inits += [self.nph.from_array(np.array(scale, np.float32), f"{base}_qscale"),
                       self.h.make_tensor(f"{base}_qzp", dt, (), [zp])]
        args = [f"{base}_qscale", f"{base}_qzp"]
        qn = self.h.make_node("QuantizeLinear", [t, *args], [f"{base}_q"], name=f"{base}/act_q")
        dq = self.h.make_node("DequantizeLinear", [f"{base}_q", *args], [f"{base}_dq"], name=f"{base}/act_dq")
        self.q_names.add(qn.name)
        if place is not None:
            self.before.setdefault(place[1], []).extend([qn, dq])
        elif t in self.producer:
            self.after.setdefault(self.producer[t], []).extend([qn, dq])
        else:  # a graph input
            self.head.extend([qn, dq])
        self.qparams[t] = (f"{base}_dq", scale, zp)

    def bias_q(self, idx: int, fqn: str, s_w: np.ndarray) -> None:
        """INT32 bias with scale s_x * s_w (ORT's QLinearConv needs every input to come from a DQ)."""
        node = self.g.node[idx]
        if len(node.input) < 3 or not node.input[2] or node.input[0] not in self.qparams:
            return
        init = next((i for i in self.g.initializer if i.name == node.input[2]), None)
        if init is None:
            return
        s_b = (self.qparams[node.input[0]][1] * s_w.astype(np.float64))
        b = self.nph.to_array(init).astype(np.float64)
        qb = np.clip(np.round(b / s_b), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        self.inits += [self.nph.from_array(qb, f"{fqn}.bias_q"),
                       self.nph.from_array(s_b.astype(np.float32), f"{fqn}.bias_scale"),
                       self.nph.from_array(np.zeros(len(qb), np.int32), f"{fqn}.bias_zp")]
        self.head.append(self.h.make_node("DequantizeLinear", [f"{fqn}.bias_q", f"{fqn}.bias_scale", f"{fqn}.bias_zp"],
                                          [f"{fqn}.bias_dq"], name=f"{fqn}/bias_dq", axis=0))
        node.input[2] = f"{fqn}.bias_dq"

    def output_qdq(self, idx: int, fqn: str, r) -> None:
        """Q/DQ on a layer's output: after its ReLU/Clip when the range includes the activation."""
        if r is None:
            return
        y = self.g.node[idx].output[0]
        cons = self.consumers(y)
        with_act = r.source.endswith("+act")
        if with_act and len(cons) == 1 and self.g.node[cons[0]].op_type in ("Relu", "Clip"):
            y = self.g.node[cons[0]].output[0]
        elif with_act or not cons:
            return
        lo, hi = _bounds(r, None)
        self.act_qdq(y, lo, hi, True)

    def finish(self) -> None:
        """Rewire consumers of quantized tensors to the DQ outputs, order the nodes, drop unused initializers."""
        nodes = list(self.g.node)
        out = list(self.head)

        def rewire(n, i: int | None) -> None:
            n.input[:] = [self.qparams[x][0] if x in self.qparams and (x not in self.only or i in self.only[x])
                          else x for x in n.input]

        for i, n in enumerate(nodes):
            for m in self.before.get(i, []) + self.after.get(i, []):
                if m.name not in self.q_names:
                    rewire(m, None)
            rewire(n, i)
            out += self.before.get(i, []) + [n] + self.after.get(i, [])
        del self.g.node[:]
        self.g.node.extend(out)
        used = {x for n in out for x in n.input}
        kept = [i for i in list(self.g.initializer) + self.inits if i.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(kept)


def _bounds(r, ins: np.ndarray | None) -> tuple[float, float]:
    """Per-tensor (lo, hi) of a layer input, after the in_scale Mul when there is one (in_scale > 0)."""
    lo, hi = r.lo.numpy(), r.hi.numpy()
    if ins is not None:
        f = np.abs(ins.astype(np.float64)) if ins.shape == lo.shape else float(np.abs(ins).max())
        lo, hi = lo * f, hi * f
    return float(lo.min()), float(hi.max())


def to_fp16(onnx, model) -> None:
    """Every float32 tensor to float16; a Cast at the graph input and output keeps the I/O in FP32."""
    h, nph, TP = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    g = model.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TP.FLOAT:
            g.initializer[i].CopyFrom(nph.from_array(nph.to_array(t).astype(np.float16), t.name))
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TP.FLOAT:
                a.t.CopyFrom(nph.from_array(nph.to_array(a.t).astype(np.float16), a.t.name))
            if n.op_type == "Cast" and a.name == "to" and a.i == TP.FLOAT:
                a.i = TP.FLOAT16
    del g.value_info[:]
    for n in g.node:
        n.input[:] = [f"{INPUT_NAME}_fp16" if x == INPUT_NAME else x for x in n.input]
        n.output[:] = [f"{OUTPUT_NAME}_fp16" if x == OUTPUT_NAME else x for x in n.output]
    cast_in = h.make_node("Cast", [INPUT_NAME], [f"{INPUT_NAME}_fp16"], name="input_to_fp16", to=TP.FLOAT16)
    cast_out = h.make_node("Cast", [f"{OUTPUT_NAME}_fp16"], [OUTPUT_NAME], name="output_to_fp32", to=TP.FLOAT)
    nodes = [cast_in, *g.node, cast_out]
    del g.node[:]
    g.node.extend(nodes)
