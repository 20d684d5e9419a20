"""report.html's stylesheet and colours (inline: the page loads nothing)."""
from __future__ import annotations

__all__ = ["CSS", "ROLE_COLORS", "ROLE_LABELS", "VARIANT_COLORS", "EXTRA_COLORS", "PACK_COLORS", "TARGET_NAMES"]

ROLE_COLORS = {"low": "#e8702a", "high-compensating": "#3b6fb6", "high": "#58a55c"}
ROLE_LABELS = {"low": "low (ternary / low-bit)", "high-compensating": "high, compensating", "high": "high (unpaired)"}
VARIANT_COLORS = {"fp32": "#8d8d8d", "fp16": "#4eb3a9", "wdq": "#3b6fb6", "w8a8": "#e8702a", "w8a8_ort": "#d64550",
                  "eager_fp16": "#9c6bb0", "cudagraph_fp16": "#e58fb4", "packed": "#58a55c"}
EXTRA_COLORS = ("#b07aa1", "#9d755d", "#bab0ac", "#76b7b2", "#edc948", "#ff9da7")
PACK_COLORS = {"low_bit_codes": ("low-bit codes", "#e8702a"), "high_bit_codes": ("high-bit codes", "#3b6fb6"),
               "scales": ("scales", "#edc948"), "float_tensors": ("float tensors (BN, bias)", "#8d8d8d"),
               "metadata": ("metadata", "#c7c7c7")}
TARGET_NAMES = {"ort": "ONNX Runtime (CPU)", "trt": "TensorRT (GPU)", "torch-cuda": "PyTorch CUDA"}

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
section h4{font-size:12.5px;margin:8px 0 2px;color:#555}
svg{max-width:100%;height:auto;display:block}
svg.layers{max-width:none}
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
