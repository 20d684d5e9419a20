"""Reusable typed reports for tests (``from tests.report.fixtures import full_report``).

* :func:`full_report`: every section filled, from a real ``dfmpc-deploy build`` of ResNet-20 (2/6, --data 200
  CIFAR-10 test images, --targets ort trt on a CPU machine: ``data/report_v1_resnet20.json``, format 1) plus the
  format-2 sections (recipe passes with the timings and losses that build measured, runtime, statistics, pairs).
* :func:`minimal_report`: only the required sections (what a format-1 conversion of a ``--no-pack`` build holds).
* :func:`rtn_random_report`: ``--method rtn --weights random``, no --data, no targets.
* :func:`deep_report`: ResNet-152-shaped (155 layers with long pytorchcv names, 2 targets x 3 batch sizes).
* :func:`allocation_report`: a per-layer allocation (``--size-budget-mb``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dfmpc_deploy.io.layouts import code_nbytes
from dfmpc_deploy.report import (
    Accuracy,
    Allocation,
    Bits,
    BuildSettings,
    Engine,
    LatencyStats,
    LayerRow,
    PackedSize,
    Packing,
    Pair,
    Parity,
    PassRecord,
    Preprocessing,
    Recipe,
    Report,
    Runtime,
    Sizes,
    Statistics,
    Synthesis,
)

DATA = Path(__file__).resolve().parent / "data"
V1_RESNET20 = DATA / "report_v1_resnet20.json"

__all__ = ["V1_RESNET20", "v1_resnet20", "full_report", "minimal_report", "rtn_random_report", "deep_report",
           "allocation_report", "DFMPC_CONFIG"]

#: the QuantConfig of the real build (its format-1 ``config``)
DFMPC_CONFIG = {"lambda1": 0.5, "lambda2": 0.0, "compensation": False, "c_mode": "paper", "per_channel": False,
                "recal": "synthetic", "recal_scope": "low", "rounding": "gptq", "gptq_scope": "low",
                "grid_search": True, "synth_samples": 32, "synth_steps": 10, "synth_lr": 0.25, "seed": 0,
                "size_budget_bytes": None, "avg_bits": None, "finetune_steps": 400}


def v1_resnet20() -> dict[str, Any]:
    """The real format-1 report.json (a fresh copy)."""
    return json.loads(V1_RESNET20.read_text())


def _rows(v1: dict) -> tuple[LayerRow, ...]:
    return tuple(LayerRow.from_dict(r) for r in v1["layers"])


def full_report() -> Report:
    """Every section filled (see the module docstring)."""
    v1 = v1_resnet20()
    rows = _rows(v1)
    t = v1["timings_s"]
    passes = (
        PassRecord(name="quantize", config={"bits": {"low": 2, "high": 6}, "per_channel": False},
                   seconds=t["quantize_seconds"], info={"layers": len(rows)}),
        PassRecord(name="synthesize", config={"samples": 32, "steps": 10, "lr": 0.25, "seed": 0},
                   seconds=t["synth_seconds"], info={"loss_initial": 14.66912, "loss_final": 2.90756}),
        PassRecord(name="gptq_round", config={"scope": "low", "grid_search": True},
                   seconds=t["rounding_seconds"], info={"rounded_layers": 9}),
        PassRecord(name="recalibrate_bn", config={"scope": "low"}, seconds=t["statistics_seconds"] - t["synth_seconds"]
                   - t["rounding_seconds"], info={}),
        PassRecord(name="compensate", config={"lambda1": 0.5, "lambda2": 0.0, "c_mode": "paper", "fold": False},
                   seconds=t["compensate_seconds"], info={"pairs": 9}),
    )
    pairs = tuple(Pair(low=r.layer, high=r.partner, bn=r.layer.replace("conv1", "bn1"), act="relu")
                  for r in rows if r.role == "low" and r.partner is not None)
    sizes = v1["size_bytes"]
    return Report(
        model=v1["model"], weights=v1["weights"], method="dfmpc",
        bits=Bits.from_rows(rows, low=2, high=6),
        recipe=Recipe(name="dfmpc", description="DF-MPC: low/high pairs, closed-form c, data-free BN statistics",
                      data_used="synthetic", fine_tuning=False, passes=passes),
        runtime=Runtime(threads=2, device="cpu", torch="2.13.0+cpu"),
        build=BuildSettings(options={"weights": v1["weights"], "method": "dfmpc", "seed": 0, "threads": None,
                                     "targets": ["ort", "trt"], "data": "imagefolder:/data/cifar10/test", "limit": 200},
                            settings={"bits": "2/6"}, weights_path="/data/weights/resnet20-12fca82f.th",
                            weights_sha256="6f9a0c7e7d0f4a4b8e1b1f2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6",
                            version="0.2.0"),
        statistics=Statistics(bn="real", estimator=v1["estimator"],
                              synthesis=Synthesis(samples=32, steps_run=10, steps_max=10, resolution=32,
                                                  loss_initial=14.66912, loss_final=2.90756, stopped_early=False,
                                                  seconds=t["synth_seconds"])),
        pairs=pairs, input_shape=(3, 32, 32),
        preprocessing=Preprocessing.from_dict(v1["preprocessing"]),
        targets=("ort", "trt"),
        accuracy=Accuracy.from_dict(v1["accuracy"]),
        packed_file=v1["packed_file"], packing=Packing.from_dict(v1["packing"]),
        size_bytes=Sizes(fp32=sizes["fp32"], packed=PackedSize.from_size_report(sizes),
                         onnx={k[5:]: v for k, v in sizes.items() if k.startswith("onnx_")}, engine=sizes["engine"]),
        latency_ms=Report.section_from_dict("latency_ms", v1["latency_ms"]),
        speedup=v1["speedup"], threads=v1["threads"],
        parity={k: Parity.from_dict(p) for k, p in v1["parity"].items()},
        engine=Engine.from_dict(v1["engine"]), artifacts=v1["artifacts"],
        timings_s={k: v for k, v in t.items() if not k.endswith("_seconds")},
        layers=rows, notes=tuple(v1["notes"]))


def minimal_report() -> Report:
    """Only the required sections: no runtime/statistics/pairs, no accuracy, no packing, no targets."""
    rows = (LayerRow(layer="conv", kind="conv", role="high", bits=6, format="uniform", shape=(8, 3, 3, 3), params=216,
                     partner=None),)
    return Report(model="tiny", weights="pretrained", method="rtn", bits=Bits.from_rows(rows, low=2, high=6),
                  recipe=Recipe(name="rtn", description="round-to-nearest", data_used="none", fine_tuning=False,
                                passes=(PassRecord(name="quantize", config={}, seconds=0.0),)),
                  input_shape=(3, 16, 16), preprocessing=Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                                                       resize=None),
                  size_bytes=Sizes(fp32=3456), timings_s={}, layers=rows)


def rtn_random_report() -> Report:
    """``--method rtn --weights random``: packed, no --data, no targets, no synthesis."""
    full = full_report()
    rows = tuple(dataclasses.replace(r, c_folded=None, c_min=None, c_mean=None, c_max=None) for r in full.layers)
    return dataclasses.replace(
        full, weights="random", method="rtn",
        recipe=Recipe(name="rtn", description="round-to-nearest at the same bits, no compensation, FP statistics",
                      data_used="none", fine_tuning=False,
                      passes=(PassRecord(name="quantize", config={"bits": {"low": 2, "high": 6}}, seconds=0.04),)),
        statistics=Statistics(bn="real", estimator="none (round-to-nearest)", synthesis=None),
        targets=(), accuracy=None, latency_ms=None, speedup=None, threads=None, parity=None, engine="not requested",
        artifacts=None, size_bytes=dataclasses.replace(full.size_bytes, onnx={}, engine=None),
        timings_s={"load": 0.2, "compensate": 0.05, "pack": 0.01}, layers=rows,
        notes=("Built with seeded RANDOM weights: sizes, latency and export are real, accuracy is not.",))


def deep_report(blocks: tuple[int, ...] = (3, 8, 36, 3)) -> Report:
    """A ResNet-152-shaped report (bottleneck stages ``blocks``): 155 layers with long pytorchcv names."""
    rows = [LayerRow(layer="features.init_block.conv.conv", kind="conv", role="high", bits=6, format="uniform",
                     shape=(64, 3, 7, 7), params=9408, partner=None)]
    pairs = []
    for s, units in enumerate(blocks, start=1):
        w = 64 * 2 ** (s - 1)
        for u in range(1, units + 1):
            base = f"features.stage{s}.unit{u}"
            c1, c2, c3 = (f"{base}.body.conv{k}.conv" for k in (1, 2, 3))
            rows.append(LayerRow(layer=c1, kind="conv", role="high", bits=6, format="uniform", shape=(w, 4 * w, 1, 1),
                                 params=4 * w * w, partner=None))
            i = len(rows)
            rows.append(LayerRow(layer=c2, kind="conv", role="low", bits=2, format="ternary", shape=(w, w, 3, 3),
                                 params=9 * w * w, partner=c3, c_folded=True, c_min=round(0.4 + i / 1000, 4),
                                 c_mean=0.8, c_max=round(1.1 + i / 1000, 4), zero_fraction=round(0.5 + i / 2000, 4)))
            rows.append(LayerRow(layer=c3, kind="conv", role="high-compensating", bits=6, format="uniform",
                                 shape=(4 * w, w, 1, 1), params=4 * w * w, partner=c2))
            pairs.append(Pair(low=c2, high=c3, bn=f"{base}.body.conv2.bn", act="relu"))
            if u == 1:
                rows.append(LayerRow(layer=f"{base}.identity_conv.conv", kind="conv", role="high", bits=6,
                                     format="uniform", shape=(4 * w, w, 1, 1), params=4 * w * w, partner=None))
    rows.append(LayerRow(layer="output", kind="linear", role="high", bits=6, format="uniform", shape=(1000, 2048),
                         params=2048000, partner=None))
    stats = LatencyStats(p50=3.2, p90=3.5, p99=4.0, mean=3.3, iters=100)
    per_b = {b: stats for b in ("1", "8", "32")}
    full = full_report()
    return dataclasses.replace(
        full, model="resnet152", pairs=tuple(pairs), layers=tuple(rows), bits=Bits.from_rows(rows, low=2, high=6),
        input_shape=(3, 224, 224), latency_ms={"ort": {v: per_b for v in ("fp32", "fp16", "wdq", "w8a8", "w8a8_ort")},
                                               "trt": {v: per_b for v in ("fp16", "wdq", "w8a8")}},
        notes=tuple(f"note {k}: " + "x" * 200 for k in range(20)))


def allocation_report() -> Report:
    """A ``--size-budget-mb 0.15`` build: per-layer widths between 2 and 6."""
    full = full_report()
    rows = tuple(dataclasses.replace(r, bits=4, format="uniform", zero_fraction=None) if i % 3 == 0 and r.role == "low"
                 else r for i, r in enumerate(full.layers))
    hist: dict[str, int] = {}
    for r in rows:
        hist[str(r.bits)] = hist.get(str(r.bits), 0) + 1
    bits = Bits.from_rows(rows, low=2, high=6, mixed=True)
    code_bytes = sum(code_nbytes(r.bits, r.params) for r in rows)
    return dataclasses.replace(
        full, method="dfmpc-alloc", layers=rows, bits=bits,
        recipe=dataclasses.replace(full.recipe, name="dfmpc-alloc"),
        allocation=Allocation(bits_histogram=dict(sorted(hist.items())), code_bytes=code_bytes, budget_bytes=150000,
                              avg_code_bits=bits.avg_code_bits, predicted_kl=0.012345, seconds=2.5))


def as_pairs(report: Report) -> list[Any]:
    """(field name, value) of every top-level field (for parametrised tests)."""
    return [(f.name, getattr(report, f.name)) for f in dataclasses.fields(report)]
