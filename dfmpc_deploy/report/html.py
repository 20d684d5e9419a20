"""report.html for a build: one self-contained page (inline CSS and SVG, no scripts, no external resources).

:func:`render_html` takes a :class:`~dfmpc_deploy.report.model.Report` and draws

* a header (model, bits, method, statistics, runtime, weights) with a banner for random weights, and summary cards,
* size bars (FP32 state dict, packed ``.dfmpc`` with its composition, every ONNX file, every engine),
* top-1 bars for every model in ``accuracy``,
* latency per target and batch size (p50 bars, p90 whiskers, speed-up against fp32) and its table,
* the recipe (each pass with its time, exact configuration and diagnostics), BN statistics and synthesis,
* the layer pairs, a per-layer chart (bits coloured by role, compensation c min..mean..max, zero fraction of the
  ternary layers: one row per layer, so ResNet-152's ~150 layers stay legible) and the layer table,
* parity, stage timings, configuration (preprocessing, packing, allocation, engines, artifacts), notes and the raw
  report.json.

A section the build did not produce degrades to one sentence. Every string from the report is HTML-escaped with
its control characters made visible (:func:`dfmpc_deploy.report._svg.esc`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._style import CSS, EXTRA_COLORS, PACK_COLORS, ROLE_COLORS, ROLE_LABELS, TARGET_NAMES, VARIANT_COLORS
from ._svg import Bar, esc, fmt_num, hbars, legend, mb, ms, sec, short_name, svg, text, tick, ticks
from .model import LayerRow, Report

__all__ = ["render_html"]



def _color(key: str, i: int = 0) -> str:
    return VARIANT_COLORS.get(key, EXTRA_COLORS[i % len(EXTRA_COLORS)])


def _kv_table(d: Mapping[str, Any]) -> str:
    rows = [f"<tr><th>{esc(k)}</th><td>{esc(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))}</td>"
            "</tr>" for k, v in d.items()]
    return '<table class="kv"><tbody>' + "".join(rows) + "</tbody></table>" if rows else ""


def _missing(msg: str) -> str:
    return f'<p class="missing">{esc(msg)}</p>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def _grid(head: list[str], rows: list[list[tuple[str, str]]], cls: str = "grid") -> str:
    """A table; each cell is (text, css class), or (html, "raw") for pre-escaped markup."""
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" if c == "raw" else f'<td class="{c}">{esc(v)}</td>'
                                    for v, c in r) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{body}</tbody></table></div>")


# ---------------------------------------------------------------------------------------------- header, summary


def _header(rep: Report) -> str:
    b, r = rep.bits, rep.recipe
    parts = [f'<header><h1>dfmpc-deploy build: <span class="model">{esc(rep.model)}</span></h1>']
    if rep.random_weights:
        parts.append('<div class="banner" role="alert"><strong>RANDOM WEIGHTS</strong> &mdash; this build used '
                     'seeded random weights: sizes, latency and export are real, accuracy is meaningless.</div>')
    bits = (f"{b.display()} (per-layer allocation; 2 = ternary)" if b.mixed else
            f"{b.display()} (low = {b.low_name}, high = {b.high_name}; activations FP32)")
    meta = [("bits", bits), ("code bits per weight", f"{b.avg_code_bits:.3f}"),
            ("method", f"{r.name}: {r.description}"),
            ("data used", r.data_used + (", fine-tuned" if r.fine_tuning else ", no fine-tuning")),
            ("weights", rep.weights)]
    if rep.statistics is not None:
        meta += [("BN statistics", f"model carries {rep.statistics.bn} statistics"),
                 ("statistics estimator", rep.statistics.estimator)]
    if rep.runtime is not None:
        meta.append(("runtime", f"torch {rep.runtime.torch}, {rep.runtime.device}, {rep.runtime.threads} threads"))
    meta.append(("input shape", "x".join(map(str, rep.input_shape))))
    if rep.targets:
        meta.append(("targets", ", ".join(rep.targets)))
    meta.append(("report format", str(rep.format_version)))
    parts.append('<dl class="meta">' + "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in meta)
                 + "</dl></header>")
    return "".join(parts)


def _summary(rep: Report) -> str:
    s = rep.size_bytes
    cards = [("FP32 size", mb(s.fp32), "state dict, 4 bytes per float")]
    if s.packed is not None:
        ratio = rep.packing.compression if rep.packing is not None else (s.fp32 / s.packed.packed
                                                                        if s.packed.packed else None)
        cards.append(("packed size", mb(s.packed.packed),
                      f"{ratio:.2f}\u00d7 smaller than FP32" if ratio else ".dfmpc file"))
    if rep.packing is not None:
        cards.append(("bits per weight", f"{rep.packing.bits_per_weight:.2f}", "packed codes per quantized weight"))
    acc = rep.accuracy
    if acc is not None and "fp32" in acc.results:
        got = acc.results.get(rep.method) or acc.results.get("quantized_uncompensated")
        if got is not None:
            ref = acc.results["fp32"]
            cards.append(("top-1", f"{got.top1:.2f} %", f"FP32 {ref.top1:.2f} %, {got.top1 - ref.top1:+.2f} points"))
    n_low = sum(1 for r in rep.layers if r.role == "low")
    cards.append(("layers", str(len(rep.layers)), f"{n_low} low-bit, {len(rep.layers) - n_low} high-bit"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div><div class="s">{esc(t)}</div>'
        f'</div>' for k, v, t in cards) + "</div>"


# ---------------------------------------------------------------------------------------------- measurements


def _size_section(rep: Report) -> str:
    s = rep.size_bytes
    fp32 = s.fp32

    def bar(label: str, v: int, color: str, opacity: float = 1.0, parts=None, ratio: bool = True) -> Bar:
        lab = mb(v) + (f" ({fp32 / v:.2f}\u00d7)" if ratio and fp32 and v > 0 else "")
        return Bar(label, float(v), color, lab, f"{label}: {v} bytes", opacity=opacity, parts=parts)

    rows = [bar("FP32 (state dict)", fp32, VARIANT_COLORS["fp32"], ratio=False)]
    full = False
    if s.packed is not None:
        parts = [(float(v), PACK_COLORS[k][1], PACK_COLORS[k][0]) for k, v in s.packed.parts]
        full = sum(v for _, v in s.packed.parts) == s.packed.packed
        rows.append(bar("packed .dfmpc", s.packed.packed, VARIANT_COLORS["packed"], parts=parts if full else None))
    rows += [bar(f"ONNX {k}", v, _color(k, i)) for i, (k, v) in enumerate(s.onnx.items())]
    rows += [bar(f"TensorRT engine {k}", v, _color(k, i), opacity=0.45) for i, (k, v) in enumerate((s.engine or {})
                                                                                                 .items())]
    vals = [r.value for r in rows if r.value > 0]
    log = bool(vals) and max(vals) / min(vals) > 200
    body = [hbars(rows, title="file sizes", fmt=mb, tick_fmt=lambda t: tick(t / 1e6), log=log, right_w=170,
                  axis_label="MB" + (" (log scale)" if log else ""))]
    cap = "Bar labels: size and FP32 / size." + (" Engines are drawn lighter." if s.engine else "")
    if full:
        cap += " The packed bar is split into its parts."
    if s.packed is not None:
        cap += (f" Theoretical size (codes at their bit widths): {mb(s.packed.theoretical)}, with log2(3)-bit "
                f"ternary codes: {mb(s.packed.theoretical_min)}.")
    body.append(f'<p class="cap">{esc(cap)}</p>')
    if full:
        body.append(legend(PACK_COLORS[k] for k, _ in s.packed.parts))  # type: ignore[union-attr]
    flat = s.to_dict()
    flat.update({f"engine {k}": v for k, v in flat.pop("engine", {}).items()})
    table = "".join(f"<tr><th>{esc(k)}</th><td class='r'>{esc(v)}</td><td class='r'>{esc(mb(v))}</td></tr>"
                    for k, v in flat.items())
    packing = _kv_table(rep.packing.to_dict()) if rep.packing is not None else ""
    body.append(f'<details><summary>all size entries (bytes)</summary><table class="kv"><tbody>{table}</tbody>'
                f'</table>{packing}</details>')
    return _section("size", "Size", "".join(body))


def _acc_label(k: str, method: str) -> str:
    fixed = {"fp32": "FP32 original", "quantized_uncompensated": "quantized, uncompensated",
             "torch_fp32": "PyTorch FP32", "torch_fakequant": "PyTorch fake-quant"}
    if k in fixed:
        return fixed[k]
    if k == method:
        return f"{k} (compensated)"
    return f"ONNX Runtime {k[5:]}" if k.startswith("onnx_") else k


def _acc_color(k: str, method: str, i: int) -> str:
    if k in ("fp32", "torch_fp32"):
        return VARIANT_COLORS["fp32"]
    if k == "quantized_uncompensated":
        return "#d64550" if method != "rtn" else "#3b6fb6"
    if k in (method, "torch_fakequant"):
        return "#58a55c"
    return _color(k[5:], i) if k.startswith("onnx_") else EXTRA_COLORS[i % len(EXTRA_COLORS)]


def _accuracy_section(rep: Report) -> str:
    acc = rep.accuracy
    if acc is None or not acc.results:
        return _section("accuracy", "Accuracy", _missing("No accuracy measured (build without --data)."))
    rows = []
    for i, (k, v) in enumerate(acc.results.items()):
        label = f"{v.top1:.2f} %  (top-5 {v.top5:.2f})" + (f"  n={v.n}" if v.n != acc.n else "")
        rows.append(Bar(_acc_label(k, rep.method), v.top1, _acc_color(k, rep.method, i), label,
                        f"{k}: top-1 {v.top1} %, top-5 {v.top5} %, n = {v.n}"))
    fp = acc.results["fp32"].top1 if "fp32" in acc.results else None
    chart = hbars(rows, title="top-1 accuracy", fmt=lambda t: f"{t:.0f}", xmax=100.0, axis_label="top-1 %",
                  ref=(fp, f"FP32 top-1 {fp} %") if fp is not None else None)
    head = (f'<p class="cap">Top-1 on <code>{esc(acc.dataset)}</code>, n = {acc.n}'
            + (". Dashed line: FP32 original.</p>" if fp is not None else ".</p>"))
    warn = '<p class="warn">Random weights: these accuracies are meaningless.</p>' if rep.random_weights else ""
    return _section("accuracy", "Accuracy", warn + head + chart)


def _latency_section(rep: Report) -> str:
    if not rep.latency_ms:
        return _section("latency", "Latency",
                        _missing("No latency measured (no --targets ort / trt / torch-cuda, or not run)."))
    speed, threads = rep.speedup or {}, rep.threads or {}
    body = []
    for tgt, per_var in rep.latency_ms.items():
        title = TARGET_NAMES.get(tgt, tgt) + (f", {threads[tgt]} threads" if tgt in threads else "")
        body.append(f"<h3>{esc(title)}</h3>")
        if isinstance(per_var, str):
            body.append(_missing(per_var))
            continue
        if not per_var:
            body.append(_missing("nothing measured"))
            continue
        batches = sorted({b for per_b in per_var.values() for b in per_b}, key=int)
        panels, table = [], []
        for b in batches:
            rows = []
            for i, (var, per_b) in enumerate(per_var.items()):
                st = per_b.get(b)
                if st is None:
                    continue
                sp = speed.get(tgt, {}).get(var, {}).get(b)
                rows.append(Bar(var, st.p50, _color(var, i), ms(st.p50) + (f" ({sp:.2f}\u00d7)" if sp else ""),
                                f"{var}, batch {b}: p50 {st.p50} ms, p90 {st.p90} ms", hi=st.p90))
                table.append([(var, ""), (b, "r"), *((fmt_num(x), "r") for x in (st.p50, st.p90, st.p99, st.mean)),
                              (str(st.iters), "r"), (f"{sp:.2f}x" if sp is not None else "", "r")])
            chart = hbars(rows, title=f"{tgt} latency batch {b}", width=430, right_w=120, axis_label="ms", label_w=90)
            panels.append(f'<figure class="panel"><figcaption>batch {esc(b)}</figcaption>{chart}</figure>')
        body.append('<div class="panels">' + "".join(panels) + "</div>")
        body.append(f"<details><summary>{esc(tgt)} latency table</summary>"
                    + _grid(["variant", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "iters", "speed-up"], table)
                    + "</details>")
    cap = ('<p class="cap">Bars: p50 (median) per batch; whisker: p90. Right of the bar: p50 and, where measured, '
           'the speed-up over the fp32 variant at the same batch size (fp32 p50 / p50).</p>')
    return _section("latency", "Latency", cap + "".join(body))


# ---------------------------------------------------------------------------------------------- layers


def _layer_chart(layers: tuple[LayerRow, ...]) -> str:
    """One row per layer (name left, then bits / c / zero-fraction panels side by side): legible at any depth."""
    pitch, width = 16, 1080
    names = [short_name(r.layer, 44) for r in layers]
    label_w = min(300.0, 16 + 6.3 * max(len(n) for n in names))
    has_c = any(r.has_c for r in layers)
    has_z = any(r.zero_fraction is not None for r in layers)
    bmax = float(max(8, max(r.bits for r in layers)))
    cvals = [v for r in layers if r.has_c for v in (r.c_min, r.c_max)]
    cmax = min(max([1.0, *[v for v in cvals if v is not None]]) * 1.08, 1e300)
    panels = [("bits", "bits (colour = role)", bmax)] + ([("c", "c: min..max, dot = mean, dashed = 1", cmax)]
                                                         if has_c else []) + (
        [("zero", "zero fraction (ternary)", 1.0)] if has_z else [])
    gap = 22.0
    pw = (width - label_w - 10 - 16 - gap * (len(panels) - 1)) / len(panels)
    top = 40
    height = top + pitch * len(layers) + 24
    out = []
    for i in range(0, len(layers), 2):  # row stripes
        out.append(f'<rect x="0" y="{top + i * pitch:.1f}" width="{width}" height="{pitch}" fill="#f6f7f9"/>')
    for pi, (kind, title, vmax) in enumerate(panels):
        x0 = label_w + 10 + pi * (pw + gap)

        def sx(v: float, x0: float = x0, vmax: float = vmax) -> float:
            return x0 + pw * min(max(v, 0.0), vmax) / vmax

        out.append(text(x0, 14, title, 11, "start", "#444", ' font-weight="600"'))
        tks = [t for t in ([0, 2, 4, 6, 8] if kind == "bits" and vmax <= 8 else ticks(vmax, 4)) if t <= vmax + 1e-9]
        for t in tks:
            x = sx(t)
            out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 20}" stroke="#e0e0e0"/>')
            out.append(text(x, top - 8, tick(t), 10, "middle", "#666"))
            out.append(text(x, height - 6, tick(t), 10, "middle", "#666"))
        if kind == "c":
            out.append(f'<line x1="{sx(1.0):.1f}" y1="{top - 4}" x2="{sx(1.0):.1f}" y2="{height - 20}" stroke="#555" '
                       'stroke-dasharray="4 3"/>')
        for i, r in enumerate(layers):
            y, color = top + i * pitch, ROLE_COLORS[r.role]
            cy = y + pitch / 2
            if kind == "bits":
                out.append(f'<rect x="{x0:.1f}" y="{y + 3:.1f}" width="{sx(r.bits) - x0:.1f}" height="{pitch - 6}" '
                           f'fill="{color}"><title>{esc(r.layer)}: {r.bits} bits, {r.role}, {r.params:,} params'
                           f'</title></rect>')
                out.append(text(sx(r.bits) + 4, cy + 4, str(r.bits), 10, "start", "#444"))
            elif kind == "c" and r.has_c:
                lo, mean, hi = r.c_min or 0.0, r.c_mean or 0.0, r.c_max or 0.0
                out.append(f"<g><title>{esc(r.layer)}: c mean {mean}, min {lo}, max {hi}"
                           f"{', folded' if r.c_folded else ''}</title>"
                           f'<rect x="{sx(lo):.1f}" y="{y + 4:.1f}" width="{max(sx(hi) - sx(lo), 1):.1f}" '
                           f'height="{pitch - 8}" fill="{color}" fill-opacity="0.35" stroke="{color}"/>'
                           f'<circle cx="{sx(mean):.1f}" cy="{cy:.1f}" r="3.2" fill="{color}" stroke="#222" '
                           f'stroke-width="0.8"/></g>')
            elif kind == "zero" and r.zero_fraction is not None:
                z = r.zero_fraction
                out.append(f'<rect x="{x0:.1f}" y="{y + 3:.1f}" width="{sx(z) - x0:.1f}" height="{pitch - 6}" '
                           f'fill="{color}" fill-opacity="0.75"><title>{esc(r.layer)}: zero fraction {z}</title>'
                           "</rect>")
                out.append(text(sx(z) + 4, cy + 4, f"{z:.2f}", 10, "start", "#444"))
    for i, (r, n) in enumerate(zip(layers, names)):
        out.append(f'<text x="{label_w:.1f}" y="{top + i * pitch + pitch / 2 + 4:.1f}" font-size="11" '
                   f'text-anchor="end" fill="#222"><title>{esc(r.layer)}</title>{esc(n)}</text>')
    return svg(width, height, out, "per-layer bits, compensation coefficients and zero fractions", cls="layers")


def _layers_section(rep: Report) -> str:
    layers = rep.layers
    if not layers:
        return _section("layers", "Layers", _missing("No quantized layers."))
    roles = [r for r in ROLE_COLORS if any(x.role == r for x in layers)]
    body = [legend((ROLE_LABELS[r], ROLE_COLORS[r]) for r in roles), _layer_chart(layers)]
    folded = {r.c_folded for r in layers if r.has_c}
    if folded == {False}:
        body.append('<p class="cap">c is solved for every low-bit layer but not folded into this model '
                    "(compensation off).</p>")
    elif folded == {True}:
        body.append('<p class="cap">c is folded into the deployed model.</p>')
    has_c, has_z = bool(folded), any(r.zero_fraction is not None for r in layers)
    head = ["#", "layer", "kind", "role", "bits", "format", "shape", "params", "partner"] + (
        ["c mean (min..max)"] if has_c else []) + (["zero frac."] if has_z else [])
    rows = []
    for i, r in enumerate(layers):
        cells = [(str(i), "r"), (r.layer, "name"), (r.kind, ""),
                 (f'<i class="chip" style="background:{ROLE_COLORS[r.role]}"></i>{esc(r.role)}', "raw"),
                 (str(r.bits), "r"), (r.format, ""), ("x".join(map(str, r.shape)), ""), (f"{r.params:,}", "r"),
                 (r.partner or "", "name")]
        if has_c:
            cells.append((f"{r.c_mean} ({r.c_min}..{r.c_max})" + (" folded" if r.c_folded else "")
                          if r.has_c else "", "r"))
        if has_z:
            cells.append((f"{r.zero_fraction:.3f}" if r.zero_fraction is not None else "", "r"))
        rows.append(cells)
    body.append(_grid(head, rows, "grid layers"))
    return _section("layers", "Layers", "".join(body))


def _pairs_section(rep: Report) -> str:
    if rep.pairs is None:
        return _section("pairs", "Layer pairs", _missing("Layer pairs were not recorded (report converted from "
                                                         "format 1)."))
    if not rep.pairs:
        return _section("pairs", "Layer pairs", _missing("No (low, high) pairs in this graph: every layer is "
                                                         "high-bit."))
    cap = ('<p class="cap">Pairs found in the traced graph: the low-bit layer feeds the compensating high-bit layer '
           "through its BatchNorm and activation.</p>")
    table = _grid(["#", "low-bit layer", "compensating high-bit layer", "BN", "activation"],
                  [[(str(i), "r"), (p.low, "name"), (p.high, "name"), (p.bn or "\u2014", "name"), (p.act, "")]
                   for i, p in enumerate(rep.pairs)])
    if len(rep.pairs) > 24:  # deep models: keep the page navigable
        table = f"<details><summary>all {len(rep.pairs)} pairs</summary>{table}</details>"
    return _section("pairs", f"Layer pairs ({len(rep.pairs)})", cap + table)


# ---------------------------------------------------------------------------------------------- how it was built


def _recipe_section(rep: Report) -> str:
    r = rep.recipe
    cap = (f'<p class="cap"><code>{esc(r.name)}</code>: {esc(r.description)}. Data used: {esc(r.data_used)}; '
           f"{'weights fine-tuned' if r.fine_tuning else 'no fine-tuning'}.</p>")
    chart = hbars([Bar(p.name, p.seconds, "#a3b7d9", sec(p.seconds)) for p in r.passes], title="pass timings",
                  axis_label="seconds", right_w=90, width=720)
    cols = "".join(f"<div><h3>{i}. {esc(p.name)} <small>({esc(sec(p.seconds))})</small></h3>"
                   + (_kv_table(p.config) or _missing("no configuration"))
                   + (f"<h4>reported</h4>{_kv_table(p.info)}" if p.info else "") + "</div>"
                   for i, p in enumerate(r.passes, 1))
    return _section("recipe", f"Recipe: {r.name} ({len(r.passes)} pass{'' if len(r.passes) == 1 else 'es'})",
                    cap + chart + f'<div class="cols">{cols}</div>')


def _statistics_section(rep: Report) -> str:
    s, body = rep.statistics, ""
    if s is None:
        body += _missing("BN statistics: not recorded (report converted from format 1).")
    else:
        body += _kv_table({"model BN layers carry": s.bn, "estimator": s.estimator})
        if s.synthesis is None:
            body += _missing("No inputs were synthesised.")
        else:
            y = s.synthesis
            body += "<h3>input synthesis</h3>" + _kv_table({
                "samples": y.samples, "resolution": f"{y.resolution} px",
                "steps": f"{y.steps_run} of {y.steps_max}" + (" (stopped early)" if y.stopped_early else ""),
                "loss": f"{fmt_num(y.loss_initial)} \u2192 {fmt_num(y.loss_final)}", "time": sec(y.seconds)})
    if rep.runtime is None:
        body += _missing("Runtime: not recorded (report converted from format 1).")
    else:
        body += "<h3>runtime</h3>" + _kv_table(rep.runtime.to_dict())
    return _section("statistics", "BN statistics and runtime", body)


def _parity_section(rep: Report) -> str:
    if not rep.parity:
        return ""
    mark = {True: ("ok", "pass"), False: ("bad", "FAIL"), None: ("na", "by top-1")}
    rows = [[(k, "name"), *((fmt_num(v), "r") for v in (p.max_abs_diff, p.max_abs_ref, p.top1_agreement)),
             (str(p.n), "r"), (mark[p.ok][1], mark[p.ok][0])] for k, p in rep.parity.items()]
    return _section("parity", "Parity with the PyTorch model",
                    _grid(["artifact", "max |diff|", "max |ref|", "top-1 agreement", "n", "check"], rows))


def _timings_section(rep: Report) -> str:
    if not rep.timings_s:
        return _section("timings", "Stage timings", _missing("No stage timings in this report."))
    return _section("timings", "Stage timings", "<h3>build stages</h3>" + hbars(
        [Bar(k, v, "#6b8fc7", sec(v)) for k, v in rep.timings_s.items()], title="stage timings",
        axis_label="seconds", right_w=90, width=720) + '<p class="cap">Pass timings are in the recipe.</p>')


def _config_section(rep: Report) -> str:
    body = [f"<h3>preprocessing</h3>{_kv_table(rep.preprocessing.to_dict())}"]
    if rep.packing is not None:
        body.append(f"<h3>packing</h3>{_kv_table(rep.packing.to_dict())}")
    if rep.allocation is not None:
        body.append(f"<h3>bit allocation</h3>{_kv_table(rep.allocation.to_dict())}")
    if rep.threads:
        body.append(f"<h3>threads</h3>{_kv_table(rep.threads)}")
    if isinstance(rep.engine, str):
        body.append(f"<h3>TensorRT engines</h3><p>{esc(rep.engine)}</p>")
    elif rep.engine is not None:
        flat = {"backend": rep.engine.backend}
        flat.update({v: f"{sec(b.build_seconds)} build" + (", weight-stripped" if b.stripped else "") + f", {b.path}"
                     for v, b in rep.engine.builds.items()})
        body.append(f"<h3>TensorRT engines</h3>{_kv_table(flat)}")
    if rep.artifacts:
        body.append(f"<h3>artifacts</h3>{_kv_table(rep.artifacts)}")
    if rep.packed_file:
        body.append(f"<p>packed file: <code>{esc(rep.packed_file)}</code></p>")
    return _section("config", "Configuration", '<div class="cols">' + "".join(f"<div>{b}</div>" for b in body)
                    + "</div>")


def _notes_section(rep: Report) -> str:
    if not rep.notes:
        return _section("notes", "Notes", _missing("No notes."))
    return _section("notes", "Notes", '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in rep.notes) + "</ul>")


def render_html(rep: Report) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts or external resources) for ``rep``.

    Args:
        rep: the typed report.

    Returns:
        The page as a string (UTF-8 text; write it as ``report.html``).
    """
    if not isinstance(rep, Report):
        raise TypeError(f"render_html: expected a Report, got {type(rep).__name__}")
    title = f"dfmpc-deploy: {rep.model} {rep.bits.display()} {rep.method}" + (
        " (RANDOM WEIGHTS)" if rep.random_weights else "")
    parts = [_header(rep), _summary(rep), _size_section(rep), _accuracy_section(rep), _latency_section(rep),
             _recipe_section(rep), _statistics_section(rep), _pairs_section(rep), _layers_section(rep),
             _parity_section(rep), _timings_section(rep), _notes_section(rep), _config_section(rep)]
    raw = rep.to_json()
    parts.append(f'<section id="raw"><h2>report.json</h2><details><summary>show the raw report '
                 f'({len(raw.encode()) // 1024 + 1} kB)</summary><pre>{esc(raw)}</pre></details></section>')
    parts.append("<footer>generated by dfmpc-deploy; self-contained page, no scripts</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(p for p in parts if p) + "</main></body></html>\n")
