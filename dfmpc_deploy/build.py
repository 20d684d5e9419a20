"""The `build` pipeline: load -> compensate -> pack -> export/targets -> report, into one output directory.

Everything is written into a hidden sibling directory first and renamed onto ``--out`` at the end, so an
interrupted or failed build never leaves a half-written output directory (:class:`~dfmpc_deploy.io.outdir.OutputDir`:
checks and locks ``--out`` before any work).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .core.config import QuantConfig
from .errors import DfmpcError
from .io.outdir import OutputDir
from .passes.recipes import METHODS, method_config, method_overrides
from .report.markdown import layer_table, write_report
from .zoo.data import DataSpec, load_dataset

__all__ = ["BuildConfig", "run_build", "METHODS"]

log = logging.getLogger("dfmpc_deploy")


@dataclass
class BuildConfig:
    """Options of one build (CLI flags map 1:1)."""

    model: str
    weights: str = "pretrained"
    quant: QuantConfig = field(default_factory=QuantConfig)
    method: str = "dfmpc"
    data: DataSpec | None = None
    limit: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    targets: tuple[str, ...] = ("torch",)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    out: Path = Path("out")
    force: bool = False
    unsafe_pickle: bool = False
    pack: bool = True
    compress: bool = False
    explicit: frozenset[str] = frozenset()  # QuantConfig fields the user set by flag (for override warnings)


def run_build(cfg: BuildConfig, progress=None, warn=None) -> dict:
    """Run the whole pipeline; returns the report dict (also written to ``cfg.out/report.json``).

    ``warn(message)`` receives one line per user flag the chosen method replaces or ignores (default: the
    ``dfmpc_deploy`` logger at WARNING); the report's ``notes`` list them too.
    """
    from .zoo.evaluate import accuracy
    from .zoo.models import load_model

    with OutputDir(cfg.out, force=cfg.force) as tmp:  # checks and locks --out before any work (io/outdir.py)
        rep = _run(cfg, tmp, progress, accuracy, load_model, warn or (lambda m: log.warning("warning: %s", m)))
        write_report(tmp, rep)
    return {"format_version": 1, **rep}


def _relative_paths(obj, tmp: Path):
    """Artifact paths in the report are relative to --out (they were written into the temp directory)."""
    if isinstance(obj, dict):
        return {k: _relative_paths(v, tmp) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_paths(v, tmp) for v in obj]
    if isinstance(obj, (str, Path)) and str(obj).startswith(str(tmp)):
        return str(Path(obj).relative_to(tmp))
    return obj


def _stage_label(method: str, qcfg: QuantConfig) -> str:
    if METHODS[method].fine_tuning:
        return f"{method}: train"
    return "synthesise + score" if qcfg.allocating or method == "dfmpc-alloc" else "synthesise inputs"


def _task(progress, label):
    return progress.task(label) if progress is not None else None


def _run(cfg, tmp, progress, accuracy, load_model, warn) -> dict:
    timings = {}
    t = time.perf_counter()
    lm = load_model(cfg.model, cfg.weights, seed=cfg.quant.seed, unsafe_pickle=cfg.unsafe_pickle)
    spec = lm.spec
    timings["load"] = round(time.perf_counter() - t, 3)
    input_shape = (3, spec.input_size, spec.input_size)
    mean, std = cfg.mean or spec.mean, cfg.std or spec.std

    data = None
    if cfg.data is not None:
        t = time.perf_counter()
        data = load_dataset(cfg.data, spec.input_size, spec.resize, mean, std, cfg.limit,
                            progress=_task(progress, "load data"))
        timings["load_data"] = round(time.perf_counter() - t, 3)

    if cfg.method not in METHODS:
        raise DfmpcError(f"unknown method '{cfg.method}': choose one of {', '.join(METHODS)}")
    qcfg = method_config(cfg.method, cfg.quant)
    overridden = method_overrides(cfg.method, cfg.quant, cfg.explicit)
    for msg in overridden:
        warn(msg)
    real = None
    if qcfg.recal == "real":
        if data is None:
            raise DfmpcError("--recal real (a labelled real-data reference) needs --data")
        real = data.images[torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[:200]]

    t = time.perf_counter()
    mp = METHODS[cfg.method].run(lm.module, cfg.quant, input_shape, arch=cfg.model, real_inputs=real,
                                 progress=_task(progress, _stage_label(cfg.method, qcfg)))
    timings["compensate"] = round(time.perf_counter() - t, 3)
    log.info("compensated %s in %.2f s (%s)", cfg.model, timings["compensate"], mp.estimator)

    rep: dict = {"model": cfg.model, "weights": lm.weights if lm.weights in ("random", "pretrained") else str(lm.weights),
                 "bits": str(qcfg.bits), "method": cfg.method, "estimator": mp.estimator,
                 "config": {k: v for k, v in vars(qcfg).items() if k != "bits"},
                 "input_shape": list(input_shape), "preprocessing": {"mean": list(mean), "std": list(std),
                                                                      "resize": spec.resize}}
    notes = [f"--method {cfg.method}: {msg}" for msg in overridden]
    if "allocation" in mp.info:
        a = mp.info["allocation"]
        rep["bits"] = f"mixed {qcfg.bits.low}..{qcfg.bits.high} ({a['avg_code_bits']} bits/weight)"
        rep["allocation"] = a
    if lm.weights == "random":
        notes.append("Built with seeded RANDOM weights: sizes, latency and export are real, accuracy is not.")

    if data is not None:
        t = time.perf_counter()
        acc = {"dataset": data.name, "n": len(data.labels)}
        acc["fp32"] = accuracy(lm.module, data, progress=_task(progress, "eval fp32"))
        if cfg.method == "rtn":
            acc["quantized_uncompensated"] = accuracy(mp.module, data, progress=_task(progress, "eval rtn"))
        else:
            rtn = METHODS["rtn"].run(lm.module, cfg.quant, input_shape, arch=cfg.model)
            acc["quantized_uncompensated"] = accuracy(rtn.module, data, progress=_task(progress, "eval uncompensated"))
            acc[cfg.method] = accuracy(mp.module, data, progress=_task(progress, f"eval {cfg.method}"))
        timings["evaluate"] = round(time.perf_counter() - t, 3)
        rep["accuracy"] = acc

    from .io.container import fp32_nbytes, save_packed
    sizes = {"fp32": fp32_nbytes(lm.module)}
    if cfg.pack:
        t = time.perf_counter()
        pack_info = save_packed(mp, tmp / "model.dfmpc", compress=cfg.compress)
        byte_keys = ("fp32", "packed", "low_bit_codes", "high_bit_codes", "scales", "float_tensors", "metadata",
                     "theoretical", "theoretical_min")
        sizes.update({k: pack_info[k] for k in byte_keys if k in pack_info})
        rep["packed_file"] = "model.dfmpc"
        rep["packing"] = {k: v for k, v in pack_info.items() if k not in byte_keys}
        timings["pack"] = round(time.perf_counter() - t, 3)
    rep["size_bytes"] = sizes

    wanted = [x for x in cfg.targets if x != "torch"]
    if wanted:
        t = time.perf_counter()
        from .deploy.targets import run_targets
        frag = run_targets(mp, lm.module, input_shape, wanted, tmp, dataset=data, batch_sizes=cfg.batch_sizes,
                           progress=progress.say if progress is not None else None)
        frag = _relative_paths(frag, tmp)
        rep["size_bytes"].update(frag.get("size_bytes", {}))
        if frag.get("accuracy") and "accuracy" in rep:
            rep["accuracy"].update(frag["accuracy"])
        for k in ("latency_ms", "speedup", "threads", "parity", "engine", "artifacts"):
            if k in frag:
                rep[k] = frag[k]
        notes += frag.get("notes", [])
        timings["targets"] = round(time.perf_counter() - t, 3)

    rep["timings_s"] = {**timings, **{k: v for k, v in mp.info.items() if k.endswith("seconds")}}
    rep["diagnostics"] = {k: v for k, v in mp.info.items() if not k.endswith("seconds")}
    rep["layers"] = layer_table(mp)
    rep["notes"] = notes
    return rep
