"""The only way optional heavy dependencies are imported (lazily, with an install hint)."""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["require", "available", "quiet_onnxruntime"]


def quiet_onnxruntime() -> None:
    """Before ONNX Runtime is imported: turn off its usage telemetry, which otherwise writes a device id and a usage
    database under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` (outside ``--out``) at import. A value the user
    set is kept."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def available(module: str) -> bool:
    """True when ``module`` can be imported (probed with find_spec, nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that provides it.

    Args:
        module: dotted module name, e.g. ``"onnxruntime"``.
        extra: the dfmpc-deploy extra that installs it, e.g. ``"ort"``.
    """
    if module.split(".")[0] == "onnxruntime":
        quiet_onnxruntime()
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"'{module}' is needed for this step but could not be imported ({err}). "
            f"Install it with: pip install 'dfmpc-deploy[{extra}]'"
        ) from err
