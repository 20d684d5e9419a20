"""Inline-SVG chart primitives and number formats for report.html (no scripts, no external resources)."""
from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .markdown import fmt_num, visible

__all__ = ["esc", "Bar", "hbars", "legend", "svg", "text", "ticks", "mb", "tick", "ms", "sec", "short_name", "FONT",
           "HALO", "fmt_num"]

HALO = ' stroke="#fff" stroke-width="3" paint-order="stroke" stroke-linejoin="round"'
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif"


def esc(x: Any) -> str:
    """HTML-escape anything (quotes too: the result may land in an attribute); control characters made visible."""
    return html.escape(visible(x, keep=" \n\t"), quote=True)


def mb(n: float) -> str:
    v = n / 1e6
    if v >= 100:
        return f"{v:.0f} MB"
    if v >= 10:
        return f"{v:.1f} MB"
    if v >= 1:
        return f"{v:.2f} MB"
    return f"{v:.3f} MB"


def tick(v: float) -> str:
    return f"{v:.4g}"


def ms(v: float) -> str:
    return f"{fmt_num(v)} ms"


def sec(v: float) -> str:
    return f"{fmt_num(v)} s"


def ticks(vmax: float, n: int = 5) -> list[float]:
    """Round tick values 0 .. >= vmax."""
    raw = vmax / n
    if not raw > 1e-300 or not math.isfinite(raw):  # nothing to scale (0, subnormal, inf)
        return [0.0, 1.0]
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if raw <= step:
            break
    k = max(1, math.ceil(vmax / step - 1e-9))
    return [i * step for i in range(k + 1)]


def text(x: float, y: float, s: str, size: float = 12, anchor: str = "start", fill: str = "#222",
         extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}"{extra}>'
            f'{esc(s)}</text>')


def svg(w: float, h: float, body: Iterable[str], label: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w:.0f} {h:.0f}" width="{w:.0f}" '
            f'height="{h:.0f}" role="img" aria-label="{esc(label)}" style="{FONT}"{c}>' + "".join(body) + "</svg>")


def short_name(name: str, n: int = 30) -> str:
    """Keep the tail of a long dotted name (the distinctive part), dropping whole leading components."""
    name = visible(name)
    if len(name) <= n:
        return name
    parts = name.split(".")
    while len(parts) > 1 and len(".".join(parts)) > n - 1:
        parts.pop(0)
    tail = ".".join(parts)
    return "\u2026" + (tail if len(tail) <= n - 1 else tail[-(n - 1):])


@dataclass
class Bar:
    """One bar of :func:`hbars`: ``value`` >= 0, optional whisker end ``hi``, right-hand ``label``, hover ``tip``,
    ``parts`` (stacked: (value, colour, name))."""

    name: str
    value: float
    color: str
    label: str = ""
    tip: str = ""
    hi: float | None = None
    opacity: float = 1.0
    parts: list[tuple[float, str, str]] | None = None


def hbars(rows: list[Bar], *, title: str, fmt: Callable[[float], str] = fmt_num, tick_fmt: Callable = tick,
          width: int = 980, xmax: float | None = None, log: bool = False, ref: tuple[float, str] | None = None,
          label_w: int | None = None, right_w: int = 190, axis_label: str = "") -> str:
    """Horizontal bar chart (empty string for no rows)."""
    if not rows:
        return ""
    row_h, bar_h, top, bottom = 24, 15, 8, 30
    if label_w is None:
        label_w = int(min(300, 14 + 6.9 * max(len(visible(r.name)) for r in rows)))
    x0, x1 = label_w, width - right_w
    vmax = xmax if xmax is not None else max(max(r.value, r.hi or 0) for r in rows)
    if log:
        pos = [v for r in rows for v in (r.value, r.hi) if v is not None and v > 1e-300]
        lo_v = 10 ** math.floor(math.log10(min(pos))) if pos else 1.0
        hi_v = 10 ** math.ceil(math.log10(max(pos))) if pos else 10.0
        if hi_v <= lo_v:
            hi_v = lo_v * 10
        tks = [lo_v * 10 ** i for i in range(int(round(math.log10(hi_v / lo_v))) + 1)]

        def sx(v: float) -> float:
            return x0 + (x1 - x0) * (math.log10(max(v, lo_v) / lo_v) / math.log10(hi_v / lo_v))
    else:
        tks = ticks(vmax)
        top_v = tks[-1] if xmax is None else xmax
        if xmax is not None:
            tks = [t for t in ticks(xmax) if t <= xmax + 1e-9]

        def sx(v: float) -> float:
            return x0 + (x1 - x0) * (min(max(v, 0.0), top_v) / top_v if top_v else 0.0)
    h = top + row_h * len(rows) + bottom
    out = []
    for t in tks:  # grid
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom + 4}" stroke="#e3e3e3"/>')
        out.append(text(x, h - bottom + 16, tick_fmt(t), 10, "middle", "#666"))
    if axis_label:
        out.append(text(x1, h - 2, axis_label, 10, "end", "#666"))
    xref = None
    if ref is not None:
        x = xref = sx(ref[0])
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{h - bottom + 4}" stroke="#222" '
                   f'stroke-dasharray="4 3"><title>{esc(ref[1])}</title></line>')
    for i, r in enumerate(rows):
        y = top + i * row_h + (row_h - bar_h) / 2
        cy = y + bar_h / 2
        label = r.label or fmt(r.value)
        out.append(text(x0 - 8, cy + 4, r.name, 12, "end"))
        out.append(f"<g><title>{esc(r.tip or (r.name + ': ' + label))}</title>")
        if r.parts:
            acc = 0.0
            for pv, pc, pn in r.parts:
                xa, xb = sx(acc), sx(acc + pv)
                out.append(f'<rect x="{xa:.1f}" y="{y:.1f}" width="{max(xb - xa, 0):.1f}" height="{bar_h}" '
                           f'fill="{pc}"><title>{esc(pn)}: {esc(mb(pv))}</title></rect>')
                acc += pv
        else:
            out.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(sx(r.value) - x0, 0.75):.1f}" height="{bar_h}" '
                       f'fill="{r.color}" fill-opacity="{r.opacity}" stroke="{r.color}" rx="2"/>')
        end = sx(r.value)
        if r.hi is not None and r.hi > r.value:
            xh = sx(r.hi)
            out.append(f'<line x1="{end:.1f}" y1="{cy:.1f}" x2="{xh:.1f}" y2="{cy:.1f}" stroke="#333" '
                       f'stroke-width="1.2"/><line x1="{xh:.1f}" y1="{cy - 5:.1f}" x2="{xh:.1f}" y2="{cy + 5:.1f}" '
                       f'stroke="#333" stroke-width="1.2"/>')
            end = xh
        out.append("</g>")
        tx = end + 6
        if xref is not None and tx - 3 <= xref <= tx + 6.2 * len(label):
            tx = xref + 5  # keep the value clear of the dashed reference line
        out.append(text(tx, cy + 4, label, 11, "start", "#333", HALO))
    return svg(width, h, out, title)


def legend(items: Iterable[tuple[str, str]]) -> str:
    return ('<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{esc(n)}</span>'
                                             for n, c in items) + "</div>")
