"""Grid files for the sweep tests: the real ResNet-20 (tiny budgets) and a model whose weights file is missing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import CIFAR_TEST, R20_WEIGHTS

R20 = "resnet20_cifar10_optA"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


def grid_text(models: list[dict[str, Any]], grid: dict[str, Any] | None = None,
              build: dict[str, Any] | None = None) -> str:
    """A grid file: one [[model]] table per dict, then [grid] and [build]."""
    lines = []
    for m in models:
        lines.append("[[model]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in m.items()]
    for name, table in (("grid", grid), ("build", build)):
        if table is not None:
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write_grid(path: Path, models: list[dict[str, Any]], grid: dict[str, Any] | None = None,
               build: dict[str, Any] | None = None) -> Path:
    path.write_text(grid_text(models, grid, build), encoding="utf-8")
    return path


def r20(limit: int = 20, **extra: Any) -> dict[str, Any]:
    """The real ResNet-20 on ``limit`` real CIFAR-10 test images."""
    return {"name": R20, "weights": str(R20_WEIGHTS), "data": f"imagefolder:{CIFAR_TEST}", "limit": limit, **extra}


def missing_weights(tmp: Path) -> dict[str, Any]:
    """ResNet-20 with a weights file that does not exist: every cell of it fails at load time."""
    return {"name": R20, "weights": str(tmp / "no-such-weights.th"), "data": f"imagefolder:{CIFAR_TEST}",
            "limit": 20}


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (inode, mtime_ns)}`` of every file and folder under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}
