"""Data-free activation ranges for INT8 activation quantization, from BatchNorm statistics alone.

Every Conv2d / Linear input gets a per-channel range ``[lo, hi]``; the quantizer used downstream is **per-tensor
symmetric INT8** (``ActRange.amax`` / ``ActRange.scale``: zero-point 0, ``scale = amax / 127``, the only form
TensorRT's explicit quantization accepts). ONNX Runtime's fused kernels prefer asymmetric UINT8, which
dfmpc_deploy.export_onnx derives from the same ``lo``/``hi`` (its ``w8a8_ort`` form). Nothing is run on data: the
model's own BN layers say what their outputs look like, and that is propagated through the rest of the graph (a
torch.fx walk). :func:`estimate_output_ranges` gives the same for layer outputs (after their BN and activation).

Rules (per channel, each node carries ``mean``, ``std`` and a range ``[lo, hi]``):

* network input: ``[(0 - mean_c)/std_c, (1 - mean_c)/std_c]`` from the input normalisation (pixels in [0, 1]),
  moments of a uniform distribution on that interval. Without ``input_range`` the input is taken as N(0, 1).
* BatchNorm: in eval mode its output is ``gamma (x - mu)/sigma + beta`` and x has the stored mean/variance, so the
  output is ``~ N(beta, gamma^2)``: range ``beta -+ k |gamma|``.
* elementwise activation ``f`` (ReLU, ReLU6, Hardtanh, SiLU, Hardswish, GELU, Sigmoid, ...): range = ``[min f, max f]``
  over ``[lo, hi]`` (so ReLU clips at 0, ReLU6 at 0 and 6); moments ``E f(X)``, ``Var f(X)`` for ``X ~ N(mean, std^2)``
  by quadrature on a 2001-point grid over +-8 std (accurate for kinks such as ReLU's, unlike Gauss-Hermite).
* residual add ``a + b``: the branches are taken as independent. Means and variances add, and so do the squared
  half-widths of the ranges on each side of the mean: ``hi = mean_a + mean_b + sqrt((hi_a - mean_a)^2 +
  (hi_b - mean_b)^2)`` (likewise ``lo``). For Gaussian branches this is ``mean -+ k sqrt(std_a^2 + std_b^2)``; for a
  post-ReLU branch it keeps that branch's real upper tail (``k`` from the pre-activation Gaussian), which a Gaussian
  refit of its moments would understate (relu(N(0,1)): mean + 3.92 std = 2.69, 99.99th percentile 3.72). It never
  exceeds the sum of the two ranges (the perfectly correlated bound), which would grow linearly with depth (4x the
  observed maximum at the end of ResNet-20).
* pooling, flatten, dropout, identity: unchanged (for average pooling this is conservative). Channel slicing, channel
  padding (``F.pad`` of the channel dim, option-A shortcuts) and ``cat`` along channels act on the per-channel arrays.
* Conv2d / Linear not followed by BN: moments propagate with independent inputs (``mean = sum W mean_in + b``,
  ``var = sum W^2 std_in^2``), range ``mean -+ k std``. A flatten that mixes channels into features collapses the
  per-channel arrays into their envelope.

**Models without statistics** (``statistics="propagate"``): when the BN layers carry identity statistics (BN folded
into the convolutions before publication), the stored statistics describe nothing, so every BatchNorm is applied to
the propagated moments as the affine map it is (``mean' = gamma (mean - mu)/sigma + beta``, ``std' = |gamma|/sigma
std``) and the moments come from the weights alone, from a standardised N(0, 1) input (the normalisation constants
are the training set's pixel mean and std). A convolution then sees each input channel as *locally constant* over
its window (``var = sum_i (sum_k W_ik)^2 std_i^2``): natural images and the feature maps computed from them are
smooth at the scale of a 3x3 window (neighbouring pixels correlate at about 0.9), which independent window entries
(``sum W^2``) would ignore; 1x1 convolutions and Linear layers are the same under both. Input channels stay
independent of each other.

**Choice of k** (:func:`gaussian_clip_k`): for a quantizer with ``L = 2^(b-1) - 1`` levels per side and a Gaussian
input, the expected error at clipping point ``alpha = k sigma`` is ``(alpha/L)^2/12 * P(|x| < alpha) +
2[(1 + alpha^2) Q(alpha) - alpha phi(alpha)]`` (rounding noise plus clipping error, sigma = 1). The default ``k`` is the
minimiser for ``bits = 8``: 3.92. It is computed (golden-section search), never tuned against test accuracy.

This module does not import ``dfmpc_deploy``.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph import activation, is_passthrough, layer_units, modules_of, trace

__all__ = ["ActRange", "estimate_act_ranges", "estimate_output_ranges", "gaussian_clip_k", "gaussian_clip_mse",
           "input_range_from_normalization", "STATISTICS"]

#: where BatchNorm outputs are taken from: the stored statistics (``bn``), or the weights alone (``propagate``)
STATISTICS = ("bn", "propagate")


@dataclass(frozen=True)
class ActRange:
    """Estimated distribution of one Conv2d/Linear input.

    Attributes:
        lo, hi: (C,) float64 per-channel range (C = 1 when the channels were collapsed).
        mean, std: (C,) float64 per-channel moments.
        k: the clipping multiple used for Gaussian-distributed values.
        source: how the range was derived (``"input"``, ``"bn"``, ``"bn+act"``, ``"add"``, ...).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    k: float
    source: str

    @property
    def amax(self) -> float:
        """Per-tensor symmetric bound: ``max_c max(|lo_c|, |hi_c|)`` (> 0)."""
        return max(float(torch.maximum(self.lo.abs(), self.hi.abs()).max()), 1e-8)

    def scale(self, bits: int = 8) -> float:
        """Symmetric per-tensor quantization step, zero-point 0: ``amax / (2^(bits-1) - 1)`` (INT8: amax/127)."""
        return self.amax / (2 ** (bits - 1) - 1)


def gaussian_clip_mse(k: float, bits: int = 8) -> float:
    """Expected squared error of symmetric ``bits``-bit quantization of N(0, 1) clipped at ``+-k`` (see module doc)."""
    levels = 2 ** (bits - 1) - 1
    phi = math.exp(-k * k / 2) / math.sqrt(2 * math.pi)
    q = 0.5 * math.erfc(k / math.sqrt(2))
    return (k / levels) ** 2 / 12 * (1 - 2 * q) + 2 * ((1 + k * k) * q - k * phi)


def gaussian_clip_k(bits: int = 8) -> float:
    """The clipping multiple k minimising :func:`gaussian_clip_mse` (golden-section search on [0.5, 10])."""
    a, b = 0.5, 10.0
    g = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        c, d = b - g * (b - a), a + g * (b - a)
        if gaussian_clip_mse(c, bits) < gaussian_clip_mse(d, bits):
            b = d
        else:
            a = c
    return round((a + b) / 2, 4)


def input_range_from_normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-channel ``(lo, hi)`` of inputs normalised as ``(x - mean) / std`` with pixels x in [0, 1]."""
    lo = [(0.0 - m) / s for m, s in zip(mean, std)]
    hi = [(1.0 - m) / s for m, s in zip(mean, std)]
    return lo, hi


@dataclass
class _R:
    """Per-channel state of one graph value (float64 tensors of equal length C)."""

    lo: torch.Tensor
    hi: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    source: str

    def collapse(self) -> _R:
        """Envelope over channels (used when features no longer map to channels)."""
        return _R(self.lo.min().reshape(1), self.hi.max().reshape(1), self.mean.mean().reshape(1),
                  self.std.max().reshape(1), self.source)


_Q_X = torch.linspace(-8.0, 8.0, 2001, dtype=torch.float64)  # standard-normal quadrature nodes and weights
_Q_W = torch.exp(-_Q_X ** 2 / 2)
_Q_W = _Q_W / _Q_W.sum()


def _act(fn, r: _R, k: float) -> _R:
    """Push a per-channel state through an elementwise function ``fn`` (torch, float64 in, float64 out)."""
    t = torch.linspace(0, 1, 129, dtype=torch.float64)
    grid = r.lo[:, None] + (r.hi - r.lo)[:, None] * t[None, :]
    fg = fn(grid)
    x = r.mean[:, None] + r.std[:, None] * _Q_X[None, :]
    fx_ = fn(x)
    m = (fx_ * _Q_W).sum(1)
    v = ((fx_ - m[:, None]) ** 2 * _Q_W).sum(1).clamp(min=0)
    return _R(fg.min(1).values, fg.max(1).values, m, v.sqrt(), r.source + "+act")


def _linear_moments(weight: torch.Tensor, bias: torch.Tensor | None, r: _R, k: float, groups: int = 1,
                    coherent: bool = False) -> _R:
    """Moments of a conv/linear output with independent input channels; within a kernel window the entries are
    independent too, or with ``coherent`` one value per window (module docstring, models without statistics)."""
    w = weight.detach().double()
    out, cin_g = w.shape[0], w.shape[1]
    w = w.reshape(out, cin_g, -1)
    mean_in, std_in = r.mean, r.std
    cin = cin_g * groups
    if mean_in.numel() != cin:
        mean_in, std_in = mean_in.mean().expand(cin), std_in.max().expand(cin)
    # input channel read by (output o, group entry i): group o // (out / groups), entry i; one gather, no loop
    idx = (torch.arange(out) // (out // groups))[:, None] * cin_g + torch.arange(cin_g)[None, :]
    gain2 = w.sum(2) ** 2 if coherent else (w ** 2).sum(2)
    mean = (w.sum(2) * mean_in[idx]).sum(1)
    var = (gain2 * std_in[idx] ** 2).sum(1)
    if bias is not None:
        mean = mean + bias.detach().double()
    std = var.sqrt()
    return _R(mean - k * std, mean + k * std, mean, std, "moments")


def _bind(fn, node: fx.Node):
    """An elementwise callable for a call_function/call_method activation node (extra args kept, inplace dropped)."""
    extra = [a for a in node.args[1:] if not isinstance(a, fx.Node)]
    kwargs = {kk: v for kk, v in node.kwargs.items() if kk != "inplace" and not isinstance(v, fx.Node)}
    return lambda t: fn(t, *extra, **kwargs)


def _input_state(input_range, c_hint: int | None, k: float) -> _R:
    if input_range is None:
        z = torch.zeros(c_hint or 1, dtype=torch.float64)
        return _R(z - k, z + k, z, z + 1, "input")
    lo, hi = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in input_range)
    lo, hi = torch.broadcast_tensors(lo, hi)
    if (hi < lo).any():
        raise ValueError(f"input_range has lo > hi: {lo.tolist()} vs {hi.tolist()}")
    return _R(lo.clone(), hi.clone(), (lo + hi) / 2, (hi - lo) / math.sqrt(12), "input")


def _getitem(r: _R, idx) -> _R:
    """Channel slicing ``x[:, a:b:s, ...]``; other indices keep the channels."""
    if isinstance(idx, tuple) and len(idx) >= 2 and isinstance(idx[1], slice) and r.lo.numel() > 1:
        s = idx[1]
        return _R(r.lo[s], r.hi[s], r.mean[s], r.std[s], r.source)
    return r


def _pad(r: _R, pad) -> _R:
    """F.pad: a 6-element pad on an NCHW tensor adds constant-zero channels in front and at the back."""
    if len(pad) >= 6 and (pad[4] or pad[5]):
        z0, z1 = torch.zeros(pad[4], dtype=torch.float64), torch.zeros(pad[5], dtype=torch.float64)
        cat = lambda t: torch.cat([z0, t, z1])  # noqa: E731
        return _R(cat(r.lo), cat(r.hi), cat(r.mean), cat(r.std), r.source)
    return _R(torch.minimum(r.lo, torch.zeros(())), torch.maximum(r.hi, torch.zeros(())), r.mean, r.std, r.source)


def _add(a, b, k: float) -> _R:
    if not isinstance(b, _R):
        b, a = a, b
    if not isinstance(b, _R):
        raise TypeError("constant + constant")
    if not isinstance(a, _R):  # a Python scalar
        c = float(a)
        return _R(b.lo + c, b.hi + c, b.mean + c, b.std, b.source)
    if a.lo.numel() != b.lo.numel():
        a, b = a.collapse(), b.collapse()
    mean, std = a.mean + b.mean, torch.sqrt(a.std ** 2 + b.std ** 2)
    up = torch.sqrt((a.hi - a.mean).clamp(min=0) ** 2 + (b.hi - b.mean).clamp(min=0) ** 2)
    down = torch.sqrt((a.mean - a.lo).clamp(min=0) ** 2 + (b.mean - b.lo).clamp(min=0) ** 2)
    return _R(mean - down, mean + up, mean, std, "add")


def _walk(graph: fx.Graph, mods: dict[str, nn.Module], k: float, input_range, statistics: str = "bn",
          coherent: bool = True) -> tuple[dict, dict[str, ActRange]]:
    """Propagate per-channel states through the graph: ``(state per node, {layer fqn: input ActRange})``."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics {statistics!r}: choose one of {', '.join(STATISTICS)}")
    propagate = statistics == "propagate"
    first = next((m for m in mods.values() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    c_in = first.in_channels if isinstance(first, nn.Conv2d) else (first.in_features if first is not None else 1)
    env: dict[fx.Node, object] = {}
    out: dict[str, ActRange] = {}

    def val(a):
        return env.get(a) if isinstance(a, fx.Node) else a

    for node in graph.nodes:
        r = None
        args = [val(a) for a in node.args]
        x = args[0] if args else None
        if node.op == "placeholder":
            r = _input_state(input_range, c_in, k)
        elif node.op == "call_module":
            m = mods[node.target]
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if isinstance(x, _R):
                    out[node.target] = _as_range(x, k)
                    r = _linear_moments(m.weight, m.bias, x, k, getattr(m, "groups", 1),
                                        coherent=propagate and coherent)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                g = m.weight.detach().double() if m.weight is not None else torch.ones(c, dtype=torch.float64)
                b = m.bias.detach().double() if m.bias is not None else torch.zeros(c, dtype=torch.float64)
                if propagate and isinstance(x, _R) and m.running_mean is not None and m.running_var is not None:
                    a = g / torch.sqrt(m.running_var.detach().double() + m.eps)
                    mean, std = a * (x.mean - m.running_mean.detach().double()) + b, a.abs() * x.std
                    r = _R(mean - k * std, mean + k * std, mean, std, "bn-affine")
                else:
                    r = _R(b - k * g.abs(), b + k * g.abs(), b.clone(), g.abs(), "bn")
            elif activation(node, mods) is not None and isinstance(x, _R):
                r = _act(lambda t, m=m: m(t), x, k)
            elif is_passthrough(node, mods) and isinstance(x, _R):
                r = x
        elif node.op == "call_function":
            fn = node.target
            if activation(node, mods) is not None and isinstance(x, _R):
                r = _act(_bind(fn, node), x, k)
            elif is_passthrough(node, mods) and isinstance(x, _R):
                r = x
            elif fn in (operator.add, torch.add, operator.iadd) and any(isinstance(a, _R) for a in args[:2]):
                if all(isinstance(a, (_R, int, float)) for a in args[:2]):
                    r = _add(args[0], args[1], k)
            elif fn is operator.getitem and isinstance(x, _R):
                r = _getitem(x, node.args[1])
            elif fn is F.pad and isinstance(x, _R):
                r = _pad(x, args[1] if len(args) > 1 else node.kwargs["pad"])
            elif fn is torch.cat and isinstance(x, (list, tuple)):
                parts = [val(a) for a in node.args[0]]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if dim == 1 and all(isinstance(p, _R) for p in parts):
                    lo, hi, mean, std = (torch.cat([getattr(p, f) for p in parts]) for f in ("lo", "hi", "mean", "std"))
                    r = _R(lo, hi, mean, std, "cat")
            elif fn in (operator.mul, torch.mul) and isinstance(x, _R) and isinstance(args[1], (int, float)):
                f = float(args[1])
                lo, hi = x.lo * f, x.hi * f
                r = _R(torch.minimum(lo, hi), torch.maximum(lo, hi), x.mean * f, x.std * abs(f), x.source)
        elif node.op == "call_method":
            if activation(node, mods) is not None and isinstance(x, _R):
                r = _act(getattr(torch, str(node.target).rstrip("_")), x, k)
            elif is_passthrough(node, mods) and isinstance(x, _R):
                r = x
        if r is not None:
            env[node] = r
    return env, out


def _as_range(r: _R, k: float) -> ActRange:
    return ActRange(r.lo.clone(), r.hi.clone(), r.mean.clone(), r.std.clone(), k, r.source)


@torch.no_grad()
def estimate_act_ranges(model: nn.Module, k: float | None = None, input_range=None, bits: int = 8,
                        graph: fx.Graph | None = None, statistics: str = "bn",
                        coherent: bool = True) -> dict[str, ActRange]:
    """Estimate the input range of every Conv2d / Linear of ``model`` without data (rules in the module docstring).

    Args:
        model: eval-mode model traceable by torch.fx (BN statistics are read, nothing is run).
        k: clipping multiple of the BN standard deviation; None = :func:`gaussian_clip_k` ``(bits)`` (3.92 for 8 bits).
        input_range: ``(lo, hi)`` scalars or per-channel sequences of the normalised network input, e.g. from
            :func:`input_range_from_normalization`; None = standardised N(0, 1) input.
        bits: activation bit width the default ``k`` is optimised for.
        graph: ``model``'s fx graph when the caller has traced the architecture already (module names are resolved
            in ``model``); None traces it here.
        statistics: ``bn`` (the stored BN statistics) or ``propagate`` (the weights alone, for models whose BN
            layers carry no statistics; module docstring).
        coherent: with ``propagate``, each input channel is locally constant over a kernel window (False:
            independent window entries, as for BN-free convs with statistics).

    Returns:
        ``{fqn: ActRange}`` for each Conv2d/Linear whose input could be followed through the graph (layers behind an
        operation these rules do not cover are left out; the caller keeps those activations in float).

    Raises:
        ValueError: if the model cannot be traced by torch.fx, ``input_range`` is inverted, or ``statistics`` is
            unknown.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
        >>> r = estimate_act_ranges(net, input_range=(0.0, 1.0))
        >>> sorted(r), float(r["3"].lo.min()) >= 0.0
        (['0', '3'], True)
    """
    k = gaussian_clip_k(bits) if k is None else float(k)
    return _walk(graph if graph is not None else trace(model).graph, modules_of(model), k, input_range,
                 statistics, coherent)[1]


@torch.no_grad()
def estimate_output_ranges(model: nn.Module, k: float | None = None, input_range=None, bits: int = 8,
                           graph: fx.Graph | None = None, statistics: str = "bn",
                           coherent: bool = True) -> dict[str, ActRange]:
    """Range of every Conv2d / Linear *output*, taken after the BatchNorm and the elementwise activation that follow
    it when each is the sole user of the previous value (``conv -> [BN] -> [act]``, the tensor an inference engine
    sees after folding BN and fusing the activation: :class:`calib_free.graph.LayerUnit`). ``source`` ends in
    ``+act`` when the activation is included.

    Args and Raises as in :func:`estimate_act_ranges`.

    Returns:
        ``{fqn: ActRange}`` for each layer whose output state is known.
    """
    k = gaussian_clip_k(bits) if k is None else float(k)
    graph = graph if graph is not None else trace(model).graph
    mods = modules_of(model)
    env, _ = _walk(graph, mods, k, input_range, statistics)
    return {name: _as_range(env[u.out], k) for name, u in layer_units(graph, mods).items()
            if isinstance(env.get(u.out), _R)}
