"""The model graph, traced once: the vocabulary every graph walk of the project shares.

One torch.fx trace gives the graph; :func:`layer_units` matches the ``layer -> [BatchNorm] -> [activation]`` pattern
once for every Conv2d / Linear. The activation, pooling and pass-through tables below are the only copies in the
project: ``calib_free.ranges`` (activation ranges from BN statistics) and ``dfmpc_deploy.core.graph`` (pairing, DFQ,
export) both read them.

A traced :class:`torch.fx.Graph` holds structure only; modules are looked up by their qualified name, so one graph
serves every model of the same architecture (the FP32 model, its quantized copy, a model read back from a file).

This module does not import ``dfmpc_deploy``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["ACT_MODULES", "ACT_FUNCTIONS", "ACT_METHODS", "HOMOGENEOUS", "LayerUnit", "trace", "activation",
           "is_pool", "is_passthrough", "sole_user", "layer_units", "modules_of"]

#: elementwise activation modules -> name
ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.ELU: "elu", nn.Mish: "mish"}
#: elementwise activation functions -> name
ACT_FUNCTIONS: dict[object, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh",
    F.leaky_relu: "leaky_relu", F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    F.gelu: "gelu", F.elu: "elu", F.mish: "mish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh"}
#: elementwise activation tensor methods -> name
ACT_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                               "tanh": "tanh", "tanh_": "tanh"}
#: activations with act(c z) = c act(z) for every c >= 0 (a per-channel scale may move through them)
HOMOGENEOUS = frozenset({"relu", "leaky_relu"})

_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
_PASS_FUNCTIONS = {F.dropout, torch.flatten}
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous", "clone", "detach", "mean", "squeeze"}


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``; a model fx cannot trace raises one ValueError saying why.

    Raises:
        ValueError: data-dependent control flow or other untraceable code (fx raises many exception types).
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ... for untraceable code
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
                         f"the model needs a static conv/BN/activation graph") from err


def modules_of(model: nn.Module) -> dict[str, nn.Module]:
    """``dict(model.named_modules())``: how a graph's node targets are resolved in any model of the architecture."""
    return dict(model.named_modules())


def sole_user(node: fx.Node) -> fx.Node | None:
    """The only node that reads ``node``, or None when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def activation(node: fx.Node, mods: Mapping[str, nn.Module]) -> str | None:
    """The activation name (``relu``, ``relu6``, ...) when ``node`` is an elementwise activation, else None."""
    if node.op == "call_module":
        return ACT_MODULES.get(type(mods[str(node.target)]))
    if node.op == "call_function":
        return ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return ACT_METHODS.get(str(node.target))
    return None


def is_pool(node: fx.Node, mods: Mapping[str, nn.Module]) -> bool:
    """Spatial pooling (max / average, fixed or adaptive): keeps the channels."""
    return ((node.op == "call_module" and isinstance(mods[str(node.target)], _POOL_MODULES))
            or (node.op == "call_function" and node.target in _POOL_FUNCTIONS))


def is_passthrough(node: fx.Node, mods: Mapping[str, nn.Module]) -> bool:
    """Pooling, dropout, identity, flatten and reshapes: values keep their per-channel distribution (or a bound)."""
    return (is_pool(node, mods)
            or (node.op == "call_module" and isinstance(mods[str(node.target)], _PASS_MODULES))
            or (node.op == "call_function" and node.target in _PASS_FUNCTIONS)
            or (node.op == "call_method" and node.target in _PASS_METHODS))


@dataclass(frozen=True)
class LayerUnit:
    """One Conv2d / Linear with the BatchNorm and activation that follow it (each the sole reader of what precedes).

    Attributes:
        layer: the layer's qualified module name.
        kind: ``conv`` or ``linear``.
        node: the layer's graph node.
        bn: qualified name of the BatchNorm2d that is the layer's sole consumer, or None.
        act: activation name after the layer (or its BN), when that activation is the sole consumer; else None.
        out: the unit's last node (the activation, else the BN, else the layer): what an inference engine sees
            after folding BN and fusing the activation.
    """

    layer: str
    kind: str
    node: fx.Node
    bn: str | None
    act: str | None
    out: fx.Node


def layer_units(graph: fx.Graph, mods: Mapping[str, nn.Module]) -> dict[str, LayerUnit]:
    """``{layer fqn: LayerUnit}`` for every Conv2d / Linear call in ``graph``, in graph order."""
    units: dict[str, LayerUnit] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods[str(node.target)], (nn.Conv2d, nn.Linear)):
            continue
        name = str(node.target)
        kind = "conv" if isinstance(mods[name], nn.Conv2d) else "linear"
        out, bn, act = node, None, None
        nxt = sole_user(out)
        if nxt is not None and nxt.op == "call_module" and isinstance(mods[str(nxt.target)], nn.BatchNorm2d):
            bn, out = str(nxt.target), nxt
            nxt = sole_user(out)
        if nxt is not None and activation(nxt, mods) is not None:
            act, out = activation(nxt, mods), nxt
        if name not in units:  # a layer called twice keeps its first call
            units[name] = LayerUnit(name, kind, node, bn, act, out)
    return units
