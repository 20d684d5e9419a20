"""Packed model file (``.dfpk``): bit-packed integer codes, float32 scales and the float tensors, in one file.

File format, ``FORMAT_VERSION = 1``. The container is a plain safetensors file (any safetensors reader can list and
load its tensors); this module writes it and reads it back with its own strict, bounded parser::

    offset  bytes  field
    0       8      N = header length, unsigned 64-bit little-endian, 2 <= N <= MAX_HEADER_BYTES (16 MiB)
    8       N      header: UTF-8 JSON object, padded with spaces so that N is a multiple of 8
    8+N     D      data: the tensors' bytes back to back; D = the largest data_offsets end; nothing follows

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data
section, contiguous from 0, no gaps or overlaps) and ``"__metadata__"`` to a map of strings:

    format          ``"dfpk"``
    format_version  ``"1"``; a reader refuses any other value
    dfpk            JSON text: ``{"arch", "bits": "2/6", "estimator", "config": {QuantConfig fields},
                    "scale_dtype": "float32", "layers": [{"fqn", "kind", "role", "bits", "layout", "shape",
                    "partner", "in_scale": bool}, ...] (module order), "floats": [state-dict keys],
                    "sha256": {tensor name: hex digest of its bytes}}``
    header_sha256   sha256 of the header without this field, serialised canonically (``json.dumps(sort_keys=True,
                    separators=(",", ":"))``); with the per-tensor digests every byte of the file is checked

Tensors::

    codes/<fqn>     U8 [nbytes]  the layer's integer codes in its layout (below)
    scale/<fqn>     F32 [out]    per-output-channel scale, c already folded (into BN gamma/beta or into this scale)
    in_scale/<fqn>  F32 [in]     only where c is folded into the input channels (Eq. 7, D6-ii)
    float/<key>     own dtype    every other state-dict entry (biases, BN gamma/beta/running stats, counters), stored
                                 at the module's own dtype (float32 here), so exactly; nothing is downcast

Data is ordered by element size (8-byte dtypes first, codes last), then module order, so every tensor is aligned to
its element size. Same model -> byte-identical file. Loading rebuilds each weight as ``QuantLayer.weight()`` (codes *
scale [* in_scale] in float32), exactly what the compensated module holds, so outputs match bit for bit.

Code layouts. All are little-endian: element 0 takes the lowest-order bits of byte 0, and a partial last group is
padded with zeros (a reader rejects non-zero padding).

* ``ternary-base3`` (default for ternary, 1.6 bits/weight): code c in {-1, 0, +1} -> trit t = c + 1; five trits per
  byte, ``b = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4`` (0..242; 243..255 are invalid). Codes ``[1, -1, 0, 0, 1, -1, 1]`` ->
  t = [2, 0, 1, 1, 2 | 0, 2] -> ``b0 = 2 + 0 + 9 + 27 + 162 = 200 (0xC8)``, ``b1 = 0 + 3*2 = 6 (0x06)``.
* ``ternary-2bit`` (2 bits/weight): t = c + 1 in bits ``2(i%4) .. 2(i%4)+1`` of byte ``i//4`` (t = 3 is invalid).
  Same codes -> ``b0 = 2 | 0<<2 | 1<<4 | 1<<6 = 0x52``, ``b1 = 2 | 0<<2 | 2<<4 = 0x22``.
* ``kbit`` (DoReFa, 3 <= k <= 8): odd code q in [-(2^k-1), 2^k-1] -> m = (q + 2^k - 1) / 2 in [0, 2^k-1]; m_i fills
  bits ``i*k .. i*k+k-1`` of the little-endian bit stream (stream bit s is bit ``s % 8`` of byte ``s // 8``), least
  significant bit first; 8 values take k bytes, e.g. 6-bit: 4 values -> 3 bytes. ``m = [1, 2, 3, 63]``, k = 6:
  ``b0 = m0 | (m1 & 3) << 6 = 0x81``, ``b1 = m1 >> 2 | (m2 & 15) << 4 = 0x30``, ``b2 = m2 >> 4 | m3 << 2 = 0xFC``.
* ``kbit-deflate`` / ``ternary-base3-deflate`` (opt-in, ``save_packed(..., compress=True)``): the codes as one byte
  per code (kbit: m as above; ternary: the ``ternary-base3`` bytes) compressed as a raw deflate stream (zlib
  wbits -15, level 9, memLevel 9, Huffman only: near the codes' order-0 entropy, ~4.6-4.8 bits for 6-bit codes of
  bell-shaped weights, and fast). The layer records ``"nbytes"`` (the compressed length, which must be smaller than
  the dense layout's, else the layer is written dense). The reader inflates at most n + 1 bytes and requires exactly
  n, the end of the stream, nothing after it and in-range values; it rejects any claim beyond deflate's 1032:1 ratio.

The reader never trusts a size it has not checked: the header length is capped, every tensor's byte span must equal
shape x element size and lie inside the file, element counts are capped at MAX_ELEMENTS, and a layer's code bytes
must equal what its shape and layout need before anything is decoded, so decoding allocates at most ~20x the file's
real size (float32 weights from 1.6-bit codes). Every failure is a BadFileError naming it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.state import MixedPrecisionModel, QuantLayer
from ..errors import BadFileError, DfmpcError
from ..zoo.models import get_spec
from .atomic import atomic_write_with
from .layouts import (
    COMPRESSED_LAYOUTS,
    DEFLATE_MAX_RATIO,
    MAX_ELEMENTS,
    CodeLayout,
    _deflate,
    _inflate,
    _ints,
    _is_int,
    _nbytes,
    code_nbytes,
    pack_kbit,
    pack_ternary2,
    pack_ternary_base3,
    unpack_kbit,
    unpack_ternary2,
    unpack_ternary_base3,
)

__all__ = ["FORMAT_VERSION", "CodeLayout", "pack_ternary2", "unpack_ternary2", "pack_ternary_base3",
           "unpack_ternary_base3", "pack_kbit", "unpack_kbit", "save_packed", "load_packed", "packed_size_report",
           "inspect_packed", "code_nbytes", "packed_nbytes", "fp32_nbytes", "avg_code_bits"]

log = logging.getLogger("dfmpc_deploy")

FORMAT_VERSION = 1
FORMAT_NAME = "dfpk"
MAX_HEADER_BYTES = 16 << 20  # ResNet-50's header is 0.11 MB
MAX_DIMS = 8
ROLES = ("low", "high-compensating", "high")
KINDS = ("conv", "linear")
FP32_RULE = "4 bytes x every floating-point parameter and buffer of the state dict (integer counters excluded)"


def packed_nbytes(mp: MixedPrecisionModel, compress: bool = False) -> int:
    """Size in bytes of the file :func:`save_packed` would write for ``mp`` (nothing is written)."""
    return len(_file_bytes(mp, CodeLayout.TERNARY_BASE3, compress))


def _encode(q: QuantLayer, ternary_layout: CodeLayout, compress: bool = False) -> tuple[CodeLayout, np.ndarray]:
    if q.bits == 2:
        pack = pack_ternary_base3 if ternary_layout == CodeLayout.TERNARY_BASE3 else pack_ternary2
        layout, dense = ternary_layout, pack(q.codes)
        packed = dense if ternary_layout == CodeLayout.TERNARY_BASE3 else pack_ternary_base3(q.codes)
        comp = CodeLayout.TERNARY_DEFLATE
    else:
        c = _ints(q.codes).astype(np.int32)
        top = (1 << q.bits) - 1
        if c.size and (np.abs(c).max() > top or not ((c + top) % 2 == 0).all()):
            raise DfmpcError(f"layer '{q.fqn}': {q.bits}-bit codes must be odd integers in [-{top}, {top}]")
        m = ((c + top) // 2).astype(np.uint8)
        layout, dense, packed, comp = CodeLayout.KBIT, pack_kbit(m, q.bits), m, CodeLayout.KBIT_DEFLATE
    if compress and dense.size:
        z = _deflate(packed.tobytes())
        if len(z) < dense.size:  # otherwise this layer stays dense
            return comp, np.frombuffer(z, np.uint8)
    return layout, dense


def _decode(layout: str, bits: int, data, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    if layout == CodeLayout.TERNARY_BASE3:
        c = unpack_ternary_base3(data, n)
    elif layout == CodeLayout.TERNARY_DEFLATE:
        c = unpack_ternary_base3(_inflate(data, -(-n // 5), layout), n)
    elif layout == CodeLayout.KBIT_DEFLATE:
        m = _inflate(data, n, layout)
        if m.max() >> bits:
            raise ValueError(f"{layout}: value {int(m.max())} does not fit in {bits} bits")
        c = m.astype(np.int16) * 2 - ((1 << bits) - 1)
    elif layout == CodeLayout.TERNARY_2BIT:
        c = unpack_ternary2(data, n)
    else:
        c = unpack_kbit(data, bits, n).astype(np.int16) * 2 - ((1 << bits) - 1)
    return torch.from_numpy(np.ascontiguousarray(c).reshape(shape))


# ------------------------------------------------------------------------------------------------------- container

_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _need(cond, msg: str) -> None:
    if not cond:
        raise BadFileError(msg)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _header_digest(header: dict) -> str:
    """sha256 of the canonical header without its own ``header_sha256`` field."""
    h = dict(header)
    h["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if k != "header_sha256"}
    return hashlib.sha256(_canonical(h).encode("ascii")).hexdigest()


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclass
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class _Packed:
    """A parsed and structurally validated file (payload checksums are checked on demand)."""

    source: str
    size: int
    header_bytes: int
    meta: dict
    entries: dict[str, _Entry]
    data: memoryview

    def raw(self, name: str) -> memoryview:
        e = self.entries[name]
        return self.data[e.begin:e.end]

    def checksum_ok(self, name: str) -> bool:
        return hashlib.sha256(self.raw(name)).hexdigest() == self.meta["sha256"][name]

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=_DTYPES[e.dtype])
        return torch.frombuffer(bytearray(self.raw(name)), dtype=_DTYPES[e.dtype]).reshape(e.shape)


def _file_bytes(mp: MixedPrecisionModel, ternary_layout: CodeLayout, compress: bool = False) -> bytes:
    sd = mp.module.state_dict()
    tensors: list[tuple[str, str, tuple, bytes]] = []  # (name, dtype, shape, bytes), module order
    layers, qkeys = [], set()
    for fqn, q in mp.layers.items():
        key = f"{fqn}.weight"
        if key not in sd or not torch.equal(sd[key].cpu(), q.weight()):
            raise DfmpcError(f"layer '{fqn}': the module's weight is not codes * scale; pack the MixedPrecisionModel "
                             f"returned by compensate() without editing its weights")
        if q.role not in ROLES or q.kind not in KINDS or not 2 <= q.bits <= 8:
            raise DfmpcError(f"layer '{fqn}': role {q.role!r} / kind {q.kind!r} / bits {q.bits!r} cannot be packed")
        if tuple(q.scale.shape) != tuple(q.codes.shape[:1]) or (q.in_scale is not None and (
                q.codes.dim() < 2 or tuple(q.in_scale.shape) != (q.codes.shape[1],))):
            raise DfmpcError(f"layer '{fqn}': scale must be (out,) and in_scale (in,) for weight {list(q.codes.shape)}")
        qkeys.add(key)
        layout, payload = _encode(q, ternary_layout, compress)
        tensors.append((f"codes/{fqn}", "U8", (payload.size,), payload.tobytes()))
        tensors.append((f"scale/{fqn}", "F32", (q.codes.shape[0],), _raw(q.scale.float())))
        if q.in_scale is not None:
            tensors.append((f"in_scale/{fqn}", "F32", tuple(q.in_scale.shape), _raw(q.in_scale.float())))
        layers.append({"fqn": fqn, "kind": q.kind, "role": q.role, "bits": q.bits, "layout": layout.value,
                       "shape": list(q.codes.shape), "partner": q.partner, "in_scale": q.in_scale is not None})
        if layout in COMPRESSED_LAYOUTS:
            layers[-1]["nbytes"] = int(payload.size)
    floats = [k for k in sd if k not in qkeys]
    for k in floats:
        if sd[k].dtype not in _DTYPE_NAMES:
            raise DfmpcError(f"state-dict entry '{k}' has dtype {sd[k].dtype}, which the packed format cannot store")
        tensors.append((f"float/{k}", _DTYPE_NAMES[sd[k].dtype], tuple(sd[k].shape), _raw(sd[k])))
    widths = sorted({q.bits for q in mp.layers.values()})
    meta = {"arch": mp.arch, "bits": f"{widths[0]}/{widths[-1]}" if widths else "", "estimator": mp.estimator,
            "config": {}, "scale_dtype": "float32", "layers": layers,
            "floats": floats, "sha256": {t[0]: hashlib.sha256(t[3]).hexdigest() for t in tensors}}
    order = sorted(range(len(tensors)), key=lambda i: (-_DTYPES[tensors[i][1]].itemsize, i))
    header, pos = {}, 0
    for i in order:
        name, dtype, shape, data = tensors[i]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    header["__metadata__"] = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "dfpk": _canonical(meta)}
    header["__metadata__"]["header_sha256"] = _header_digest(header)
    text = _canonical(header)
    blob = (text + " " * (-len(text) % 8)).encode("ascii")
    return b"".join([len(blob).to_bytes(8, "little"), blob] + [tensors[i][3] for i in order])


def _parse(buf: bytes, source: str) -> _Packed:
    size = len(buf)
    _need(size >= 8, f"{source}: {size} bytes is too short for a packed model (truncated or empty file)")
    n = int.from_bytes(buf[:8], "little")
    _need(n <= MAX_HEADER_BYTES, f"{source}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                                 f"(not a .dfpk file, or a corrupt one)")
    _need(n >= 2, f"{source}: header length {n} is too small (not a .dfpk file)")
    _need(8 + n <= size, f"{source}: truncated: the header needs {n} bytes but only {size - 8} follow")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except UnicodeDecodeError:
        raise BadFileError(f"{source}: the header is not UTF-8 text (corrupt or not a .dfpk file)") from None
    except (ValueError, RecursionError) as err:
        raise BadFileError(f"{source}: the header is not valid JSON ({err})") from None
    _need(isinstance(header, dict), f"{source}: the header is not a JSON object")
    md = header.get("__metadata__")
    _need(isinstance(md, dict) and all(isinstance(v, str) for v in md.values()),
          f"{source}: the header has no __metadata__ map of strings; not a dfmpc-deploy packed model")
    _need(md.get("format") == FORMAT_NAME,
          f"{source}: format is {md.get('format')!r}, not 'dfpk'; not a dfmpc-deploy packed model")
    _need(md.get("format_version") == str(FORMAT_VERSION),
          f"{source}: unsupported format version {md.get('format_version')!r}; this dfmpc-deploy reads version "
          f"{FORMAT_VERSION} (re-pack the model with this version)")
    _need(md.get("header_sha256") == _header_digest(header),
          f"{source}: header checksum mismatch: the header was modified or corrupted")
    entries = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        _need(isinstance(e, dict) and set(e) == {"dtype", "shape", "data_offsets"}, f"{source}: tensor '{name}': "
              f"entry must have exactly dtype, shape and data_offsets")
        shape, offs = e["shape"], e["data_offsets"]
        _need(isinstance(e["dtype"], str) and e["dtype"] in _DTYPES,
              f"{source}: tensor '{name}': unknown dtype {e['dtype']!r}")
        _need(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(s) and s >= 0 for s in shape),
              f"{source}: tensor '{name}': bad shape {shape!r}")
        numel = math.prod(shape)
        _need(numel <= MAX_ELEMENTS, f"{source}: tensor '{name}': {numel} elements exceed the cap {MAX_ELEMENTS}")
        _need(isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs) and 0 <= offs[0] <= offs[1],
              f"{source}: tensor '{name}': bad data_offsets {offs!r}")
        span, need = offs[1] - offs[0], numel * _DTYPES[e["dtype"]].itemsize
        _need(span == need, f"{source}: tensor '{name}': shape {shape} {e['dtype']} needs {need} bytes but its "
                            f"data_offsets span {span}")
        entries[name] = _Entry(e["dtype"], tuple(shape), offs[0], offs[1])
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        _need(e.begin == pos, f"{source}: tensor '{name}' starts at data byte {e.begin}, expected {pos} "
                              f"(overlapping or gapped data_offsets)")
        pos = e.end
    end = 8 + n + pos
    _need(size >= end, f"{source}: truncated: {end} bytes expected, the file has {size}")
    _need(size == end, f"{source}: {size - end} unexpected bytes after the tensor data")
    try:
        meta = json.loads(md["dfpk"])
    except (KeyError, ValueError, RecursionError):
        raise BadFileError(f"{source}: the 'dfpk' metadata is missing or not valid JSON") from None
    _check_meta(meta, entries, source)
    return _Packed(source, size, 8 + n, meta, entries, memoryview(buf)[8 + n:])


def _check_meta(meta, entries: dict[str, _Entry], source: str) -> None:
    """Validate the dfpk metadata and cross-check it against the tensor table (BadFileError naming the problem)."""
    _need(isinstance(meta, dict), f"{source}: the 'dfpk' metadata is not a JSON object")
    for key, typ in (("arch", str), ("bits", str), ("estimator", str), ("config", dict), ("layers", list),
                     ("floats", list), ("sha256", dict)):
        _need(isinstance(meta.get(key), typ), f"{source}: metadata field '{key}' is missing or not a {typ.__name__}")
    _need(meta.get("scale_dtype") == "float32", f"{source}: scale_dtype {meta.get('scale_dtype')!r} is not float32")

    def expect(name: str, dtype: str, shape: tuple, why: str) -> None:
        e = entries.get(name)
        _need(e is not None, f"{source}: tensor '{name}' is missing")
        _need(e.dtype == dtype and e.shape == shape,
              f"{source}: tensor '{name}' is {e.dtype} {list(e.shape)}, expected {dtype} {list(shape)} ({why})")
        names.append(name)

    names: list[str] = []
    fqns: set[str] = set()
    for i, L in enumerate(meta["layers"]):
        _need(isinstance(L, dict), f"{source}: layer #{i} is not a JSON object")
        fqn = L.get("fqn")
        _need(isinstance(fqn, str) and fqn and fqn not in fqns, f"{source}: layer #{i}: bad or duplicate fqn {fqn!r}")
        fqns.add(fqn)
        bits, layout, shape = L.get("bits"), L.get("layout"), L.get("shape")
        _need(L.get("kind") in KINDS and L.get("role") in ROLES and (L.get("partner") is None
              or isinstance(L.get("partner"), str)) and isinstance(L.get("in_scale"), bool),
              f"{source}: layer '{fqn}': bad kind/role/partner/in_scale")
        _need(_is_int(bits) and 2 <= bits <= 8, f"{source}: layer '{fqn}': bits {bits!r} not in 2..8")
        ok = ((CodeLayout.TERNARY_BASE3, CodeLayout.TERNARY_2BIT, CodeLayout.TERNARY_DEFLATE) if bits == 2
              else (CodeLayout.KBIT, CodeLayout.KBIT_DEFLATE))
        _need(layout in [x.value for x in ok],
              f"{source}: layer '{fqn}': layout {layout!r} cannot hold {bits}-bit codes")
        _need(isinstance(shape, list) and 1 <= len(shape) <= MAX_DIMS and all(_is_int(s) and s >= 1 for s in shape),
              f"{source}: layer '{fqn}': bad shape {shape!r}")
        numel = math.prod(shape)
        _need(numel <= MAX_ELEMENTS, f"{source}: layer '{fqn}': {numel} weights exceed the cap {MAX_ELEMENTS}")
        if layout in [x.value for x in COMPRESSED_LAYOUTS]:
            nb, raw = L.get("nbytes"), (-(-numel // 5) if bits == 2 else numel)
            dense = _nbytes(CodeLayout.TERNARY_BASE3 if bits == 2 else CodeLayout.KBIT, bits, numel)
            _need(_is_int(nb) and 1 <= nb < dense and raw <= DEFLATE_MAX_RATIO * nb,
                  f"{source}: layer '{fqn}': compressed size {nb!r} must be an int in [1, {dense}) (smaller than "
                  f"the dense layout) and at least 1/{DEFLATE_MAX_RATIO} of the {raw} bytes it inflates to")
            expect(f"codes/{fqn}", "U8", (nb,), "the layer's nbytes")
        else:
            nb = _nbytes(layout, bits, numel)
            expect(f"codes/{fqn}", "U8", (nb,), f"{numel} {bits}-bit codes in layout {layout} take {nb} bytes")
        expect(f"scale/{fqn}", "F32", (shape[0],), "one float32 scale per output channel")
        if L["in_scale"]:
            _need(len(shape) >= 2, f"{source}: layer '{fqn}': in_scale on a 1-D weight")
            expect(f"in_scale/{fqn}", "F32", (shape[1],), "one float32 scale per input channel")
    qkeys = {f"{f}.weight" for f in fqns}
    for k in meta["floats"]:
        _need(isinstance(k, str) and k not in qkeys, f"{source}: bad float tensor key {k!r}")
        _need(f"float/{k}" in entries, f"{source}: tensor 'float/{k}' is missing")
        names.append(f"float/{k}")
    _need(len(set(names)) == len(names), f"{source}: duplicate tensor names in the metadata")
    extra = sorted(set(entries) - set(names))
    _need(not extra, f"{source}: {len(extra)} tensor(s) not described by the metadata (e.g. '{extra[:1]}')")
    sha = meta["sha256"]
    _need(set(sha) == set(names) and all(isinstance(v, str) for v in sha.values()),
          f"{source}: the sha256 table does not list exactly the file's tensors")


def _read(path: str | os.PathLike) -> _Packed:
    try:
        buf = Path(path).read_bytes()  # bounded by the real file size, not by anything the file claims
    except OSError as err:
        raise BadFileError(f"cannot read packed model '{path}': {err.strerror or err}") from err
    return _parse(buf, str(path))


# ---------------------------------------------------------------------------------------------------- public API

def save_packed(mp: MixedPrecisionModel, path: str | os.PathLike,
                ternary_layout: CodeLayout | str = CodeLayout.TERNARY_BASE3, compress: bool = False) -> dict:
    """Write ``mp`` as one packed ``.dfpk`` file, atomically (temp file + rename) and deterministically.

    Args:
        mp: the compensated model (its module's quantized weights must equal ``codes * scale``).
        path: destination file.
        ternary_layout: ``"ternary-base3"`` (1.6 bits/weight, default) or ``"ternary-2bit"``.
        compress: opt-in entropy coding: each layer whose codes deflate (Huffman only) smaller than its dense layout
            is stored as ``kbit-deflate`` / ``ternary-base3-deflate`` (module docstring); the rest stay dense.
            Smaller files for bell-shaped weights, slower to load; False (default) writes only dense layouts.

    Returns:
        The size accounting of :func:`packed_size_report`.

    Raises:
        DfmpcError: the model cannot be packed, or the file cannot be written (nothing is left behind).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        >>> mp = compensate(net, QuantConfig(recal="none", rounding="nearest"), (3, 16, 16))
        >>> report = save_packed(mp, "net.dfpk")
        >>> x = torch.randn(1, 3, 16, 16)
        >>> torch.equal(load_packed("net.dfpk", model=net).module(x), mp.module(x))
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
    data = _file_bytes(mp, layout, bool(compress))
    atomic_write_with(path, lambda tmp: _write_chunks(tmp, data))
    report = _size_report(_parse(data, str(path)), fp32_nbytes(mp.module))
    log.info("Finished packing in %.3f seconds: %d bytes (%.2f bits/weight, x%.1f smaller than fp32)",
             time.perf_counter() - t0, report["packed"], report["bits_per_weight"], report["compression"])
    return report


def _write_chunks(tmp: Path, data: bytes, chunk: int = 1 << 22) -> None:
    with open(tmp, "wb") as fh:
        for i in range(0, len(data), chunk):
            fh.write(data[i:i + chunk])


def load_packed(path: str | os.PathLike, model: nn.Module | None = None) -> MixedPrecisionModel:
    """Read a ``.dfpk`` file back into a MixedPrecisionModel whose outputs equal the packed model's bit for bit.

    Args:
        path: a file written by :func:`save_packed`.
        model: architecture skeleton to load into (deep-copied, not modified); by default the architecture is
            rebuilt from the recorded name with ``models.get_spec(arch).build(False)``.

    Returns:
        MixedPrecisionModel in eval mode; ``layers[fqn].c`` is None (c is folded and not stored) and ``info`` holds
        ``packed_file``, ``format_version`` and ``load_seconds``.

    Raises:
        BadFileError: unreadable, truncated, corrupt (checksum), wrong-version or malformed file, or one that does
            not fit the architecture.
        DfmpcError: the recorded architecture is not a registered name and no ``model`` was given.
    """
    t0 = time.perf_counter()
    p = _read(path)
    meta = p.meta
    log.info("Loading packed model %s (%s, %d layers)", path, meta["arch"], len(meta["layers"]))
    bad = [name for name in p.entries if not p.checksum_ok(name)]
    _need(not bad, f"{path}: checksum mismatch in {len(bad)} tensor(s) (first: '{bad[0] if bad else ''}'); "
                   f"the file is corrupt")
    module = _skeleton(meta["arch"], model, path)
    layers, state = {}, {}
    for L in meta["layers"]:
        fqn = L["fqn"]
        try:
            codes = _decode(L["layout"], L["bits"], p.raw(f"codes/{fqn}"), tuple(L["shape"]))
        except ValueError as err:
            raise BadFileError(f"{path}: layer '{fqn}': {err}") from None
        q = QuantLayer(fqn, L["kind"], L["role"], L["bits"], codes, p.tensor(f"scale/{fqn}"),
                       in_scale=p.tensor(f"in_scale/{fqn}") if L["in_scale"] else None, partner=L["partner"])
        layers[fqn] = q
        state[f"{fqn}.weight"] = q.weight()
    for k in meta["floats"]:
        state[k] = p.tensor(f"float/{k}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {state[k].dtype} {list(state[k].shape)} vs {own[k].dtype} {list(own[k].shape)}" for k in state
             if k in own and (state[k].shape != own[k].shape or state[k].dtype != own[k].dtype)]
    _need(not (missing or unexpected or wrong), f"{path} does not fit the {type(module).__name__} architecture: "
          f"{len(missing)} missing {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
          f"{len(wrong)} of another shape/dtype {wrong[:1]}")
    try:
        module.load_state_dict(state, strict=True, assign=True)  # assign: no second copy of every weight
    except RuntimeError as err:
        raise BadFileError(f"{path}: cannot load the tensors into {type(module).__name__}: {err}") from None
    seconds = time.perf_counter() - t0
    log.info("Finished loading in %.3f seconds", seconds)
    info = {"packed_file": str(path), "format_version": FORMAT_VERSION, "load_seconds": round(seconds, 4)}
    return MixedPrecisionModel(module.eval(), layers, meta["arch"], None, meta["estimator"], info)


def _skeleton(arch: str, model: nn.Module | None, path) -> nn.Module:
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module skeleton, got {type(model).__name__}")
        return copy.deepcopy(model)
    try:
        spec = get_spec(arch)
    except DfmpcError:
        raise DfmpcError(f"{path} was packed from '{arch}', which is not a registered model name; pass the "
                         f"architecture: load_packed(path, model=<an instance of it>)") from None
    with torch.random.fork_rng(devices=[]):  # random init is overwritten; do not disturb the caller's RNG
        return spec.build(False)


def avg_code_bits(layers: Iterable[QuantLayer]) -> float:
    """Average bits per weight of the dense integer-code payloads of ``layers`` (ternary counts 1.6)."""
    layers = list(layers)
    return 8 * sum(code_nbytes(q.bits, q.numel) for q in layers) / max(1, sum(q.numel for q in layers))


def fp32_nbytes(module: nn.Module) -> int:
    """The FP32 reference size of ``module`` (:data:`FP32_RULE`)."""
    return sum(4 * v.numel() for v in module.state_dict().values() if v.is_floating_point())


def _size_report(p: _Packed, fp32: int | None = None) -> dict:
    cat = dict.fromkeys(("low_bit_codes", "high_bit_codes", "scales", "float_tensors"), 0)
    weights, nominal, ideal = 0, 0.0, 0.0
    span = {name: e.end - e.begin for name, e in p.entries.items()}
    for L in p.meta["layers"]:
        n, b = math.prod(L["shape"]), L["bits"]
        weights += n
        nominal += n * b
        ideal += n * (math.log2(3) if b == 2 else b)
        cat["low_bit_codes" if L["role"] == "low" else "high_bit_codes"] += span[f"codes/{L['fqn']}"]
        cat["scales"] += span[f"scale/{L['fqn']}"] + span.get(f"in_scale/{L['fqn']}", 0)
    cat["float_tensors"] = sum(span[f"float/{k}"] for k in p.meta["floats"])
    if fp32 is None:
        fp32 = 4 * (weights + sum(math.prod(p.entries[f"float/{k}"].shape) for k in p.meta["floats"]
                                  if _DTYPES[p.entries[f"float/{k}"].dtype].is_floating_point))
    rest = cat["scales"] + cat["float_tensors"]
    codes = cat["low_bit_codes"] + cat["high_bit_codes"]
    w = max(weights, 1)
    return {"fp32": fp32, "packed": p.size, **cat, "metadata": p.header_bytes,
            "compression": round(fp32 / p.size, 3), "weights": weights,
            "bits_per_weight": round(8 * codes / w, 4), "bits_per_weight_theoretical": round(nominal / w, 4),
            "bits_per_weight_min": round(ideal / w, 4), "theoretical": math.ceil(nominal / 8) + rest,
            "theoretical_min": math.ceil(ideal / 8) + rest, "fp32_rule": FP32_RULE,
            "theoretical_rule": "codes at their bit widths (ternary 2 bits; *_min: log2(3)) + scales + float tensors"}


def packed_size_report(mp: MixedPrecisionModel | None, path: str | os.PathLike) -> dict:
    """Size accounting of a packed file, for report.json ``size_bytes``.

    Args:
        mp: the model that was packed (for ``fp32``); None derives the same figure from the file.
        path: the packed file.

    Returns:
        dict of ints (bytes) ``fp32`` (rule in ``fp32_rule``), ``packed`` (file size) = ``low_bit_codes`` +
        ``high_bit_codes`` + ``scales`` + ``float_tensors`` + ``metadata`` (length prefix + JSON header);
        ``weights`` (quantized weight count), ``theoretical`` / ``theoretical_min`` (codes at their nominal widths /
        with ternary at log2(3) bits, + scales + float tensors, no header), ``compression`` and the matching
        ``bits_per_weight`` (effective), ``bits_per_weight_theoretical`` and ``bits_per_weight_min`` floats.
    """
    return _size_report(_read(path), fp32_nbytes(mp.module) if mp is not None else None)


def inspect_packed(path: str | os.PathLike) -> str:
    """Human-readable summary of a packed file: metadata, layer table, sizes and per-payload checksum status.

    Structural problems raise; payload checksum failures are reported in the table (``BAD``) instead.

    Raises:
        BadFileError: the file cannot be parsed (see :func:`load_packed`).
    """
    p = _read(path)
    meta, rep = p.meta, _size_report(p)
    status = {name: p.checksum_ok(name) for name in p.entries}
    lines = [f"{path}: dfpk v{FORMAT_VERSION}, arch {meta['arch']}, bits {meta['bits']}, "
             f"estimator: {meta['estimator']}",
             f"{'#':>4}  {'layer':<40} {'role':<17} {'bits':>4} {'layout':<21} {'shape':<16} {'weights':>10} "
             f"{'bytes':>9} {'bits/w':>6}  sha256"]
    for i, L in enumerate(meta["layers"], 1):
        f = L["fqn"]
        names = [f"codes/{f}", f"scale/{f}"] + ([f"in_scale/{f}"] if L["in_scale"] else [])
        n, nb = math.prod(L["shape"]), p.entries[f"codes/{f}"].end - p.entries[f"codes/{f}"].begin
        lines.append(f"{i:>4}  {f:<40} {L['role']:<17} {L['bits']:>4} {L['layout']:<21} "
                     f"{'x'.join(map(str, L['shape'])):<16} {n:>10,} {nb:>9,} {8 * nb / n:>6.2f}  "
                     f"{'ok' if all(status[x] for x in names) else 'BAD'}")
    nbad = sum(not ok for ok in status.values())
    fbad = sum(not status[f"float/{k}"] for k in meta["floats"])
    lines += [f"float tensors: {len(meta['floats'])} ({rep['float_tensors']:,} bytes), checksums "
              f"{'ok' if not fbad else f'{fbad} BAD'}",
              f"size: fp32 {rep['fp32']:,} -> packed {rep['packed']:,} bytes (x{rep['compression']:.2f}): "
              f"low-bit codes {rep['low_bit_codes']:,}, high-bit codes {rep['high_bit_codes']:,}, "
              f"scales {rep['scales']:,}, float tensors {rep['float_tensors']:,}, metadata {rep['metadata']:,}",
              f"bits/weight: {rep['bits_per_weight']:.3f} effective, {rep['bits_per_weight_theoretical']:.3f} nominal, "
              f"{rep['bits_per_weight_min']:.3f} minimum (ternary at log2 3); {rep['weights']:,} weights",
              f"checksums: {'all ' + str(len(status)) + ' payloads ok' if not nbad else f'{nbad} of {len(status)} BAD'}"
              f" (header ok)"]
    return "\n".join(lines)
