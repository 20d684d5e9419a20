"""sweep.html: one self-contained page (inline CSS, SVG and a few lines of script; nothing loaded).

Per model, a scatter of packed size against top-1 of the finished cells, coloured by method, with the Pareto
frontier (:func:`~dfmpc_deploy.sweep.pareto.pareto_front`) drawn as a staircase and its cells ringed and listed;
the FP32 top-1 as a dashed line. Then one table of every cell (settings that vary, status, top-1, size, seconds,
error), sorted by clicking a column header. The chart primitives, colours and stylesheet are report.html's
(dfmpc_deploy.report._svg, ._style), so both pages look alike.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..report._style import CSS, EXTRA_COLORS
from ..report._svg import HALO, esc, fmt_num, legend, svg, text, ticks
from .pareto import pareto_front
from .store import Row

__all__ = ["render_sweep_html", "varying_keys"]

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(t=>{const hs=t.tHead.rows[0].cells;
[...hs].forEach((th,i)=>th.addEventListener('click',()=>{const b=t.tBodies[0],up=th.dataset.dir!=='asc';
[...hs].forEach(h=>delete h.dataset.dir);th.dataset.dir=up?'asc':'desc';const num=th.dataset.type==='n';
const key=r=>{const c=r.cells[i],v=c.dataset.v!==undefined?c.dataset.v:c.textContent;
return num?(v===''?NaN:parseFloat(v)):v.toLowerCase()};
[...b.rows].sort((a,c)=>{const x=key(a),y=key(c);if(num){if(isNaN(x))return 1;if(isNaN(y))return -1;
return up?x-y:y-x}return up?x.localeCompare(y):y.localeCompare(x)}).forEach(r=>b.appendChild(r))}))});
""".strip()

_EXTRA_CSS = """
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" \\25B2"} table.sortable th[data-dir=desc]::after{content:" \\25BC"}
td.done{color:#2e7d32} td.failed{color:#b3261e;font-weight:600} td.pending{color:#777}
table.grid td.err{white-space:normal;min-width:260px;max-width:520px;color:#b3261e}
""".strip()


def varying_keys(rows: Sequence[Row]) -> list[str]:
    """Settings keys (``model`` excluded) whose value differs between rows or is missing from some, in first-seen
    order: the columns that tell cells apart."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.settings if k not in keys and k != "model"]
    return [k for k in keys if len({_cell_text(r.settings.get(k)) for r in rows}) > 1]


def _cell_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _range(lo: float, hi: float) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not hi > lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    step = ticks(hi - lo)[1]
    start = math.floor(lo / step) * step
    n = max(1, math.ceil((hi - start) / step - 1e-9))
    return [start + i * step for i in range(n + 1)]


def _label(t: float, tks: Sequence[float]) -> str:
    """A tick value with as many decimals as the tick step needs (sizes of one model differ in the 4th digit)."""
    step = abs(tks[1] - tks[0]) if len(tks) > 1 else 1.0
    d = 0
    while d < 12 and abs(round(step, d) - step) > step * 1e-6:
        d += 1
    return f"{t:.{d}f}"


def _colors(methods: Sequence[str]) -> dict[str, str]:
    return {m: EXTRA_COLORS[i % len(EXTRA_COLORS)] if i >= 4 else ("#3b6fb6", "#e8702a", "#58a55c", "#d64550")[i]
            for i, m in enumerate(methods)}


def _scatter(rows: list[Row], colors: dict[str, str], keys: list[str], title: str) -> str:
    """Size (MB) against top-1 (%) for ``rows`` (all finished, with both numbers), frontier marked."""
    pts = [(float(r.size_bytes or 0), float(r.top1 or 0)) for r in rows]
    front = pareto_front(pts)
    fp32 = [r.top1_variants["fp32"] for r in rows if r.top1_variants and "fp32" in r.top1_variants]
    ref = max(fp32) if fp32 else None
    w, h, left, right, top, bottom = 640, 340, 58, 34, 14, 44
    lo, hi = min(p[0] for p in pts) / 1e6, max(p[0] for p in pts) / 1e6
    pad = (hi - lo) * 0.06 or lo * 0.02  # keep the extreme points off the frame
    xt = _range(max(0.0, lo - pad), hi + pad)
    ys = [p[1] for p in pts] + ([ref] if ref is not None else [])
    yt = _range(max(0.0, min(ys) - 2), min(100.0, max(ys) + 2))

    def sx(v: float) -> float:
        return left + (w - left - right) * (v / 1e6 - xt[0]) / (xt[-1] - xt[0])

    def sy(v: float) -> float:
        return h - bottom - (h - top - bottom) * (v - yt[0]) / (yt[-1] - yt[0])

    out = []
    for t in xt:
        out.append(f'<line x1="{sx(t * 1e6):.1f}" y1="{top}" x2="{sx(t * 1e6):.1f}" y2="{h - bottom + 4}" '
                   'stroke="#e3e3e3"/>')
        out.append(text(sx(t * 1e6), h - bottom + 16, _label(t, xt), 10, "middle", "#666"))
    for t in yt:
        out.append(f'<line x1="{left - 4}" y1="{sy(t):.1f}" x2="{w - right}" y2="{sy(t):.1f}" stroke="#e3e3e3"/>')
        out.append(text(left - 7, sy(t) + 3.5, _label(t, yt), 10, "end", "#666"))
    out.append(text((left + w - right) / 2, h - 6, "packed size (MB)", 11, "middle", "#444"))
    out.append(text(12, (top + h - bottom) / 2, "top-1 %", 11, "middle", "#444",
                    f' transform="rotate(-90 12 {(top + h - bottom) / 2:.1f})"'))
    if ref is not None:
        out.append(f'<line x1="{left}" y1="{sy(ref):.1f}" x2="{w - right}" y2="{sy(ref):.1f}" stroke="#222" '
                   f'stroke-dasharray="4 3"><title>FP32 top-1 {ref:.2f} %</title></line>')
        out.append(text(w - right - 4, sy(ref) - 4, f"FP32 {ref:.2f} %", 10, "end", "#222", HALO))
    steps = []
    for a, b in zip(front, front[1:]):
        steps += [f"{sx(pts[a][0]):.1f},{sy(pts[a][1]):.1f}", f"{sx(pts[b][0]):.1f},{sy(pts[a][1]):.1f}"]
    if front:
        steps.append(f"{sx(pts[front[-1]][0]):.1f},{sy(pts[front[-1]][1]):.1f}")
        out.append(f'<polyline points="{" ".join(steps)}" fill="none" stroke="#222" stroke-width="1.4" '
                   'stroke-opacity="0.7"><title>Pareto frontier</title></polyline>')
    on = set(front)
    for i, r in enumerate(rows):
        tip = (f"{r.id}: " + " ".join(f"{k}={_cell_text(r.settings.get(k))}" for k in keys)
               + f"\ntop-1 {r.top1:.2f} %, {r.size_bytes:,} bytes" + ("\nPareto frontier" if i in on else ""))
        ring = ' stroke="#111" stroke-width="2"' if i in on else ' stroke="#fff" stroke-width="1"'
        out.append(f'<circle cx="{sx(pts[i][0]):.1f}" cy="{sy(pts[i][1]):.1f}" r="{6 if i in on else 4.5}" '
                   f'fill="{colors.get(r.method or "", "#888")}" fill-opacity="0.85"{ring}><title>{esc(tip)}'
                   "</title></circle>")
    chart = svg(w, h, out, title)
    items = "".join(f"<li><code>{esc(rows[i].id)}</code> "
                    + esc(" ".join(f"{k}={_cell_text(rows[i].settings.get(k))}" for k in keys))
                    + f": {int(pts[i][0]):,} bytes, {pts[i][1]:.2f} %</li>" for i in front)
    return (chart + f'<p class="cap">Pareto frontier ({len(front)} of {len(rows)} finished cells; smaller and '
            f'more accurate is better; ringed in the chart):</p><ol class="notes">{items}</ol>')


def _model_section(model: str, rows: list[Row], keys: list[str], colors: dict[str, str]) -> str:
    finished = [r for r in rows if r.status == "done" and r.top1 is not None and r.size_bytes is not None]
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "failed", "pending")}
    head = (f'<section><h2>{esc(model)}</h2><p class="cap">{len(rows)} cells: {counts["done"]} done, '
            f'{counts["failed"]} failed, {counts["pending"]} pending.</p>')
    if not finished:
        return head + '<p class="missing">No finished cell with a top-1 and a packed size yet (a cell needs ' \
                      'data to be evaluated and a packed file).</p></section>'
    used = [m for m in colors if any(r.method == m for r in finished)]
    return (head + legend((m, colors[m]) for m in used)
            + _scatter(finished, colors, keys, f"{model}: packed size against top-1") + "</section>")


def _table(rows: Sequence[Row], keys: list[str]) -> str:
    cols: list[tuple[str, str]] = [("cell", "s"), ("model", "s")] + [(k, "s") for k in keys] + [
        ("status", "s"), ("top-1 %", "n"), ("FP32 top-1 %", "n"), ("packed bytes", "n"), ("bits/weight", "n"),
        ("seconds", "n"), ("error", "s")]
    head = "".join(f'<th data-type="{t}">{esc(c)}</th>' for c, t in cols)
    body = []
    for r in rows:
        fp32 = r.top1_variants.get("fp32") if r.top1_variants else None

        def num(v: float | int | None, shown: str) -> str:
            return f'<td class="r" data-v="{"" if v is None else v}">{esc(shown if v is not None else "")}</td>'
        cells = [f'<td class="name">{esc(r.id)}</td>', f"<td>{esc(r.model)}</td>"]
        cells += [f"<td>{esc(_cell_text(r.settings.get(k)))}</td>" for k in keys]
        cells += [f'<td class="{esc(r.status)}">{esc(r.status)}</td>',
                  num(r.top1, f"{r.top1:.2f}" if r.top1 is not None else ""),
                  num(fp32, f"{fp32:.2f}" if fp32 is not None else ""),
                  num(r.size_bytes, f"{r.size_bytes:,}" if r.size_bytes is not None else ""),
                  num(r.avg_code_bits, f"{r.avg_code_bits:.3f}" if r.avg_code_bits is not None else ""),
                  num(r.seconds, fmt_num(r.seconds) if r.seconds is not None else ""),
                  f'<td class="err">{esc(r.error or "")}</td>']
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<section><h2>Cells</h2><p class="cap">Click a column header to sort. Each cell\'s build is in '
            f'<code>cells/&lt;cell&gt;/</code> (report.json, report.html, model.dfmpc).</p><div class="scroll">'
            f'<table class="grid sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            "</div></section>")


def render_sweep_html(rows: Sequence[Row], engine: str, title: str = "dfmpc-deploy sweep") -> str:
    """The page for the store's rows.

    Args:
        rows: :meth:`dfmpc_deploy.sweep.store.Store.rows`.
        engine: the engine of the last run (``local`` or ``ray``).
        title: the page title.

    Returns:
        The page (UTF-8 text; written as ``sweep.html``).
    """
    rows = list(rows)
    keys = varying_keys(rows)
    grid_keys = [k for k in keys if k not in ("weights", "data")]
    methods = list(dict.fromkeys(r.method or "" for r in rows if r.method))
    colors = _colors(methods)
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "failed", "pending")}
    cards = [("cells", str(len(rows)), f"engine {engine}"), ("done", str(counts["done"]), ""),
             ("failed", str(counts["failed"]), ""), ("pending", str(counts["pending"]), "not run yet or interrupted")]
    parts = [f"<header><h1>{esc(title)}</h1></header>",
             '<div class="cards">' + "".join(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">'
                                             f'{esc(v)}</div><div class="s">{esc(s)}</div></div>'
                                             for k, v, s in cards) + "</div>"]
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        parts.append(_model_section(model, mine, [k for k in grid_keys if k != "model"], colors))
    parts.append(_table(rows, keys))
    parts.append("<footer>generated by dfmpc-deploy sweep; self-contained page</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
            f"<title>{esc(title)}</title><style>{CSS}\n{_EXTRA_CSS}</style></head><body><main>"
            + "\n".join(parts) + f"</main><script>{_SORT_JS}</script></body></html>\n")
