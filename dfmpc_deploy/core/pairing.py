"""Find DF-MPC's (low-bit, compensating high-bit) layer pairs from the traced graph, not per model by hand.

A *link* ``a -> b`` exists when conv ``a``'s output reaches conv ``b`` and nothing else, through at most a BatchNorm,
one elementwise activation and pooling (DFMPC_MATH.md Sec. 4): ``a -> [BN] -> [act] -> [pool] -> b`` with
``b.in_channels == a.out_channels``. Links form chains (a plain chain such as VGG is one long chain; a ResNet basic
block is a chain of 2, a bottleneck a chain of 3; a residual add or a concat ends a chain). Each chain is paired from
its end: ``[..., x, y]`` gives ``(x low, y high)``, then ``(v, w)`` before it, and so on. This reproduces the paper's
Fig. 2: basic block (conv1 low, conv2 high), bottleneck (3x3 low, last 1x1 high, first 1x1 high and unpaired),
VGG (alternate, the stem unpaired), MobileNetV2 (depthwise low, project high). Every conv/linear outside a pair is
high-bit (D9).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import DfmpcError

__all__ = ["Link", "LayerRole", "find_links", "find_pairs", "bn_after", "plan_roles"]

_HOMOGENEOUS = (nn.ReLU, nn.Identity, nn.LeakyReLU)  # act(c*z) = c*act(z) for c >= 0
_ACTS = _HOMOGENEOUS + (nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_FN_ACTS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.silu: "silu",
            F.hardswish: "hardswish", F.gelu: "gelu", torch.sigmoid: "sigmoid"}
_METHOD_ACTS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid"}
_FN_POOLS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


@dataclass(frozen=True)
class Link:
    """``low`` conv feeds ``high`` conv through an optional BN and activation.

    Attributes:
        low, high: fully qualified module names.
        bn: fqn of the BatchNorm2d right after ``low`` (None for BN-free chains such as VGG16).
        act: activation name (``relu``, ``relu6``, ``identity``, ...).
        homogeneous: True when act(c z) = c act(z) for c >= 0, so c may be folded into BN (D6-i); otherwise it must
            scale ``high``'s input channels (D6-ii).
    """

    low: str
    high: str
    bn: str | None
    act: str
    homogeneous: bool


@dataclass(frozen=True)
class LayerRole:
    """One quantizable layer's place in the plan."""

    fqn: str
    kind: str  # "conv" | "linear"
    role: str  # "low" | "high-compensating" | "high"
    partner: str | None


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, ... for data-dependent control flow
        raise DfmpcError(f"cannot trace {type(model).__name__} with torch.fx to find the layer pairs ({err}); "
                         f"models need a static conv/BN/activation graph") from err


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _bn_user(node: fx.Node, mods: dict[str, nn.Module]) -> fx.Node | None:
    """The BatchNorm2d node that is ``node``'s sole consumer, if there is one."""
    n = _sole_user(node)
    return n if n is not None and n.op == "call_module" and isinstance(mods[n.target], nn.BatchNorm2d) else None


def find_links(model: nn.Module) -> list[Link]:
    """All conv -> [BN] -> [act] -> [pool] -> conv links of ``model``, in graph order."""
    gm = _trace(model)
    mods = dict(gm.named_modules())
    links = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.Conv2d):
            continue
        conv = mods[node.target]
        n, bn, act, homog = _sole_user(node), None, "identity", True
        if _bn_user(node, mods) is not None:
            bn, n = n.target, _sole_user(n)
        if n is not None and n.op == "call_module" and isinstance(mods[n.target], _ACTS):
            m = mods[n.target]
            act, homog = type(m).__name__.lower(), isinstance(m, _HOMOGENEOUS)
            n = _sole_user(n)
        elif n is not None and n.op == "call_function" and n.target in _FN_ACTS:
            act = _FN_ACTS[n.target]
            homog = act == "relu"
            n = _sole_user(n)
        elif n is not None and n.op == "call_method" and n.target in _METHOD_ACTS:
            act = _METHOD_ACTS[n.target]
            homog = act == "relu"
            n = _sole_user(n)
        while n is not None and ((n.op == "call_module" and isinstance(mods[n.target], _POOLS))
                                 or (n.op == "call_function" and n.target in _FN_POOLS)):
            n = _sole_user(n)
        if (n is not None and n.op == "call_module" and isinstance(mods[n.target], nn.Conv2d)
                and mods[n.target].in_channels == conv.out_channels):
            links.append(Link(node.target, n.target, bn, act, homog))
    return links


def bn_after(model: nn.Module) -> dict[str, str]:
    """``{conv fqn: fqn of the BatchNorm2d that is its sole consumer}`` for every Conv2d followed directly by a BN."""
    gm = _trace(model)
    mods = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.Conv2d):
            bn = _bn_user(node, mods)
            if bn is not None:
                out[node.target] = bn.target
    return out


def find_pairs(links: list[Link]) -> list[Link]:
    """Pair each chain of links from its end (see module docstring); returns the chosen links."""
    by_low = {lk.low: lk for lk in links}
    targets = {lk.high for lk in links}
    pairs = []
    for head in [lk.low for lk in links if lk.low not in targets]:
        chain = [head]
        while chain[-1] in by_low:
            chain.append(by_low[chain[-1]].high)
        i = len(chain) - 1
        while i >= 1:
            pairs.append(by_low[chain[i - 1]])
            i -= 2
    order = {lk.low: k for k, lk in enumerate(links)}
    return sorted(pairs, key=lambda lk: order[lk.low])


def plan_roles(model: nn.Module) -> tuple[list[LayerRole], list[Link]]:
    """Roles of every Conv2d/Linear in ``model`` (module order) and the chosen pairs."""
    pairs = find_pairs(find_links(model))
    low = {p.low: p for p in pairs}
    high = {p.high: p for p in pairs}
    roles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
            if name in low:
                roles.append(LayerRole(name, kind, "low", low[name].high))
            elif name in high:
                roles.append(LayerRole(name, kind, "high-compensating", high[name].low))
            else:
                roles.append(LayerRole(name, kind, "high", None))
    return roles, pairs
