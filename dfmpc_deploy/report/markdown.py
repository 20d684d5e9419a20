"""report.md: the human summary of a :class:`Report`, rendered from the typed object.

Every string that comes from the build (model, paths, layer names, notes, ...) goes through :func:`md_text`:
control characters (terminal escape sequences) are shown as ``\\x1b``, HTML is escaped (Markdown renderers pass it
through) and ``|`` cannot break a table.
"""
from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .model import LayerRow, Report

__all__ = ["render_markdown", "md_text", "visible", "fmt_bytes", "fmt_num"]


def visible(s: Any, keep: str = " ") -> str:
    """``str(s)`` with control and other non-printable characters (C0, DEL, C1, ...) shown as ``\\xNN`` escapes.

    Args:
        s: anything.
        keep: whitespace characters to keep as they are (a space always; ``"\\n\\t "`` for HTML).
    """
    s = str(s)
    return "".join(c if c.isprintable() or c in keep else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else
                    f"\\U{ord(c):08x}") for c in s)


def md_text(s: Any) -> str:
    """Safe inside Markdown text and table cells: visible control characters, escaped HTML, escaped ``|``."""
    return html.escape(visible(s), quote=False).replace("|", "\\|")


def fmt_bytes(n: float) -> str:
    """``1.084 MB`` / ``24.4 kB``."""
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def fmt_num(v: float, digits: int = 3) -> str:
    """About ``digits`` significant digits, no exponent for ordinary magnitudes."""
    if v == 0:
        return "0"
    if abs(v) >= 10 ** (digits + 3) or abs(v) < 1e-3:
        return f"{v:.{digits}g}"
    import math

    d = max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))
    return f"{v:.{d}f}"


def _json_inline(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _kv(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{md_text(k)}={md_text(_json_inline(v))}" for k, v in d.items()) or "(none)"


def _table(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    head = list(head)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _header(rep: Report) -> list[str]:
    b = rep.bits
    lines = [f"# dfmpc-deploy build: {md_text(rep.model)}", ""]
    if rep.random_weights:
        lines += ["> **RANDOM weights: accuracy is meaningless.** The build used seeded random weights; sizes, "
                  "latency and export are real.", ""]
    lines.append(f"- weights: {md_text(rep.weights)}")
    if rep.allocation is not None:
        a = rep.allocation
        hist = ", ".join(f"{n} layers at {md_text(k)} bits" for k, n in a.bits_histogram.items())
        lines.append(f"- bits: {b.display()}, chosen per layer by data-free sensitivity within {a.budget_bytes} "
                     f"bytes: {hist} (2 = ternary; activations FP32)")
    elif b.mixed:
        lines.append(f"- bits: {b.display()}, chosen per layer (2 = ternary; activations FP32)")
    else:
        lines.append(f"- bits: {b.display()}  (low = {b.low_name}, high = {b.high_name}; activations FP32; "
                     f"{b.avg_code_bits:.2f} code bits/weight)")
    r = rep.recipe
    lines.append(f"- method: {md_text(r.name)}: {md_text(r.description)} (data used: {r.data_used}; fine-tuning: "
                 f"{'yes' if r.fine_tuning else 'no'})")
    if rep.statistics is not None:
        s = rep.statistics
        lines.append(f"- BN statistics: model carries {s.bn} statistics; estimator: {md_text(s.estimator)}")
        if s.synthesis is not None:
            y = s.synthesis
            lines.append(f"- synthesis: {y.samples} samples at {y.resolution} px, {y.steps_run}/{y.steps_max} steps"
                         f"{' (stopped early)' if y.stopped_early else ''}, loss {fmt_num(y.loss_initial)} -> "
                         f"{fmt_num(y.loss_final)}, {fmt_num(y.seconds)} s")
    if rep.runtime is not None:
        lines.append(f"- runtime: torch {md_text(rep.runtime.torch)} on {rep.runtime.device}, "
                     f"{rep.runtime.threads} threads")
    p = rep.preprocessing
    lines.append(f"- input: {'x'.join(map(str, rep.input_shape))}, mean {list(p.mean)}, std {list(p.std)}, "
                 f"resize {p.resize if p.resize is not None else 'none'}")
    if rep.targets:
        lines.append(f"- targets: {', '.join(md_text(t) for t in rep.targets)}")
    return lines


def _recipe(rep: Report) -> list[str]:
    lines = ["", f"## Recipe: {md_text(rep.recipe.name)}", ""]
    lines += _table(["#", "pass", "seconds"], ((i, md_text(p.name), fmt_num(p.seconds))
                                                for i, p in enumerate(rep.recipe.passes, 1)))
    for i, p in enumerate(rep.recipe.passes, 1):
        lines += ["", f"{i}. **{md_text(p.name)}** config: {_kv(p.config)}"]
        if p.info:
            lines.append(f"   info: {_kv(p.info)}")
    return lines


def _pairs(rep: Report) -> list[str]:
    if rep.pairs is None:
        return []
    lines = ["", "## Layer pairs (low-bit -> compensating high-bit)", ""]
    if not rep.pairs:
        return lines + ["No (low, high) pairs in this graph: every layer is high-bit."]
    return lines + _table(["low", "high", "BN", "activation"],
                          ((md_text(p.low), md_text(p.high), md_text(p.bn) if p.bn is not None else "-",
                            md_text(p.act)) for p in rep.pairs))


def _accuracy(rep: Report) -> list[str]:
    acc = rep.accuracy
    if acc is None:
        return ["", "## Accuracy", "", "Not measured (no --data)."]
    lines = ["", f"## Accuracy on {md_text(acc.dataset)} (n = {acc.n})", ""]
    if rep.random_weights:
        lines += ["Random weights: these accuracies are meaningless.", ""]
    return lines + _table(["model", "top-1 %", "top-5 %", "n"],
                          ((md_text(k), f"{v.top1:.2f}", f"{v.top5:.2f}", v.n) for k, v in acc.results.items()))


def _sizes(rep: Report) -> list[str]:
    s = rep.size_bytes
    rows: list[tuple[str, int]] = [("fp32", s.fp32)]
    if s.packed is not None:
        rows += [("packed", s.packed.packed), *s.packed.parts, ("theoretical", s.packed.theoretical),
                 ("theoretical_min", s.packed.theoretical_min)]
    rows += [(f"onnx_{k}", v) for k, v in s.onnx.items()]
    rows += [(f"engine {k}", v) for k, v in (s.engine or {}).items()]
    lines = ["", "## Size", ""] + _table(["artifact", "bytes", ""], ((md_text(k), v, fmt_bytes(v)) for k, v in rows))
    if rep.packing is not None:
        k = rep.packing
        lines += ["", f"Packed: {k.compression:.2f}x smaller than FP32, {k.bits_per_weight:.3f} code bits per weight "
                      f"({k.bits_per_weight_theoretical:.3f} nominal, {k.bits_per_weight_min:.3f} with ternary at "
                      f"log2 3), {k.weights} quantized weights."]
    return lines


def _latency(rep: Report) -> list[str]:
    if not rep.latency_ms:
        return ["", "## Latency", "", "Not measured (no latency targets)."]
    lines = ["", "## Latency (ms)", ""]
    rows, skipped = [], []
    speed = rep.speedup or {}
    for tgt, per_var in rep.latency_ms.items():
        if isinstance(per_var, str):
            skipped.append(f"- {md_text(tgt)}: {md_text(per_var)}")
            continue
        if not per_var:
            skipped.append(f"- {md_text(tgt)}: nothing measured")
        for var, per_b in per_var.items():
            for b, st in per_b.items():
                sp = speed.get(tgt, {}).get(var, {}).get(b)
                rows.append((md_text(tgt), md_text(var), b, f"{st.p50:.3f}", f"{st.p90:.3f}", f"{st.p99:.3f}",
                             f"{st.mean:.3f}", st.iters, f"{sp:.2f}x" if sp is not None else ""))
    if rows:
        lines += _table(["target", "variant", "batch", "p50", "p90", "p99", "mean", "iters", "speed-up"], rows)
    if rep.threads:
        lines += ["", "Threads: " + ", ".join(f"{md_text(k)} {v}" for k, v in rep.threads.items()) + "."]
    return lines + ([""] + skipped if skipped else [])


def _parity(rep: Report) -> list[str]:
    if not rep.parity:
        return []
    mark = {True: "pass", False: "FAIL", None: "by top-1"}
    return ["", "## Parity with the PyTorch model", ""] + _table(
        ["artifact", "max abs diff", "max abs ref", "top-1 agreement", "n", "check"],
        ((md_text(k), fmt_num(p.max_abs_diff), fmt_num(p.max_abs_ref), fmt_num(p.top1_agreement), p.n, mark[p.ok])
         for k, p in rep.parity.items()))


def _engine(rep: Report) -> list[str]:
    e = rep.engine
    if e is None:
        return []
    if isinstance(e, str):
        return ["", "## TensorRT engines", "", md_text(e)]
    return ["", "## TensorRT engines", "", f"Backend: {md_text(e.backend)}", ""] + _table(
        ["variant", "build s", "bytes", "weight-stripped", "file"],
        ((md_text(v), fmt_num(b.build_seconds), b.size_bytes, "yes" if b.stripped else "no", md_text(b.path))
         for v, b in e.builds.items()))


def _layers(rows: tuple[LayerRow, ...]) -> list[str]:
    lines = ["", f"## Layers ({len(rows)})", ""]
    return lines + _table(
        ["layer", "kind", "role", "bits", "shape", "params", "partner", "c mean (min..max)", "zero frac."],
        ((md_text(r.layer), md_text(r.kind), r.role, r.bits, "x".join(map(str, r.shape)), r.params,
          md_text(r.partner) if r.partner is not None else "",
          f"{r.c_mean} ({r.c_min}..{r.c_max}){' folded' if r.c_folded else ''}" if r.has_c else "",
          f"{r.zero_fraction:.3f}" if r.zero_fraction is not None else "") for r in rows))


def render_markdown(rep: Report) -> str:
    """report.md for ``rep``: header, recipe, pairs, accuracy, sizes, latency, parity, engines, timings, layers,
    notes. Sections a build did not produce say so in one line."""
    if not isinstance(rep, Report):
        raise TypeError(f"render_markdown: expected a Report, got {type(rep).__name__}")
    lines = _header(rep) + _recipe(rep) + _pairs(rep) + _accuracy(rep) + _sizes(rep) + _latency(rep)
    lines += _parity(rep) + _engine(rep)
    lines += ["", "## Stage timings (s)", ""] + [f"- {md_text(k)}: {fmt_num(v)}" for k, v in rep.timings_s.items()]
    lines += _layers(rep.layers)
    if rep.artifacts:
        lines += ["", "## Artifacts", ""] + [f"- {md_text(k)}: {md_text(v)}" for k, v in rep.artifacts.items()]
    if rep.notes:
        lines += ["", "## Notes", ""] + [f"- {md_text(n)}" for n in rep.notes]
    return "\n".join(lines) + "\n"
