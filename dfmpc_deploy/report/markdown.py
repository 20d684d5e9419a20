"""report.json (versioned, atomic) and report.md for a build."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_json, atomic_write_text

__all__ = ["REPORT_FORMAT_VERSION", "layer_table", "write_report", "render_markdown"]

REPORT_FORMAT_VERSION = 1


def layer_table(mp) -> list[dict[str, Any]]:
    """One row per quantized layer: name, kind, role, bits, shape, params and compensation statistics."""
    rows = []
    for q in mp.layers.values():
        row = {"layer": q.fqn, "kind": q.kind, "role": q.role, "bits": q.bits, "format": q.fmt.value,
               "shape": list(q.codes.shape), "params": q.numel, "partner": q.partner}
        if q.c is not None:
            row["c_folded"] = q.c_folded
            row["c_min"] = round(float(q.c.min()), 4)
            row["c_mean"] = round(float(q.c.mean()), 4)
            row["c_max"] = round(float(q.c.max()), 4)
        if q.bits == 2:
            row["zero_fraction"] = round(float((q.codes == 0).float().mean()), 4)
        rows.append(row)
    return rows


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def render_markdown(rep: dict) -> str:
    """Human summary of a report dict."""
    lines = [f"# dfmpc-deploy build: {rep['model']}", ""]
    lines.append(f"- weights: {rep['weights']}" + ("  **(random weights: accuracy is meaningless)**"
                                                    if rep["weights"] == "random" else ""))
    alloc = rep.get("allocation")
    if alloc:
        hist = ", ".join(f"{n} layers at {b} bits" for b, n in alloc["bits_histogram"].items())
        lines.append(f"- bits: {rep['bits']}, chosen per layer by data-free sensitivity within "
                     f"{alloc['budget_bytes']} bytes: {hist} (2 = ternary; activations FP32)")
    else:
        lines.append(f"- bits: {rep['bits']}  (low = {'ternary' if rep['bits'].startswith('2/') else 'DoReFa'},"
                     f" high = DoReFa; activations FP32)")
    lines.append(f"- method: {rep['method']}; BN statistics estimator: {rep['estimator']}")
    for p in rep.get("recipe", {}).get("passes", []):
        lines.append(f"- pass {p['name']} ({p['seconds']} s): {p['config']}")
    acc = rep.get("accuracy")
    if acc:
        lines += ["", f"## Accuracy on {acc['dataset']} (n = {acc['n']})", "",
                  "| model | top-1 % | top-5 % |", "|---|---|---|"]
        for k, v in acc.items():
            if isinstance(v, dict) and "top1" in v:
                lines.append(f"| {k} | {v['top1']:.2f} | {v.get('top5', float('nan')):.2f} |")
    sizes = rep.get("size_bytes")
    if sizes:
        lines += ["", "## Size", "", "| artifact | bytes | |", "|---|---|---|"]
        for k, v in sizes.items():
            if isinstance(v, (int, float)):
                lines.append(f"| {k} | {int(v)} | {_fmt_bytes(v)} |")
    lat = rep.get("latency_ms")
    if lat:
        lines += ["", "## Latency (ms)", "", "| target | variant | batch | p50 | p90 | p99 |", "|---|---|---|---|---|---|"]
        for tgt, variants in lat.items():
            for var, per_b in variants.items():
                if not isinstance(per_b, dict):
                    continue
                for b, st in per_b.items():
                    if isinstance(st, dict) and "p50" in st:
                        lines.append(f"| {tgt} | {var} | {b} | {st['p50']:.3f} | {st['p90']:.3f} | {st['p99']:.3f} |")
    lines += ["", "## Stage timings (s)", ""]
    lines += [f"- {k}: {v}" for k, v in rep.get("timings_s", {}).items()]
    lines += ["", "## Layers", "", "| layer | role | bits | shape | c mean (min..max) |", "|---|---|---|---|---|"]
    for r in rep.get("layers", []):
        c = f"{r['c_mean']} ({r['c_min']}..{r['c_max']})" if "c_mean" in r else ""
        lines.append(f"| {r['layer']} | {r['role']} | {r['bits']} | {'x'.join(map(str, r['shape']))} | {c} |")
    for n in rep.get("notes", []):
        lines.append(f"\n> {n}")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, rep: dict) -> None:
    """Write report.json, report.md and the self-contained report.html atomically into ``out_dir``."""
    from .html import render_html

    rep = {"format_version": REPORT_FORMAT_VERSION, **rep}
    atomic_write_json(out_dir / "report.json", rep)
    atomic_write_text(out_dir / "report.md", render_markdown(rep))
    atomic_write_text(out_dir / "report.html", render_html(rep))
