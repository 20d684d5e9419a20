"""report.html for a build: one self-contained page (inline CSS and SVG, no scripts, no external resources).

:func:`render_html` takes the same report dict as :func:`dfmpc_deploy.report.render_markdown` and draws

* a header (model, bits, method, BN-statistics estimator, weights) with a banner for random weights,
* size bars (FP32 state dict, packed ``.dfmpc`` with its composition, every ``onnx_*`` file, every engine),
* top-1 bars for every model / method in ``accuracy``,
* latency per target and batch size (p50 bars, p90 whiskers, speed-up against fp32),
* a per-layer chart (bits coloured by role, compensation coefficient c mean with its min..max range, zero fraction
  of the ternary layers) and the layer table,
* parity, stage timings, configuration and notes.

Every section degrades to a short sentence when its keys are missing (``--method rtn``, no ``--data``, no
``--targets``), and every string taken from the report is HTML-escaped.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from typing import Any

__all__ = ["render_html"]

# ---------------------------------------------------------------------------------------------- palette, helpers

ROLE_COLORS = {"low": "#e8702a", "high-compensating": "#3b6fb6", "high": "#58a55c"}
ROLE_LABELS = {"low": "low (ternary / low-bit)", "high-compensating": "high, compensating",
               "high": "high (unpaired)"}
VARIANT_COLORS = {"fp32": "#8d8d8d", "fp16": "#4eb3a9", "wdq": "#3b6fb6", "w8a8": "#e8702a", "w8a8_ort": "#d64550",
                  "eager_fp16": "#9c6bb0", "cudagraph_fp16": "#e58fb4", "packed": "#58a55c"}
EXTRA_COLORS = ("#b07aa1", "#9d755d", "#bab0ac", "#76b7b2", "#edc948", "#ff9da7")
PACK_PARTS = (("low_bit_codes", "low-bit codes", "#e8702a"), ("high_bit_codes", "high-bit codes", "#3b6fb6"),
              ("scales", "scales", "#edc948"), ("float_tensors", "float tensors (BN, bias)", "#8d8d8d"),
              ("metadata", "metadata", "#c7c7c7"))
HALO = ' stroke="#fff" stroke-width="3" paint-order="stroke" stroke-linejoin="round"'
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif"


def _e(x: Any) -> str:
    """HTML-escape anything (quotes too: the result may land in an attribute)."""
    return html.escape(str(x), quote=True)


def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN, None)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        x = float(x)
    except OverflowError:  # an int beyond float range
        return None
    return x if math.isfinite(x) else None


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _role(row: dict) -> str:
    role = row.get("role", "")
    return role if isinstance(role, str) else str(role)


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


def _color(key: str, i: int = 0) -> str:
    return VARIANT_COLORS.get(key, EXTRA_COLORS[i % len(EXTRA_COLORS)])


def _mb(n: float) -> str:
    v = n / 1e6
    if v >= 100:
        return f"{v:.0f} MB"
    if v >= 10:
        return f"{v:.1f} MB"
    if v >= 1:
        return f"{v:.2f} MB"
    return f"{v:.3f} MB"


def _g(v: float, digits: int = 3) -> str:
    """Compact number: 3 significant digits, no exponent for ordinary magnitudes."""
    if v == 0:
        return "0"
    if abs(v) >= 10 ** digits or abs(v) < 1e-3:
        return f"{v:.{digits}g}"
    d = max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))
    return f"{v:.{d}f}"


def _tick(v: float) -> str:
    return f"{v:.4g}"


def _ms(v: float) -> str:
    return f"{_g(v)} ms"


def _sec(v: float) -> str:
    return f"{_g(v)} s"


def _batch_key(b: str):
    try:
        return (0, int(b))
    except (TypeError, ValueError):
        return (1, str(b))


def _ticks(vmax: float, n: int = 5) -> list[float]:
    """Round tick values 0 .. >= vmax."""
    if not vmax or vmax <= 0 or not math.isfinite(vmax):
        return [0.0, 1.0]
    raw = vmax / n
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if raw <= step:
            break
    k = max(1, math.ceil(vmax / step - 1e-9))
    return [i * step for i in range(k + 1)]


def _text(x: float, y: float, s: str, size: int = 12, anchor: str = "start", fill: str = "#222",
          extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}"{extra}>'
            f'{_e(s)}</text>')


def _svg(w: float, h: float, body: Iterable[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w:.0f} {h:.0f}" width="{w:.0f}" '
            f'height="{h:.0f}" role="img" aria-label="{_e(label)}" style="{FONT}">' + "".join(body) + "</svg>")


# ---------------------------------------------------------------------------------------------- generic charts

def _hbars(rows: list[dict], *, title: str, fmt=_g, tick_fmt=_tick, width: int = 980, xmax: float | None = None,
           log: bool = False, ref: tuple[float, str] | None = None, label_w: int | None = None,
           right_w: int = 190, axis_label: str = "") -> str:
    """Horizontal bar chart.

    rows: dicts with ``label``, ``value`` (>= 0), ``color`` and optionally ``hi`` (whisker end), ``text`` (right
    annotation, default ``fmt(value)``), ``tip`` (hover title), ``opacity``, ``parts`` (stacked: list of
    (value, color, name)).
    """
    rows = [r for r in rows if _num(r.get("value")) is not None]
    if not rows:
        return ""
    row_h, bar_h, top, bottom = 24, 15, 8, 30
    if label_w is None:
        label_w = int(min(300, 14 + 6.9 * max(len(str(r["label"])) for r in rows)))
    x0, x1 = label_w, width - right_w
    hi_all = [max(_num(r["value"]) or 0, _num(r.get("hi")) or 0) for r in rows]
    vmax = xmax if xmax is not None else max(hi_all)
    if log:
        pos = [v for r in rows for v in (_num(r["value"]), _num(r.get("hi"))) if v and v > 0]
        lo_v = 10 ** math.floor(math.log10(min(pos))) if pos else 1.0
        hi_v = 10 ** math.ceil(math.log10(max(pos))) if pos else 10.0
        if hi_v <= lo_v:
            hi_v = lo_v * 10
        ticks = [lo_v * 10 ** i for i in range(int(round(math.log10(hi_v / lo_v))) + 1)]

        def sx(v):
            return x0 + (x1 - x0) * (math.log10(max(v, lo_v) / lo_v) / math.log10(hi_v / lo_v))
    else:
        ticks = _ticks(vmax)
        top_v = ticks[-1] if xmax is None else xmax
        if xmax is not None:
            ticks = [t for t in _ticks(xmax) if t <= xmax + 1e-9]

        def sx(v):
            return x0 + (x1 - x0) * (min(max(v, 0.0), top_v) / top_v if top_v else 0.0)
    h = top + row_h * len(rows) + bottom
    out = []
    for t in ticks:  # grid
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom + 4}" stroke="#e3e3e3"/>')
        out.append(_text(x, h - bottom + 16, tick_fmt(t), 10, "middle", "#666"))
    if axis_label:
        out.append(_text(x1, h - 2, axis_label, 10, "end", "#666"))
    xref = None
    if ref is not None and _num(ref[0]) is not None:
        x = xref = sx(ref[0])
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{h - bottom + 4}" stroke="#222" '
                   f'stroke-dasharray="4 3"><title>{_e(ref[1])}</title></line>')
    for i, r in enumerate(rows):
        y = top + i * row_h + (row_h - bar_h) / 2
        cy = y + bar_h / 2
        v = _num(r["value"])
        tip = f'<title>{_e(r.get("tip") or (str(r["label"]) + ": " + str(r.get("text") or fmt(v))))}</title>'
        out.append(_text(x0 - 8, cy + 4, str(r["label"]), 12, "end"))
        out.append("<g>" + tip)
        if r.get("parts"):
            acc = 0.0
            for pv, pc, pn in r["parts"]:
                xa, xb = sx(acc), sx(acc + pv)
                out.append(f'<rect x="{xa:.1f}" y="{y:.1f}" width="{max(xb - xa, 0):.1f}" height="{bar_h}" '
                           f'fill="{pc}"><title>{_e(pn)}: {_e(_mb(pv))}</title></rect>')
                acc += pv
        else:
            op = r.get("opacity", 1.0)
            xb = sx(v)
            out.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(xb - x0, 0.75):.1f}" height="{bar_h}" '
                       f'fill="{r["color"]}" fill-opacity="{op}" stroke="{r["color"]}" rx="2"/>')
        end = sx(v)
        hi = _num(r.get("hi"))
        if hi is not None and hi > v:
            xh = sx(hi)
            out.append(f'<line x1="{end:.1f}" y1="{cy:.1f}" x2="{xh:.1f}" y2="{cy:.1f}" stroke="#333" '
                       f'stroke-width="1.2"/><line x1="{xh:.1f}" y1="{cy - 5:.1f}" x2="{xh:.1f}" y2="{cy + 5:.1f}" '
                       f'stroke="#333" stroke-width="1.2"/>')
            end = xh
        out.append("</g>")
        label = str(r.get("text") or fmt(v))
        tx = end + 6
        if xref is not None and tx - 3 <= xref <= tx + 6.2 * len(label):
            tx = xref + 5  # keep the value clear of the dashed reference line
        out.append(_text(tx, cy + 4, label, 11, "start", "#333", HALO))
    return _svg(width, h, out, title)


def _legend(items: Iterable[tuple[str, str]]) -> str:
    return ('<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{_e(n)}</span>'
                                             for n, c in items) + "</div>")


def _kv_table(d: dict, cls: str = "kv") -> str:
    rows = []
    for k, v in d.items():
        if not isinstance(v, str):
            v = json.dumps(v, ensure_ascii=False, default=str)
        rows.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    return f'<table class="{cls}"><tbody>' + "".join(rows) + "</tbody></table>" if rows else ""


def _missing(msg: str) -> str:
    return f'<p class="missing">{_e(msg)}</p>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


# ---------------------------------------------------------------------------------------------- sections

def _header(rep: dict) -> str:
    model = rep.get("model", "unknown model")
    bits = str(rep.get("bits", "?"))
    low = "ternary" if bits.startswith("2/") else "DoReFa"
    parts = [f'<header><h1>dfmpc-deploy build: <span class="model">{_e(model)}</span></h1>']
    if rep.get("weights") == "random":
        parts.append('<div class="banner" role="alert"><strong>RANDOM WEIGHTS</strong> &mdash; this build used '
                     'seeded random weights: sizes, latency and export are real, accuracy is meaningless.</div>')
    meta = [("bits", f"{bits}  (low = {low}, high = DoReFa; activations FP32)" if "/" in bits else bits),
            ("method", rep.get("method", "?")),
            ("statistics estimator", rep.get("estimator", "?")),
            ("weights", rep.get("weights", "?"))]
    if rep.get("input_shape"):
        meta.append(("input shape", "x".join(map(str, rep["input_shape"])) if isinstance(rep["input_shape"], list)
                     else rep["input_shape"]))
    if rep.get("targets"):
        meta.append(("targets", ", ".join(map(str, rep["targets"])) if isinstance(rep["targets"], list)
                     else rep["targets"]))
    if "format_version" in rep:
        meta.append(("report format", rep["format_version"]))
    parts.append('<dl class="meta">' + "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in meta)
                 + "</dl></header>")
    return "".join(parts)


def _summary(rep: dict) -> str:
    cards = []
    sizes = _dict(rep.get("size_bytes"))
    packing = _dict(rep.get("packing"))
    fp32, packed = _num(sizes.get("fp32")), _num(sizes.get("packed"))
    if fp32 is not None:
        cards.append(("FP32 size", _mb(fp32), "state dict, 4 bytes per float"))
    if packed is not None:
        ratio = _num(packing.get("compression")) or (fp32 / packed if fp32 and packed else None)
        cards.append(("packed size", _mb(packed), f"{ratio:.2f}\u00d7 smaller than FP32" if ratio else ".dfmpc file"))
    bpw = _num(packing.get("bits_per_weight"))
    if bpw is not None:
        cards.append(("bits per weight", f"{bpw:.2f}", "packed codes per quantized weight"))
    acc = _dict(rep.get("accuracy"))
    method = rep.get("method")
    ref, got = _dict(acc.get("fp32")), _dict(acc.get(method)) or _dict(acc.get("quantized_uncompensated"))
    if _num(ref.get("top1")) is not None and _num(got.get("top1")) is not None:
        cards.append(("top-1", f"{got['top1']:.2f} %", f"FP32 {ref['top1']:.2f} %, "
                      f"{got['top1'] - ref['top1']:+.2f} points"))
    layers = [r for r in _list(rep.get("layers")) if isinstance(r, dict)]
    if layers:
        n_low = sum(1 for r in layers if r.get("role") == "low")
        cards.append(("layers", str(len(layers)), f"{n_low} low-bit, {len(layers) - n_low} high-bit"))
    if not cards:
        return ""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="s">{_e(s)}</div>'
        f'</div>' for k, v, s in cards) + "</div>"


def _size_section(rep: dict) -> str:
    sizes = _dict(rep.get("size_bytes"))
    if not sizes:
        return _section("size", "Size", _missing("No sizes in this report."))
    fp32 = _num(sizes.get("fp32"))
    rows = []

    def add(label, v, color, opacity=1.0, parts=None, tip=None, ratio=True):
        v = _num(v)
        if v is None:
            return
        text = _mb(v) + (f" ({fp32 / v:.2f}\u00d7)" if ratio and fp32 and v > 0 else "")
        rows.append({"label": label, "value": v, "color": color, "opacity": opacity, "text": text, "parts": parts,
                     "tip": tip or f"{label}: {int(v)} bytes"})

    add("FP32 (state dict)", sizes.get("fp32"), VARIANT_COLORS["fp32"], ratio=False)
    packed = _num(sizes.get("packed"))
    if packed is not None:
        parts = [(float(sizes[k]), c, n) for k, n, c in PACK_PARTS if _num(sizes.get(k)) is not None]
        full = parts and abs(sum(p[0] for p in parts) - packed) <= 0.01 * packed
        add("packed .dfmpc", packed, VARIANT_COLORS["packed"], parts=parts if full else None)
    for i, (k, v) in enumerate(sizes.items()):
        if k.startswith("onnx_"):
            add(f"ONNX {k[5:]}", v, _color(k[5:], i))
    eng = _dict(sizes.get("engine"))
    for i, (k, v) in enumerate(eng.items()):
        add(f"TensorRT engine {k}", v, _color(k, i), opacity=0.45)
    vals = [r["value"] for r in rows if r["value"] > 0]
    log = bool(vals) and max(vals) / min(vals) > 200
    chart = _hbars(rows, title="file sizes", fmt=_mb, tick_fmt=lambda t: _tick(t / 1e6), log=log,
                   axis_label="MB" + (" (log scale)" if log else ""), right_w=170)
    body = [chart or _missing("No numeric sizes.")]
    if rows:
        body.append('<p class="cap">Bar labels: size' + (" and FP32 / size" if fp32 else "") + "."
                    + (" Engines are drawn lighter." if eng else "") + " ")
        if any(r.get("parts") for r in rows):
            body.append("The packed bar is split into its parts.")
        th, thm = _num(sizes.get("theoretical")), _num(sizes.get("theoretical_min"))
        if th is not None:
            body.append(f" Theoretical size (codes at their bit widths): {_e(_mb(th))}"
                        + (f", with log2(3)-bit ternary codes: {_e(_mb(thm))}" if thm is not None else "") + ".")
        body.append("</p>")
        if any(r.get("parts") for r in rows):
            body.append(_legend((n, c) for k, n, c in PACK_PARTS if _num(sizes.get(k)) is not None))
    packing = _dict(rep.get("packing"))
    flat = {k: v for k, v in sizes.items() if not isinstance(v, dict)}
    flat.update({f"engine {k}": v for k, v in eng.items()})
    table = "".join(f"<tr><th>{_e(k)}</th><td class='r'>{_e(int(v)) if _num(v) is not None else _e(v)}</td>"
                    f"<td class='r'>{_e(_mb(v)) if _num(v) is not None else ''}</td></tr>" for k, v in flat.items())
    body.append(f'<details><summary>all size entries (bytes)</summary><table class="kv"><tbody>{table}</tbody>'
                f'</table>{_kv_table(packing)}</details>')
    return _section("size", "Size", "".join(body))


def _acc_label(k: str, method: str | None) -> str:
    fixed = {"fp32": "FP32 original", "quantized_uncompensated": "quantized, uncompensated",
             "torch_fp32": "PyTorch FP32", "torch_fakequant": "PyTorch fake-quant"}
    if k in fixed:
        return fixed[k]
    if k == method:
        return f"{k} (compensated)"
    if k.startswith("onnx_"):
        return f"ONNX Runtime {k[5:]}"
    return k


def _acc_color(k: str, method: str | None, i: int) -> str:
    if k in ("fp32", "torch_fp32"):
        return VARIANT_COLORS["fp32"]
    if k == "quantized_uncompensated":
        return "#d64550" if method != "rtn" else "#3b6fb6"
    if k in (method, "torch_fakequant"):
        return "#58a55c"
    if k.startswith("onnx_"):
        return _color(k[5:], i)
    return EXTRA_COLORS[i % len(EXTRA_COLORS)]


def _accuracy_section(rep: dict) -> str:
    acc = _dict(rep.get("accuracy"))
    entries = [(k, v) for k, v in acc.items() if isinstance(v, dict) and _num(v.get("top1")) is not None]
    if not entries:
        return _section("accuracy", "Accuracy", _missing("No accuracy measured (build without --data)."))
    method = rep.get("method")
    n = acc.get("n")
    rows = []
    for i, (k, v) in enumerate(entries):
        t5 = _num(v.get("top5"))
        vn = v.get("n")
        text = f"{v['top1']:.2f} %" + (f"  (top-5 {t5:.2f})" if t5 is not None else "")
        if vn is not None and vn != n:
            text += f"  n={vn}"
        rows.append({"label": _acc_label(k, method), "value": float(v["top1"]), "color": _acc_color(k, method, i),
                     "text": text, "tip": f"{k}: top-1 {v['top1']} %, top-5 {v.get('top5', '?')} %, n = {vn}"})
    fp = _num(_dict(acc.get("fp32")).get("top1"))
    chart = _hbars(rows, title="top-1 accuracy", fmt=lambda t: f"{t:.0f}", xmax=100.0, axis_label="top-1 %",
                   ref=(fp, f"FP32 top-1 {fp} %") if fp is not None else None, right_w=190)
    head = f'<p class="cap">Top-1 on <code>{_e(acc.get("dataset", "?"))}</code>, n = {_e(n if n is not None else "?")}'
    head += ". Dashed line: FP32 original.</p>" if fp is not None else ".</p>"
    warn = ('<p class="warn">Random weights: these accuracies are meaningless.</p>'
            if rep.get("weights") == "random" else "")
    return _section("accuracy", "Accuracy", warn + head + chart)


def _latency_section(rep: dict) -> str:
    lat = rep.get("latency_ms")
    if not isinstance(lat, dict) or not lat:
        return _section("latency", "Latency",
                        _missing("No latency measured (no --targets ort / trt / torch-cuda, or not run)."))
    speed = _dict(rep.get("speedup"))
    threads = _dict(rep.get("threads"))
    names = {"ort": "ONNX Runtime (CPU)", "trt": "TensorRT (GPU)", "torch-cuda": "PyTorch CUDA"}
    body = []
    for tgt, variants in lat.items():
        title = names.get(tgt, tgt) + (f", {threads[tgt]} threads" if tgt in threads else "")
        if not isinstance(variants, dict) or not variants:
            body.append(f"<h3>{_e(title)}</h3>" + _missing(str(variants) if variants else "nothing measured"))
            continue
        batches = sorted({b for per_b in variants.values() if isinstance(per_b, dict) for b in per_b}, key=_batch_key)
        panels, table = [], []
        for b in batches:
            rows = []
            for i, (var, per_b) in enumerate(variants.items()):
                st = _dict(_dict(per_b).get(b))
                p50 = _num(st.get("p50"))
                if p50 is None:
                    continue
                p90 = _num(st.get("p90"))
                sp = _num(_dict(_dict(speed.get(tgt)).get(var)).get(b))
                text = _ms(p50) + (f" ({sp:.2f}\u00d7)" if sp is not None else "")
                rows.append({"label": var, "value": p50, "hi": p90, "color": _color(var, i), "text": text,
                             "tip": f"{var}, batch {b}: p50 {p50} ms" + (f", p90 {p90} ms" if p90 else "")})
                table.append("<tr>" + "".join(f"<td>{_e(x)}</td>" for x in (var, b)) + "".join(
                    f"<td class='r'>{_e(_g(_num(st.get(q))) if _num(st.get(q)) is not None else '')}</td>"
                    for q in ("p50", "p90", "p99", "mean")) + f"<td class='r'>{_e(st.get('iters', ''))}</td>"
                    f"<td class='r'>{_e(f'{sp:.2f}x' if sp is not None else '')}</td></tr>")
            chart = _hbars(rows, title=f"{tgt} latency batch {b}", fmt=_g, width=430, right_w=120,
                           axis_label="ms", label_w=90)
            if chart:
                panels.append(f'<figure class="panel"><figcaption>batch {_e(b)}</figcaption>{chart}</figure>')
        body.append(f"<h3>{_e(title)}</h3>")
        if panels:
            body.append('<div class="panels">' + "".join(panels) + "</div>")
            body.append(f'<details><summary>{_e(tgt)} latency table</summary><table class="grid"><thead><tr>'
                        "<th>variant</th><th>batch</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th>"
                        "<th>mean ms</th><th>iters</th><th>speed-up</th></tr></thead><tbody>" + "".join(table)
                        + "</tbody></table></details>")
        else:
            body.append(_missing("no p50 values"))
    cap = ('<p class="cap">Bars: p50 (median) per batch; whisker: p90. Right of the bar: p50 and, where measured, '
           'the speed-up over the fp32 variant at the same batch size (fp32 p50 / p50).</p>')
    return _section("latency", "Latency", cap + "".join(body))


def _short_name(name: str, n: int = 30) -> str:
    """Keep the tail of a long dotted name (the distinctive part), dropping whole leading components."""
    if len(name) <= n:
        return name
    parts = name.split(".")
    while len(parts) > 1 and len(".".join(parts)) > n - 1:
        parts.pop(0)
    tail = ".".join(parts)
    return "\u2026" + (tail if len(tail) <= n - 1 else tail[-(n - 1):])


def _layer_chart(layers: list[dict]) -> str:
    n = len(layers)
    cw = max(14.0, min(40.0, 1000.0 / n))
    ext = [5.3 * len(_short_name(str(r.get("layer", "")))) * math.cos(math.radians(55)) for r in layers]
    left, right = max([64.0] + [e - (i + 0.5) * cw + 4 for i, e in enumerate(ext)]), 16
    width = max(left + n * cw + right, 620.0)
    has_c = any(_num(r.get("c_mean")) is not None for r in layers)
    has_z = any(_num(r.get("zero_fraction")) is not None for r in layers)
    bits = [_num(r.get("bits")) or 0 for r in layers]
    bmax = max(8.0, max(bits))
    ph, gap = 110, 26
    panels = [("bits", bmax)] + ([("c", None)] if has_c else []) + ([("zero", 1.0)] if has_z else [])
    longest = max(len(_short_name(str(r.get("layer", "")))) for r in layers)
    label_h = 14 + 5.6 * longest * 0.82
    height = 10 + len(panels) * (ph + gap) + label_h
    out = []
    cvals = [v for r in layers for v in (_num(r.get("c_min")), _num(r.get("c_max")), _num(r.get("c_mean")))
             if v is not None]
    cmax = min(max([1.0] + cvals) * 1.08, 1e300)
    for pi, (kind, vmax) in enumerate(panels):
        y0 = 10 + pi * (ph + gap) + 14
        y1 = y0 + ph - 14
        if kind == "c":
            vmax = cmax
        ticks = [0, 2, 4, 6, 8] if kind == "bits" and bmax <= 8 else _ticks(vmax, 4)
        ticks = [t for t in ticks if t <= vmax + 1e-9]
        title = {"bits": "bits per layer (colour = role)",
                 "c": "compensation coefficient c per low-bit layer: dot = mean, bar = min..max, dashed = 1",
                 "zero": "zero fraction of the ternary codes"}[kind]
        out.append(_text(left, y0 - 4, title, 11, "start", "#444", ' font-weight="600"'))

        def sy(v, vmax=vmax, y0=y0, y1=y1):
            return y1 - (y1 - y0) * min(max(v, 0.0), vmax) / vmax

        for t in ticks:
            out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{width - right:.1f}" y2="{sy(t):.1f}" '
                       f'stroke="#e6e6e6"/>')
            out.append(_text(left - 6, sy(t) + 3.5, _tick(t), 10, "end", "#666"))
        if kind == "c":
            out.append(f'<line x1="{left}" y1="{sy(1.0):.1f}" x2="{width - right:.1f}" y2="{sy(1.0):.1f}" '
                       f'stroke="#555" stroke-dasharray="4 3"/>')
        for i, r in enumerate(layers):
            cx = left + (i + 0.5) * cw
            bw = cw * 0.72
            color = ROLE_COLORS.get(_role(r), "#999")
            name = str(r.get("layer", ""))
            if kind == "bits" and bits[i] > 0:
                out.append(f'<rect x="{cx - bw / 2:.1f}" y="{sy(bits[i]):.1f}" width="{bw:.1f}" '
                           f'height="{y1 - sy(bits[i]):.1f}" fill="{color}"><title>{_e(name)}: '
                           f'{_e(r.get("bits"))} bits, {_e(r.get("role", "?"))}, {_e(r.get("params", "?"))} params'
                           f'</title></rect>')
                if cw >= 14:
                    out.append(_text(cx, sy(bits[i]) - 3, _tick(bits[i]), 9, "middle", "#444"))
            elif kind == "c" and _num(r.get("c_mean")) is not None:
                lo, mean, hi = _num(r.get("c_min")), _num(r["c_mean"]), _num(r.get("c_max"))
                tip = f"{name}: c mean {mean}" + (f", min {lo}, max {hi}" if lo is not None and hi is not None
                                                  else "") + (", folded" if r.get("c_folded") else "")
                out.append(f"<g><title>{_e(tip)}</title>")
                if lo is not None and hi is not None:
                    out.append(f'<rect x="{cx - bw / 4:.1f}" y="{sy(hi):.1f}" width="{bw / 2:.1f}" '
                               f'height="{max(sy(lo) - sy(hi), 1):.1f}" fill="{color}" fill-opacity="0.35" '
                               f'stroke="{color}"/>')
                out.append(f'<circle cx="{cx:.1f}" cy="{sy(mean):.1f}" r="3.2" fill="{color}" stroke="#222" '
                           f'stroke-width="0.8"/></g>')
            elif kind == "zero" and _num(r.get("zero_fraction")) is not None:
                z = _num(r["zero_fraction"])
                out.append(f'<rect x="{cx - bw / 2:.1f}" y="{sy(z):.1f}" width="{bw:.1f}" height="{y1 - sy(z):.1f}" '
                           f'fill="{color}" fill-opacity="0.75"><title>{_e(name)}: zero fraction {_e(z)}</title>'
                           f'</rect>')
                if cw >= 18:
                    out.append(_text(cx, sy(z) - 3, f"{z:.2f}", 8, "middle", "#444"))
        out.append(f'<line x1="{left}" y1="{y1}" x2="{width - right:.1f}" y2="{y1}" stroke="#999"/>')
    ly = 10 + len(panels) * (ph + gap) - gap + 8
    for i, r in enumerate(layers):
        cx = left + (i + 0.5) * cw
        name = str(r.get("layer", ""))
        out.append(f'<text x="{cx + 3:.1f}" y="{ly:.1f}" font-size="9.5" text-anchor="end" fill="#333" '
                   f'transform="rotate(-55 {cx + 3:.1f} {ly:.1f})"><title>{_e(name)}</title>'
                   f'{_e(_short_name(name))}</text>')
    return _svg(width, height, out, "per-layer bits, compensation coefficients and zero fractions")


def _layers_section(rep: dict) -> str:
    layers = [r for r in _list(rep.get("layers")) if isinstance(r, dict)]
    if not layers:
        return _section("layers", "Layers", _missing("No layer table in this report."))
    roles = [r for r in ROLE_COLORS if any(x.get("role") == r for x in layers)]
    body = [_legend((ROLE_LABELS[r], ROLE_COLORS[r]) for r in roles), '<div class="scroll">', _layer_chart(layers),
            "</div>"]
    if any("c_mean" in r for r in layers):
        folded = {bool(r.get("c_folded")) for r in layers if "c_folded" in r}
        if folded == {False}:
            body.append('<p class="cap">c is solved for every low-bit layer but not folded into this model '
                        "(compensation off).</p>")
        elif folded == {True}:
            body.append('<p class="cap">c is folded into the deployed model.</p>')
    has = {k: any(k in r for r in layers) for k in ("c_mean", "zero_fraction", "partner", "format", "kind")}
    head = ["#", "layer"] + (["kind"] if has["kind"] else []) + ["role", "bits"] + (
        ["format"] if has["format"] else []) + ["shape", "params"] + (["partner"] if has["partner"] else []) + (
        ["c mean (min..max)"] if has["c_mean"] else []) + (["zero frac."] if has["zero_fraction"] else [])
    rows = []
    for i, r in enumerate(layers):
        role = _role(r)
        shape = r.get("shape")
        cells = [(str(i), "r"), (r.get("layer", ""), "name")]
        if has["kind"]:
            cells.append((r.get("kind", ""), ""))
        cells.append((f'<i class="chip" style="background:{ROLE_COLORS.get(role, "#999")}"></i>{_e(role)}', "raw"))
        cells.append((r.get("bits", ""), "r"))
        if has["format"]:
            cells.append((r.get("format", ""), ""))
        cells.append(("x".join(map(str, shape)) if isinstance(shape, list) else (shape or ""), ""))
        params = r.get("params")
        cells.append((f"{params:,}" if isinstance(params, int) else (params or ""), "r"))
        if has["partner"]:
            cells.append((r.get("partner") or "", "name"))
        if has["c_mean"]:
            c = (f"{r['c_mean']} ({r.get('c_min', '?')}..{r.get('c_max', '?')})" if "c_mean" in r else "")
            cells.append((c + (" folded" if r.get("c_folded") else ""), "r"))
        if has["zero_fraction"]:
            z = _num(r.get("zero_fraction"))
            cells.append((f"{z:.3f}" if z is not None else "", "r"))
        rows.append("<tr>" + "".join(f"<td>{v}</td>" if cls == "raw" else f'<td class="{cls}">{_e(v)}</td>'
                                     for v, cls in cells) + "</tr>")
    body.append('<div class="scroll"><table class="grid layers"><thead><tr>'
                + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")
    return _section("layers", "Layers", "".join(body))


def _parity_section(rep: dict) -> str:
    par = _dict(rep.get("parity"))
    if not par:
        return ""
    rows = []
    for k, p in par.items():
        p = _dict(p)
        ok = p.get("ok")
        mark = (("ok", "pass") if ok is True else ("bad", "FAIL") if ok is False else ("na", "by top-1") if ok is None
                else ("na", str(ok)))
        vals = [_num(p.get(q)) for q in ("max_abs_diff", "max_abs_ref", "top1_agreement")]
        rows.append(f"<tr><td>{_e(k)}</td>" + "".join(f"<td class='r'>{_e(_g(v) if v is not None else '')}</td>"
                                                       for v in vals)
                    + f"<td class='r'>{_e(p.get('n', ''))}</td><td class='{mark[0]}'>{_e(mark[1])}</td></tr>")
    return _section("parity", "Parity with the PyTorch model",
                    '<table class="grid"><thead><tr><th>artifact</th><th>max |diff|</th><th>max |ref|</th>'
                    "<th>top-1 agreement</th><th>n</th><th>check</th></tr></thead><tbody>" + "".join(rows)
                    + "</tbody></table>")


def _timings_section(rep: dict) -> str:
    t = _dict(rep.get("timings_s"))
    stages = [(k, _num(v)) for k, v in t.items() if not k.endswith("_seconds") and _num(v) is not None]
    inner = [(k[:-len("_seconds")], _num(v)) for k, v in t.items() if k.endswith("_seconds") and _num(v) is not None]
    if not stages and not inner:
        return _section("timings", "Stage timings", _missing("No stage timings in this report."))
    body = []
    if stages:
        body.append("<h3>build stages</h3>" + _hbars(
            [{"label": k, "value": v, "color": "#6b8fc7", "text": _sec(v)} for k, v in stages],
            title="stage timings", fmt=_g, axis_label="seconds", right_w=90, width=720))
    if inner:
        body.append("<h3>inside compensate</h3>" + _hbars(
            [{"label": k, "value": v, "color": "#a3b7d9", "text": _sec(v)} for k, v in inner],
            title="compensation timings", fmt=_g, axis_label="seconds", right_w=90, width=720))
    return _section("timings", "Stage timings", "".join(body))


def _config_section(rep: dict) -> str:
    body = []
    for key, title in (("config", "compensation config"), ("preprocessing", "preprocessing"),
                       ("diagnostics", "diagnostics"), ("packing", "packing"), ("threads", "threads"),
                       ("artifacts", "artifacts")):
        d = rep.get(key)
        if isinstance(d, dict) and d:
            body.append(f"<h3>{_e(title)}</h3>" + _kv_table(d))
    eng = rep.get("engine")
    if isinstance(eng, dict):
        flat = {"backend": eng.get("backend", "?")}
        for v, b in _dict(eng.get("builds")).items():
            b = _dict(b)
            flat[v] = (f"{_sec(_num(b['build_seconds']))} build" if _num(b.get("build_seconds")) is not None
                       else "") + (", weight-stripped" if b.get("stripped") else "") + (
                f", {b['path']}" if b.get("path") else "")
        body.append("<h3>TensorRT engines</h3>" + _kv_table(flat))
    elif eng:
        body.append(f"<h3>TensorRT engines</h3><p>{_e(eng)}</p>")
    if rep.get("packed_file"):
        body.append(f"<p>packed file: <code>{_e(rep['packed_file'])}</code></p>")
    if not body:
        return ""
    return _section("config", "Configuration", '<div class="cols">' + "".join(f"<div>{b}</div>" for b in body)
                    + "</div>")


def _notes_section(rep: dict) -> str:
    notes = rep.get("notes") or []
    if not isinstance(notes, list):
        notes = [notes]
    if not notes:
        return _section("notes", "Notes", _missing("No notes."))
    return _section("notes", "Notes", "<ul class=\"notes\">" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")


CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1d1f23;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,
'DejaVu Sans',Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:20px 22px 40px}
header h1{font-size:22px;margin:0 0 10px}
header .model{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;color:#2a4f8f}
.banner{background:#b3261e;color:#fff;padding:10px 14px;border-radius:6px;margin:0 0 12px;font-size:15px}
.banner strong{letter-spacing:.06em}
dl.meta{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:6px 18px;margin:0}
dl.meta div{background:#fff;border:1px solid #e2e4e8;border-radius:6px;padding:6px 10px}
dl.meta dt{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:#6a6f78}
dl.meta dd{margin:0;word-break:break-word}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0 4px}
.card{flex:1 1 160px;background:#fff;border:1px solid #e2e4e8;border-left:4px solid #3b6fb6;border-radius:6px;
padding:8px 12px}
.card .k{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:#6a6f78}
.card .v{font-size:22px;font-weight:600}
.card .s{font-size:12px;color:#555}
section{background:#fff;border:1px solid #e2e4e8;border-radius:8px;padding:12px 18px 14px;margin:16px 0}
section h2{font-size:17px;margin:0 0 8px;padding-bottom:6px;border-bottom:1px solid #eceef1}
section h3{font-size:14px;margin:12px 0 4px;color:#333}
svg{max-width:100%;height:auto;display:block}
.cap{color:#555;font-size:12.5px;margin:4px 0 6px}
.missing{color:#777;font-style:italic}
.warn{color:#b3261e;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:14px;font-size:12px;margin:4px 0 6px}
.legend i,.chip{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.panels{display:flex;flex-wrap:wrap;gap:8px 18px}
figure.panel{margin:0;flex:1 1 0;min-width:300px;max-width:430px}
figure.panel figcaption{font-size:12px;font-weight:600;color:#444;margin-left:90px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12.5px}
table.grid th,table.grid td{border-bottom:1px solid #eceef1;padding:3px 8px;text-align:left;white-space:nowrap}
table.grid thead th{background:#f6f7f9;position:sticky;top:0}
table.grid tbody tr:nth-child(even){background:#fafbfc}
table.kv th{text-align:left;font-weight:500;color:#555;padding:2px 12px 2px 0;vertical-align:top;white-space:nowrap}
table.kv td{padding:2px 0;overflow-wrap:anywhere}
table.layers td,table.layers th{padding:2px 6px;font-size:12px}
td.r{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:12px}
td.ok{color:#2e7d32;font-weight:600} td.bad{color:#b3261e;font-weight:700} td.na{color:#777}
details{margin:6px 0}
summary{cursor:pointer;color:#2a4f8f;font-size:12.5px}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:4px 24px}
ul.notes li{margin:3px 0;word-break:break-word}
code{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:12.5px;background:#f1f2f4;padding:0 3px;
border-radius:3px}
footer{color:#888;font-size:11.5px;text-align:center}
""".strip()


def render_html(rep: dict) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts or external resources) for a report dict.

    Args:
        rep: the report dict written to report.json (see :func:`dfmpc_deploy.report.render_markdown`); every
            key is optional.

    Returns:
        The page as a string (UTF-8 text; write it as ``report.html``).
    """
    raw_rep = rep = rep if isinstance(rep, dict) else {}
    rep = {**rep, **{k: json.dumps(rep[k], default=str) for k in ("model", "weights", "bits", "method", "estimator")
                     if k in rep and not isinstance(rep[k], str)}}
    title = f"dfmpc-deploy: {rep.get('model', 'build')} {rep.get('bits', '')} {rep.get('method', '')}".strip()
    if rep.get("weights") == "random":
        title += " (RANDOM WEIGHTS)"
    parts = [_header(rep), _summary(rep), _size_section(rep), _accuracy_section(rep), _latency_section(rep),
             _layers_section(rep), _parity_section(rep), _timings_section(rep), _notes_section(rep),
             _config_section(rep)]
    raw = json.dumps(raw_rep, indent=1, ensure_ascii=False, default=str)
    parts.append(f'<section id="raw"><h2>report.json</h2><details><summary>show the raw report '
                 f'({len(raw.encode()) // 1024 + 1} kB)</summary><pre>{_e(raw)}</pre></details></section>')
    parts.append("<footer>generated by dfmpc-deploy; self-contained page, no scripts</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(p for p in parts if p) + "</main></body></html>\n")
