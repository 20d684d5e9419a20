"""One analysis of the model graph, made once per model and handed to every stage that needs structure.

:class:`GraphAnalysis` traces the model once (``calib_free.graph``, the shared vocabulary of activations and layer
units) and derives:

* **units**: every Conv2d / Linear with the BatchNorm and activation that follow it (``layer -> [BN] -> [act]``);
* **links**: ``a -> b`` when conv ``a``'s output reaches conv ``b`` and nothing else, through at most a BatchNorm,
  one elementwise activation and pooling, with ``b.in_channels == a.out_channels``;
* **pairs**: DF-MPC's (low-bit, compensating high-bit) layer pairs. Links through an activation form chains (a plain
  chain such as VGG is one long chain; a ResNet basic block is a chain of 2, a bottleneck a chain of 3; a residual
  add or a concat ends a chain, and so does a link without an activation: a *linear bottleneck*, such as the
  projection of a MobileNetV2 block without a residual feeding the next block's expansion, is a block boundary like
  a residual add, and the layer after it reads the block's stream as a bottleneck's first 1x1 does). Each chain is
  paired from its end: ``[..., x, y]`` gives ``(x low, y high)``, then ``(v, w)`` before it, and so on (Algorithm 1
  of the paper for a plain chain; a stem is paired like any other layer when the chain reaches it). This
  reproduces the paper's Fig. 2: basic block (conv1 low, conv2 high), bottleneck (3x3 low, last 1x1 high, first 1x1
  high and unpaired), VGG (alternate, the stem unpaired), and gives MobileNetV2 (not drawn in the paper) depthwise
  low, projection high in all 17 blocks, the stem, expansions, last 1x1 and classifier high and unpaired.
  Every conv/linear outside a pair is high-bit (docs/MATH.md, D9);
* **roles**: low / high-compensating / high for every layer, in module order.

Users: the quantize pass (roles), the statistics passes (which BN follows which layer), DFQ (links), the ONNX
export (conv -> BN folding, without tracing again) and ``calib_free.ranges`` (through :attr:`GraphAnalysis.graph`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum

import torch.fx as fx
from torch import nn

from calib_free.graph import HOMOGENEOUS, LayerUnit, is_pool, layer_units, modules_of, sole_user, trace

from ..errors import DfmpcError

__all__ = ["Role", "Link", "LayerRole", "GraphAnalysis", "find_pairs"]


class Role(str, Enum):
    """A quantizable layer's place in the DF-MPC plan (serialises to its value)."""

    LOW = "low"  # first layer of a pair: low-bit, its statistics re-estimated, its output compensated
    HIGH_COMPENSATING = "high-compensating"  # second layer of a pair: high-bit, may absorb c (Eq. 7)
    HIGH = "high"  # every other layer: high-bit (D9)


@dataclass(frozen=True)
class Link:
    """``low`` conv feeds ``high`` conv through an optional BN and activation.

    Attributes:
        low, high: fully qualified module names.
        bn: fqn of the BatchNorm2d right after ``low`` (None for BN-free chains such as VGG16).
        act: activation name (``relu``, ``relu6``, ...; ``identity`` when there is none).
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
    role: Role
    partner: str | None


def _is_identity(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(mods[str(node.target)], nn.Identity)


def _links(units: dict[str, LayerUnit], mods: dict[str, nn.Module]) -> list[Link]:
    links = []
    for name, u in units.items():
        if u.kind != "conv":
            continue
        n = sole_user(u.out)
        while n is not None and (is_pool(n, mods) or _is_identity(n, mods)):
            n = sole_user(n)
        if (n is not None and n.op == "call_module" and isinstance(mods[str(n.target)], nn.Conv2d)
                and mods[str(n.target)].in_channels == mods[name].out_channels):
            act = u.act or "identity"
            links.append(Link(name, str(n.target), u.bn, act, u.act is None or act in HOMOGENEOUS))
    return links


def find_pairs(links: list[Link] | tuple[Link, ...]) -> list[Link]:
    """Pair each chain of links from its end (see module docstring); returns the chosen links in graph order.

    Only links through an activation chain: a link without one (``act == "identity"``) ends the chain."""
    links = [lk for lk in links if lk.act != "identity"]
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


@dataclass(frozen=True)
class GraphAnalysis:
    """The traced graph of one architecture and everything derived from it (module docstring).

    Attributes:
        graph: the fx graph (structure only; see :meth:`graph_module` to run it on a model).
        units: ``{layer: LayerUnit}`` for every Conv2d/Linear, graph order.
        links: every conv -> conv link.
        pairs: the chosen (low, high) pairs, graph order.
        roles: every Conv2d/Linear in module order with its role.
    """

    graph: fx.Graph
    units: dict[str, LayerUnit]
    links: tuple[Link, ...]
    pairs: tuple[Link, ...]
    roles: tuple[LayerRole, ...]

    @classmethod
    def of(cls, model: nn.Module) -> GraphAnalysis:
        """Trace ``model`` once and analyse it.

        Raises:
            DfmpcError: the model cannot be traced by torch.fx (one line saying why).
        """
        try:
            graph = trace(model).graph
        except ValueError as err:
            raise DfmpcError(str(err)) from None
        mods = modules_of(model)
        units = layer_units(graph, mods)
        links = _links(units, mods)
        pairs = find_pairs(links)
        low = {p.low: p for p in pairs}
        high = {p.high: p for p in pairs}
        roles = []
        for name, m in mods.items():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
                if name in low:
                    roles.append(LayerRole(name, kind, Role.LOW, low[name].high))
                elif name in high:
                    roles.append(LayerRole(name, kind, Role.HIGH_COMPENSATING, high[name].low))
                else:
                    roles.append(LayerRole(name, kind, Role.HIGH, None))
        return cls(graph, units, tuple(links), tuple(pairs), tuple(roles))

    @property
    def bn_after(self) -> dict[str, str]:
        """``{layer: the BatchNorm2d that is its sole consumer}``."""
        return {name: u.bn for name, u in self.units.items() if u.bn is not None}

    def graph_module(self, model: nn.Module) -> fx.GraphModule:
        """A GraphModule running this graph on ``model``'s modules (shared, not copied): no second trace."""
        return fx.GraphModule(model, copy.deepcopy(self.graph))
