"""dfmpc-deploy: data-free mixed-precision compensation (DF-MPC) and deployment of CNNs.

The pipeline, one package per stage: ``zoo`` (models, data) -> ``passes`` (recipes of compensation passes) ->
``io`` (the packed .dfmpc file) -> ``deploy`` (ONNX, ONNX Runtime, TensorRT) -> ``report``; ``core`` holds the
shared vocabulary (bit widths, quantizers, the graph analysis, the compensated-model state) and ``build`` chains it
all for the CLI.
"""
import importlib

from .core.config import BitsSpec, InputSpec, WeightFormat, parse_bits
from .errors import DfmpcError

__version__ = "0.2.0"

__all__ = ["BitsSpec", "WeightFormat", "InputSpec", "parse_bits", "DfmpcError", "api", "compensate", "pack", "export",
           "evaluate", "load_model", "RECIPES", "save_packed", "load_packed", "__version__"]

#: names loaded on first use (keeps ``import dfmpc_deploy`` light: no torch until a stage is used) -> their module.
#: The whole Python API is ``dfmpc_deploy.api`` (``build`` and ``replay`` are there only: ``dfmpc_deploy.build`` and
#: ``dfmpc_deploy.replay`` are the modules that implement them).
_LAZY = {"api": None, "compensate": "api", "pack": "api", "export": "api", "evaluate": "api",
         "RECIPES": "passes.recipes", "load_model": "zoo.models", "save_packed": "io.container",
         "load_packed": "io.container"}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name] or name}")
        return module if _LAZY[name] is None else getattr(module, name)
    raise AttributeError(name)
