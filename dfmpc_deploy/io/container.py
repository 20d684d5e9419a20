"""The packed model file (``.dfmpc``, format version 4; 2 and 3 are read too): write, read back bit-exactly, inspect.

A ``.dfmpc`` file holds a model's integer codes bit-packed (``layouts.py``), its float32 scales and every other
state-dict tensor unchanged, behind a compact binary header (``header.py``) with a SHA-256 per section; the bounded
reader is ``reader.py``::

    preamble (16 B: magic "\\x89DFMPC\\r\\n", version 4, flags, header length) | header | SHA-256 of both (32 B)
    | tensors section | scales section | codes section

``docs/FORMAT.md`` documents every byte, the limits, the memory bound and the versioning. Same model -> same bytes.
Loading rebuilds each weight as ``QuantLayer.weight()`` (codes * scale [* in_scale] in float32), exactly what the
packed model computes with, so outputs match bit for bit.

Reading trusts nothing it has not checked: only regular files are opened; the magic, version and header length are
checked from the first 16 bytes before anything else is read; the header's digest, every field, count and size is
checked against its limit and against the real file size, and every record against the architecture skeleton (built
on the ``meta`` device, so a file naming a big architecture costs no memory) before any payload byte is read or any
tensor is allocated. Then the section digests are verified and every payload is decoded and checked (codes in range,
zero padding, scales and float tensors finite, BatchNorm variances not negative). Each failure is one
:class:`~dfmpc_deploy.errors.BadFileError` line naming it.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.state import MixedPrecisionModel, QuantLayer
from ..errors import BadFileError, DfmpcError
from .atomic import atomic_write_with
from .header import FORMAT_VERSION, MAGIC, SECTIONS, Header, LayerRecord, TensorRecord, encode_header, printable
from .layouts import CodeLayout, decode_codes, iter_codes
from .plan import plan_file, torch_dtype
from .reader import (
    REPACK,
    PackedFile,
    bad_sections,
    check_layer,
    check_tensor,
    layer_scales,
    tensor_from_bytes,
    walk,
)
from .sizes import FP32_RULE, avg_code_bits, code_nbytes, fp32_nbytes, packed_nbytes, size_report

__all__ = ["FORMAT_VERSION", "MAGIC", "FP32_RULE", "CodeLayout", "InspectResult", "save_packed", "load_packed",
           "inspect_packed", "packed_size_report", "packed_nbytes", "code_nbytes", "fp32_nbytes", "avg_code_bits"]

log = logging.getLogger("dfmpc_deploy")

# ---------------------------------------------------------------------------------------------------- writing

def save_packed(mp: MixedPrecisionModel, path: str | os.PathLike,
                ternary_layout: CodeLayout | str = CodeLayout.TERNARY_BASE3, compress: bool = False) -> dict:
    """Write ``mp`` as one ``.dfmpc`` file, atomically (temp file + rename) and deterministically.

    Args:
        mp: the compensated model (its module's quantized weights must equal ``codes * scale``); ``mp.input`` (input
            shape and normalisation), when set, is recorded in the header so that ``export`` and ``eval`` need
            nothing but the file.
        path: destination file.
        ternary_layout: ``"ternary-base3"`` (1.6 bits/weight, default) or ``"ternary-2bit"``.
        compress: opt-in entropy coding: each layer whose codes deflate (Huffman only) smaller than its dense layout
            is stored as ``kbit-deflate`` / ``ternary-base3-deflate``; the rest stay dense. Smaller files for
            bell-shaped weights, slower to load; False (default) writes only dense layouts.

    Returns:
        The size accounting of :func:`packed_size_report`.

    Raises:
        ValueError: an unknown ``ternary_layout``.
        DfmpcError: the model cannot be packed (a weight that is not codes * scale, a non-finite scale or float
            tensor, a negative BatchNorm variance, a layer with all-zero scales but non-zero codes, a key or shape
            beyond the format's limits), or the file cannot be written; nothing is left behind.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        >>> mp = compensate(net, (3, 16, 16), recal="none", rounding="nearest")
        >>> report = save_packed(mp, "net.dfmpc")
        >>> x = torch.randn(1, 3, 16, 16)
        >>> torch.equal(load_packed("net.dfmpc", model=net).module(x), mp.module(x))
        True
    """
    try:
        layout = CodeLayout(ternary_layout)
    except ValueError:
        layout = None
    if layout not in (CodeLayout.TERNARY_BASE3, CodeLayout.TERNARY_2BIT):
        raise ValueError(f"ternary_layout {ternary_layout!r}: choose 'ternary-base3' or 'ternary-2bit'")
    t0 = time.perf_counter()
    log.info("Packing %s (%d layers) -> %s", mp.arch, len(mp.layers), path)
    plan = plan_file(mp, layout, bool(compress))
    head = encode_header(plan.header)
    pieces = [head, *plan.tensors, *plan.scales, *plan.codes]
    atomic_write_with(path, lambda tmp: _write_pieces(tmp, pieces))
    report = size_report(plan.header, fp32_nbytes(mp.module))
    log.info("Finished packing in %.3f seconds: %d bytes (%.2f bits/weight, x%.1f smaller than fp32)",
             time.perf_counter() - t0, report["packed"], report["bits_per_weight"], report["compression"])
    return report


def _write_pieces(tmp: Path, pieces: list[bytes]) -> None:
    with open(tmp, "wb") as fh:
        for piece in pieces:
            fh.write(piece)


# ---------------------------------------------------------------------------------------------------- loading

def _copy_with(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding the tensors of ``state`` (by state-dict key) instead of its own; nothing else of
    ``model``'s parameters or persistent buffers is copied."""
    keys = set(model.state_dict(keep_vars=True))
    memo: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        memo[id(p)] = nn.Parameter(state[name], requires_grad=p.requires_grad)
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in keys:
            memo[id(b)] = state[name]
    return copy.deepcopy(model, memo)


def _zoo_skeleton(arch: str, source: str) -> Callable[[str], nn.Module]:
    from ..zoo.models import get_spec  # lazily: the container does not depend on the model zoo
    try:
        spec = get_spec(arch)
    except DfmpcError:
        raise DfmpcError(f"{source} was packed from '{printable(arch)}', which is not a registered model name; pass "
                         f"the architecture: load_packed(path, model=<an instance>) or skeleton=<name -> module>") \
            from None
    return lambda _: spec.build(False)


def _skeleton(h: Header, model: nn.Module | None, build: Callable[[str], nn.Module] | None) -> nn.Module:
    """The architecture to check the file against: ``model`` itself (only read), or ``build(arch)`` on meta."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module skeleton, got {type(model).__name__}")
        return model
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory, and the caller's RNG is untouched
        m = build(h.arch)  # type: ignore[misc]
    if not isinstance(m, nn.Module):
        raise TypeError(f"skeleton({h.arch!r}) must return an nn.Module, got {type(m).__name__}")
    return m


def _check_fits(h: Header, module: nn.Module, source: str) -> None:
    """Every record must be the architecture's state-dict entry at that place, with its dtype and shape."""
    sd = module.state_dict()
    keys, what = list(sd), f"{source} does not fit the {printable(type(module).__name__)} architecture"
    for i, (r, k) in enumerate(itertools.zip_longest(h.records, keys)):
        if r is None or k is None or r.name != k:
            got = f"'{printable(r.name)}'" if r is not None else "nothing"
            raise BadFileError(f"{what}: entry #{i} is {got} in the file but "
                               f"{repr(printable(k)) if k is not None else 'nothing'} in the architecture "
                               f"({len(h.records)} vs {len(keys)} entries); pass the architecture it was packed from")
        t = sd[k]
        dtype = torch.float32 if isinstance(r, LayerRecord) else torch_dtype(r.dtype)
        if t.dtype != dtype or tuple(t.shape) != r.shape:
            raise BadFileError(f"{what}: '{printable(k)}' is {dtype} {list(r.shape)} in the file but {t.dtype} "
                               f"{list(t.shape)} in the architecture")
    mods = dict(module.named_modules())
    for r in h.layers:
        kind = {"conv": nn.modules.conv._ConvNd, "linear": nn.Linear}[r.kind]
        if not isinstance(mods.get(r.fqn), kind):
            raise BadFileError(f"{what}: '{printable(r.fqn)}' is a {r.kind} layer in the file but a "
                               f"{type(mods.get(r.fqn)).__name__} in the architecture")


def load_packed(path: str | os.PathLike, model: nn.Module | None = None, *,
                skeleton: Callable[[str], nn.Module] | None = None) -> MixedPrecisionModel:
    """Read a ``.dfmpc`` file back into a MixedPrecisionModel whose outputs equal the packed model's bit for bit.

    Peak memory: the file's payload once, plus the model (its float32 weights and integer codes), plus one layer's
    decoding buffers (docs/FORMAT.md, "Memory bound"); nothing is allocated from a size the file declares before
    that size has been checked against the file and the architecture.

    Args:
        path: a file written by :func:`save_packed`.
        model: architecture to load into (not modified; its tensors are not copied, the decoded ones replace them
            in a copy).
        skeleton: ``name -> nn.Module`` building the architecture from the recorded name (called under
            ``torch.device("meta")``); default: the model zoo's ``get_spec(name).build(False)``.

    Returns:
        MixedPrecisionModel in eval mode, ``config=None``; ``layers[fqn].c`` is None (c is folded and not stored);
        ``info`` holds ``packed_file``, ``format_version`` (of the file: 2 or 3) and ``load_seconds``; ``input`` is
        the recorded input shape and normalisation (None for a version-2 file or one packed without it).

    Raises:
        BadFileError: not a regular file, unreadable, truncated, corrupt (checksum, invalid codes, non-finite or
            out-of-range values), another format version, or a file that does not fit the architecture.
        DfmpcError: the recorded architecture is not a registered name and neither ``model`` nor ``skeleton`` was
            given, or there is not enough memory for the model.
    """
    t0 = time.perf_counter()
    with PackedFile(path) as f:
        h, source = f.header, f.source
        log.info("Loading packed model %s (%s, %d layers)", source, printable(h.arch), len(h.layers))
        build = skeleton if skeleton is not None or model is not None else _zoo_skeleton(h.arch, source)
        module = _skeleton(h, model, build)
        _check_fits(h, module, source)
        payload = f.read_payload()
    bad = bad_sections(h, payload)
    if bad:
        raise BadFileError(f"{source}: checksum mismatch in the {' and '.join(bad)} section(s){REPACK}")
    try:
        module, layers = _build(h, payload, module, model, build, source)
    except (MemoryError, RuntimeError) as err:  # torch reports a failed CPU allocation as a RuntimeError
        if isinstance(err, RuntimeError) and "allocate" not in str(err):
            raise
        need = 2 * f.size + 2 * sum(4 * r.numel for r in h.layers) + sum(r.nbytes for r in h.tensors)
        raise DfmpcError(f"{source}: not enough memory to load it (about {need / 2**20:.0f} MiB needed); free "
                           f"memory or raise the limit") from None
    seconds = time.perf_counter() - t0
    log.info("Finished loading in %.3f seconds", seconds)
    info = {"packed_file": str(path), "format_version": h.version, "load_seconds": round(seconds, 4)}
    return MixedPrecisionModel(module.eval(), layers, h.arch, None, h.estimator, info, input=h.input)


def _all_zero(codes: torch.Tensor) -> Callable[[], bool]:
    return lambda: not bool(codes.any())


def _build(h: Header, payload: memoryview, module: nn.Module, model: nn.Module | None,
           build: Callable[[str], nn.Module] | None, source: str) -> tuple[nn.Module, dict[str, QuantLayer]]:
    """Decode and check every payload, then give ``module`` (on the meta device) the decoded tensors."""
    layers, state = {}, {}
    for r, data, sc, ins in walk(h, payload):
        if isinstance(r, TensorRecord):
            state[r.name] = tensor_from_bytes(r.dtype, r.shape, data)
            check_tensor(r, state[r.name], f"{source}: ")
            continue
        try:
            codes = torch.from_numpy(decode_codes(r.layout, r.bits, data, r.numel, r.grid).reshape(r.shape))
        except ValueError as err:
            raise BadFileError(f"{source}: layer '{printable(r.fqn)}': {err}{REPACK}") from None
        check_layer(r, *layer_scales(r, sc, ins, expand=False), _all_zero(codes), f"{source}: ")  # as stored
        scale, in_scale = layer_scales(r, sc, ins)
        partner = None if r.partner is None else h.records[r.partner].name[: -len(".weight")]
        q = QuantLayer(r.fqn, r.kind, r.role, r.bits, codes, scale, in_scale=in_scale, partner=partner, grid=r.grid)
        layers[r.fqn] = q
        state[r.name] = q.weight()
    if model is not None:  # the caller's model stays as it is
        return _copy_with(model, state), layers
    module.load_state_dict(state, strict=True, assign=True)  # assign: the decoded tensors become the model's
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        # non-persistent buffers are not in the file: build the architecture for real, now that all checks passed
        with torch.random.fork_rng(devices=[]):
            module = build(h.arch)  # type: ignore[misc]
        module.load_state_dict(state, strict=True, assign=True)
    return module, layers


# ---------------------------------------------------------------------------------------------------- reports

def packed_size_report(mp: MixedPrecisionModel | None, path: str | os.PathLike) -> dict:
    """Size accounting of a packed file (for report.json ``size_bytes``), from its header alone.

    Args:
        mp: the model that was packed (for ``fp32``); None derives the same figure from the file.
        path: the packed file.

    Returns:
        :func:`~dfmpc_deploy.io.sizes.size_report`: ``fp32``, ``packed`` = ``low_bit_codes`` + ``high_bit_codes``
        + ``scales`` + ``float_tensors`` + ``metadata``, ``weights``, ``theoretical``, ``theoretical_min``,
        ``compression`` and ``bits_per_weight*``.
    """
    with PackedFile(path) as f:
        return size_report(f.header, fp32_nbytes(mp.module) if mp is not None else None)


@dataclass(frozen=True)
class InspectResult:
    """What :func:`inspect_packed` found: the printable summary and whether every check passed.

    Attributes:
        text: the summary (every name from the file escaped; safe to print to a terminal).
        ok: True only if every checksum, code payload, scale and tensor is valid (what :func:`load_packed` needs).
        problems: one line per problem found (empty when ``ok``).
        report: the size accounting (:func:`packed_size_report`).
    """

    text: str
    ok: bool
    problems: tuple[str, ...] = ()
    report: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


def _layer_status(r: LayerRecord, data: memoryview, sc: memoryview, ins: memoryview | None) -> str | None:
    """None if the layer is valid, else why not; decodes its codes in bounded chunks."""
    try:
        nonzero = False
        for c in iter_codes(r.layout, r.bits, data, r.numel, grid=r.grid):
            nonzero = nonzero or bool(c.any())
        scale, in_scale = layer_scales(r, sc, ins, expand=False)  # no architecture here to bound the channel count
        check_layer(r, scale, in_scale, lambda: not nonzero, "")
    except (ValueError, BadFileError) as err:
        return str(err)
    return None


def _input_text(h: Header) -> str:
    i = h.input
    if i is None:
        return "not recorded" + (" (format version 2)" if h.version < 3 else "")
    return (f"{'x'.join(map(str, i.shape))}, mean {', '.join(f'{v:g}' for v in i.mean)}, std "
            f"{', '.join(f'{v:g}' for v in i.std)}, resize {i.resize or 'none'}")


def inspect_packed(path: str | os.PathLike) -> InspectResult:
    """Check every byte of a packed file and summarise it: header, layer table, sizes, checksums, problems.

    Structural problems (anything in the header, or sizes that do not fit the file) raise; content problems (a
    section checksum, invalid codes, a corrupt deflate stream, non-zero padding, non-finite scales or tensors,
    negative BatchNorm variances) are listed in the result, whose ``ok`` is then False. Memory is bounded by about twice
    the file size: the codes are decoded in chunks and not kept.

    Raises:
        BadFileError: the file cannot be parsed (see :func:`load_packed`).
    """
    with PackedFile(path) as f:
        h, source = f.header, f.source
        payload = f.read_payload()
    rep = size_report(h)
    bad = bad_sections(h, payload)
    problems = [f"{name} section: checksum mismatch{REPACK}" for name in bad]
    lines = [f"{source}: .dfmpc v{h.version}, arch {printable(h.arch)}, estimator: {printable(h.estimator)}",
             f"input: {_input_text(h)}",
             f"{'#':>4}  {'layer':<40} {'role':<17} {'bits':>4} {'grid':<6} {'layout':<21} {'shape':<16} "
             f"{'weights':>10} "
             f"{'bytes':>9} {'bits/w':>6}  status"]
    tensor_bad, row = 0, 0
    for r, data, sc, ins in walk(h, payload):
        if isinstance(r, TensorRecord):
            try:
                check_tensor(r, tensor_from_bytes(r.dtype, r.shape, data), "")
            except BadFileError as err:
                problems.append(str(err))
                tensor_bad += 1
            continue
        why = _layer_status(r, data, sc, ins)
        if why is not None:
            problems.append(why)
        row += 1
        grid = "-" if r.bits == 2 else r.grid
        lines.append(f"{row:>4}  {printable(r.fqn, 40):<40} {r.role:<17} {r.bits:>4} {grid:<6} {r.layout.value:<21} "
                     f"{'x'.join(map(str, r.shape)):<16} {r.numel:>10,} {r.nbytes:>9,} "
                     f"{8 * r.nbytes / r.numel:>6.2f}  {'ok' if why is None else 'BAD'}")
    lines += [f"tensors: {len(h.tensors)} ({rep['float_tensors']:,} bytes), "
              f"{'values ok' if not tensor_bad else f'{tensor_bad} BAD'}",
              f"size: fp32 {rep['fp32']:,} -> packed {rep['packed']:,} bytes (x{rep['compression']:.2f}): "
              f"low-bit codes {rep['low_bit_codes']:,}, high-bit codes {rep['high_bit_codes']:,}, "
              f"scales {rep['scales']:,}, float tensors {rep['float_tensors']:,}, metadata {rep['metadata']:,}",
              f"bits/weight: {rep['bits_per_weight']:.3f} effective, {rep['bits_per_weight_theoretical']:.3f} nominal, "
              f"{rep['bits_per_weight_min']:.3f} minimum (ternary at log2 3); {rep['weights']:,} weights",
              "checksums: header ok, " + (f"all {len(SECTIONS)} payloads ok" if not bad else
                                          f"payload(s) BAD: {', '.join(bad)}")]
    lines.append("verdict: ok" if not problems else f"verdict: BAD, {len(problems)} problem(s):")
    lines += [f"  - {p}" for p in problems]
    return InspectResult("\n".join(lines), not problems, tuple(problems), rep)
