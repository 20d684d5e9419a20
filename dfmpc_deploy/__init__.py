"""dfmpc-deploy: data-free mixed-precision compensation (DF-MPC) and deployment of CNNs.

The pipeline, one package per stage: ``zoo`` (models, data) -> ``passes`` (recipes of compensation passes) ->
``io`` (the packed .dfmpc file) -> ``deploy`` (ONNX, ONNX Runtime, TensorRT) -> ``report``; ``core`` holds the
shared vocabulary (bit widths, quantizers, the graph analysis, the compensated-model state) and ``build`` chains it
all for the CLI.
"""
from .core.config import BitsSpec, WeightFormat, parse_bits
from .errors import DfmpcError

__version__ = "0.2.0"

__all__ = ["BitsSpec", "WeightFormat", "parse_bits", "DfmpcError", "compensate", "load_model", "RECIPES",
           "save_packed", "load_packed", "__version__"]


def __getattr__(name):  # keep `import dfmpc_deploy` light: torch-heavy modules load on first use
    if name in ("compensate", "RECIPES"):
        from .passes import recipes
        return getattr(recipes, name)
    if name == "load_model":
        from .zoo.models import load_model
        return load_model
    if name in ("save_packed", "load_packed"):
        from .io import container
        return getattr(container, name)
    raise AttributeError(name)
