"""dfmpc-deploy: data-free mixed-precision compensation (DF-MPC) and deployment of CNNs."""
from .core.config import BitsSpec, QuantConfig, WeightFormat, parse_bits
from .errors import DfmpcError

__version__ = "0.1.0"

__all__ = ["BitsSpec", "QuantConfig", "WeightFormat", "parse_bits", "DfmpcError", "compensate", "load_model",
           "__version__"]


def __getattr__(name):  # keep `import dfmpc_deploy` light: torch-heavy modules load on first use
    if name == "compensate":
        from .passes.compensate import compensate
        return compensate
    if name == "load_model":
        from .zoo.models import load_model
        return load_model
    raise AttributeError(name)
