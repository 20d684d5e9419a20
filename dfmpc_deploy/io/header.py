"""The header of a ``.dfmpc`` file, format version 4 (versions 2 and 3 are read too): layout, limits, encoder and
strict decoder (no torch).

``docs/FORMAT.md`` documents every byte; in short (all integers little-endian)::

    preamble  16 B   magic 89 44 46 4D 50 43 0D 0A ("\\x89DFMPC\\r\\n"), u16 version = 4, u16 flags = 0, u32 H
    header     H B   fixed part (128 B): u64 x3 section lengths, 3 x 32-byte SHA-256 of the sections, u32 record
                     count R, u16 arch length A, u16 estimator length E; then arch (A B UTF-8), estimator (E B UTF-8),
                     the input block (version 3 and 4: u8 0 = not recorded, or u8 1 + u16 C, H, W + f64 x 3 mean
                     + f64 x 3 std + u16 resize, 0 = none), then R records, one per entry of the architecture's
                     ``state_dict()``, in its order
    digest    32 B   SHA-256 of preamble + header
    payload          tensors section | scales section | codes section (their lengths are in the header)

A record starts with its state-dict key, front-coded against the previous record's key (u8 bytes shared, u8 suffix
length, suffix bytes; keys are at most 255 bytes of UTF-8), then a u8 tag:

* tag 0, a tensor stored as is: u8 dtype code, u8 ndim (0..8), u32 x ndim dims. Its raw little-endian bytes go to
  the tensors section.
* tag 1 (conv) / 2 (linear), a quantized weight: u8 bits (2..8), u8 layout code, u8 role code, u8 flags (bit 0:
  in_scale present, bit 1: scale stored once, bit 2: in_scale stored once, bit 3 (version 4): k-bit codes on the
  ``int`` grid, else DoReFa), u32 partner record index (0xFFFFFFFF:
  none), u8 ndim (1..8), u32 x ndim dims, and for the deflate layouts a u32 payload length. Its float32 scale (out
  values, or 1 if stored once) then in_scale (in values, or 1) go to the scales section, its codes to the codes section.

Everything is checked before it is used: the header length against :data:`MAX_HEADER_BYTES` and the file size, the
digest, every count against a cap and the bytes left, every record's size, and the sections against the file size.
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import __version__
from ..core.config import InputSpec
from ..errors import BadFileError
from .layouts import COMPRESSED_LAYOUTS, DEFLATE_MAX_RATIO, MAX_ELEMENTS, CodeLayout, layout_nbytes, layouts_for_bits

__all__ = ["MAGIC", "FORMAT_VERSION", "READ_VERSIONS", "PREAMBLE_BYTES", "DIGEST_BYTES", "MAX_HEADER_BYTES",
           "MAX_RECORDS", "MAX_NAME_BYTES", "MAX_ARCH_BYTES", "MAX_ESTIMATOR_BYTES", "MAX_DIMS", "DTYPES",
           "LAYOUT_CODES", "ROLE_CODES", "KINDS", "TensorRecord", "LayerRecord", "Header", "record_nbytes",
           "header_nbytes", "encode_header", "parse_preamble", "parse_header", "layer_shape_ok", "printable",
           "input_nbytes"]

MAGIC = b"\x89DFMPC\r\n"
FORMAT_VERSION = 4
#: versions this reader accepts (2: no input block; 2 and 3: no grid flag, every k-bit layer is DoReFa)
READ_VERSIONS = (2, 3, 4)
PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header length H
PREAMBLE_BYTES = PREAMBLE.size  # 16
DIGEST_BYTES = 32
FIXED = struct.Struct("<QQQ32s32s32sIHH")  # section lengths, section digests, record count, arch/estimator length
INPUT = struct.Struct("<HHH3d3dH")  # version 3 input block after its presence byte: C, H, W, mean, std, resize
MAX_HEADER_BYTES = 4 << 20  # ResNet-50's header is 8 KB
MAX_RECORDS = 1 << 18
MAX_NAME_BYTES = 255
MAX_ARCH_BYTES = 255
MAX_ESTIMATOR_BYTES = 1024
MAX_DIMS = 8
NO_PARTNER = 0xFFFFFFFF
SECTIONS = ("tensors", "scales", "codes")

# dtype code -> (name, bytes per element); names as in safetensors
DTYPES = {1: ("F32", 4), 2: ("F64", 8), 3: ("F16", 2), 4: ("BF16", 2), 5: ("I64", 8), 6: ("I32", 4), 7: ("I16", 2),
          8: ("I8", 1), 9: ("U8", 1), 10: ("BOOL", 1)}
_DTYPE_CODES = {name: code for code, (name, _) in DTYPES.items()}
_ITEMSIZE = dict(DTYPES.values())
LAYOUT_CODES = {0: CodeLayout.TERNARY_BASE3, 1: CodeLayout.TERNARY_2BIT, 2: CodeLayout.KBIT,
                3: CodeLayout.TERNARY_DEFLATE, 4: CodeLayout.KBIT_DEFLATE}
_LAYOUT_IDS = {v: k for k, v in LAYOUT_CODES.items()}
ROLE_CODES = {0: "low", 1: "high-compensating", 2: "high"}
_ROLE_IDS = {v: k for k, v in ROLE_CODES.items()}
KINDS = {1: "conv", 2: "linear"}
_KIND_TAGS = {v: k for k, v in KINDS.items()}
_FLAG_IN_SCALE, _FLAG_SCALE_ONCE, _FLAG_IN_SCALE_ONCE, _FLAG_INT_GRID = 1, 2, 4, 8


@dataclass(frozen=True)
class TensorRecord:
    """A state-dict entry stored as is (biases, BN parameters and statistics, counters)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class LayerRecord:
    """A quantized Conv/Linear weight ``<fqn>.weight``: integer codes, float32 scale, optional in_scale."""

    name: str
    kind: str
    bits: int
    layout: CodeLayout
    role: str
    shape: tuple[int, ...]
    partner: int | None
    in_scale: bool
    scale_once: bool
    in_scale_once: bool
    nbytes: int  # code payload bytes
    grid: str = "dorefa"  # k-bit codes: "int" (flag bit 3, version 4) or "dorefa"; ternary layers: "dorefa"

    @property
    def fqn(self) -> str:
        return self.name[: -len(".weight")]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def scale_count(self) -> int:
        return 1 if self.scale_once else self.shape[0]

    @property
    def in_scale_count(self) -> int:
        return 0 if not self.in_scale else 1 if self.in_scale_once else self.shape[1]


Record = TensorRecord | LayerRecord


@dataclass(frozen=True)
class Header:
    """The decoded header: what the file holds, in the architecture's state-dict order."""

    arch: str
    estimator: str
    records: tuple[Record, ...]
    digests: tuple[bytes, bytes, bytes] = field(default=(bytes(32),) * 3)
    input: InputSpec | None = None  # recorded input shape and normalisation (versions 3 and 4)
    version: int = FORMAT_VERSION

    @property
    def section_nbytes(self) -> tuple[int, int, int]:
        """Bytes of the (tensors, scales, codes) sections."""
        t = sum(r.nbytes for r in self.records if isinstance(r, TensorRecord))
        layers = [r for r in self.records if isinstance(r, LayerRecord)]
        return t, 4 * sum(r.scale_count + r.in_scale_count for r in layers), sum(r.nbytes for r in layers)

    @property
    def layers(self) -> list[LayerRecord]:
        return [r for r in self.records if isinstance(r, LayerRecord)]

    @property
    def tensors(self) -> list[TensorRecord]:
        return [r for r in self.records if isinstance(r, TensorRecord)]


def layer_shape_ok(kind: str, shape: tuple[int, ...]) -> bool:
    """A quantized weight's shape: 2-D for linear, 3- to 5-D for conv, every dimension >= 1."""
    return (len(shape) == 2 if kind == "linear" else 3 <= len(shape) <= 5) and min(shape) >= 1


def printable(text: str, limit: int = 80) -> str:
    """``text`` safe for a terminal: non-printable characters and backslashes escaped, long text shortened."""
    if text.isprintable() and "\\" not in text:
        out = text
    else:
        out = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _shared(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def record_nbytes(record: Record, previous_name: str = "") -> int:
    """Bytes of ``record`` in the header when it follows a record named ``previous_name`` (front coding)."""
    name = record.name.encode("utf-8")
    size = 2 + len(name) - _shared(previous_name.encode("utf-8"), name)
    if isinstance(record, TensorRecord):
        return size + 3 + 4 * len(record.shape)
    return size + 10 + 4 * len(record.shape) + (4 if record.layout in COMPRESSED_LAYOUTS else 0)


def input_nbytes(spec: InputSpec | None, version: int = FORMAT_VERSION) -> int:
    """Bytes of the input block: none in version 2; 1 (not recorded) or 1 + 56 from version 3 on."""
    return 0 if version < 3 else 1 + (INPUT.size if spec is not None else 0)


def header_nbytes(arch: str, estimator: str, records: Sequence[Record], input: InputSpec | None = None,
                  version: int = FORMAT_VERSION) -> int:
    """Bytes before the payload (preamble + header + digest), computed without encoding anything."""
    size = PREAMBLE_BYTES + FIXED.size + len(arch.encode("utf-8")) + len(estimator.encode("utf-8")) + DIGEST_BYTES
    size += input_nbytes(input, version)
    prev = ""
    for r in records:
        size += record_nbytes(r, prev)
        prev = r.name
    return size


class _Out:
    """Append-only byte buffer that can record where each field went (for structured fuzzing)."""

    def __init__(self, spans: list | None):
        self.buf, self.spans = bytearray(), spans

    def put(self, fmt: str, value, what: str) -> None:
        if self.spans is not None:
            self.spans.append((what, len(self.buf), struct.calcsize(fmt)))
        self.buf += struct.pack(fmt, value)

    def raw(self, data: bytes, what: str) -> None:
        if self.spans is not None:
            self.spans.append((what, len(self.buf), len(data)))
        self.buf += data


def encode_header(h: Header, spans: list | None = None) -> bytes:
    """Preamble + header + digest of ``h`` (the bytes before the payload); checks only that each field fits.

    Args:
        h: the header; its ``digests`` must be the SHA-256 of the three payload sections.
        spans: if a list, receives ``(field, offset, size)`` for every field written (used by the fuzzer).

    Raises:
        ValueError: a name, string or count that does not fit its field.
    """
    out = _Out(spans)
    arch, est = h.arch.encode("utf-8"), h.estimator.encode("utf-8")
    if not 1 <= len(arch) <= MAX_ARCH_BYTES or len(est) > MAX_ESTIMATOR_BYTES:
        raise ValueError(f"arch name of {len(arch)} bytes / estimator of {len(est)} bytes: the limits are "
                         f"1..{MAX_ARCH_BYTES} / {MAX_ESTIMATOR_BYTES}")
    sizes = h.section_nbytes
    for i, section in enumerate(SECTIONS):
        out.put("<Q", sizes[i], f"{section}_nbytes")
    for i, section in enumerate(SECTIONS):
        out.raw(h.digests[i], f"{section}_sha256")
    out.put("<I", len(h.records), "record_count")
    out.put("<H", len(arch), "arch_nbytes")
    out.put("<H", len(est), "estimator_nbytes")
    out.raw(arch, "arch")
    out.raw(est, "estimator")
    _encode_input(out, h)
    prev = b""
    for i, r in enumerate(h.records):
        name = r.name.encode("utf-8")
        if not 1 <= len(name) <= MAX_NAME_BYTES:
            raise ValueError(f"state-dict key {printable(r.name)!r} is {len(name)} bytes; the limit is "
                             f"{MAX_NAME_BYTES}")
        p = _shared(prev, name)
        out.put("<B", p, f"r{i}.prefix")
        out.put("<B", len(name) - p, f"r{i}.suffix_nbytes")
        out.raw(name[p:], f"r{i}.suffix")
        prev = name
        if isinstance(r, TensorRecord):
            out.put("<B", 0, f"r{i}.tag")
            out.put("<B", _DTYPE_CODES[r.dtype], f"r{i}.dtype")
        else:
            out.put("<B", _KIND_TAGS[r.kind], f"r{i}.tag")
            out.put("<B", r.bits, f"r{i}.bits")
            out.put("<B", _LAYOUT_IDS[CodeLayout(r.layout)], f"r{i}.layout")
            out.put("<B", _ROLE_IDS[r.role], f"r{i}.role")
            flags = (_FLAG_IN_SCALE * r.in_scale) | (_FLAG_SCALE_ONCE * r.scale_once) \
                | (_FLAG_IN_SCALE_ONCE * r.in_scale_once) | (_FLAG_INT_GRID * (r.grid == "int"))
            out.put("<B", flags, f"r{i}.flags")
            out.put("<I", NO_PARTNER if r.partner is None else r.partner, f"r{i}.partner")
        out.put("<B", len(r.shape), f"r{i}.ndim")
        for j, d in enumerate(r.shape):
            out.put("<I", d, f"r{i}.dim{j}")
        if isinstance(r, LayerRecord) and r.layout in COMPRESSED_LAYOUTS:
            out.put("<I", r.nbytes, f"r{i}.nbytes")
    body = bytes(out.buf)
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError(f"the header needs {len(body)} bytes; the limit is {MAX_HEADER_BYTES}")
    pre = PREAMBLE.pack(MAGIC, h.version, 0, len(body))
    if spans is not None:
        spans[:] = [("magic", 0, 8), ("version", 8, 2), ("flags", 10, 2), ("header_nbytes", 12, 4)] + [
            (w, PREAMBLE_BYTES + off, n) for w, off, n in spans]
        spans.append(("header_sha256", PREAMBLE_BYTES + len(body), DIGEST_BYTES))
    return pre + body + hashlib.sha256(pre + body).digest()


def _encode_input(out: _Out, h: Header) -> None:
    if h.version not in READ_VERSIONS:
        raise ValueError(f"cannot write format version {h.version}; versions {READ_VERSIONS}")
    if h.version < 3:
        if h.input is not None:
            raise ValueError("format version 2 has no input block")
        return
    out.put("<B", 0 if h.input is None else 1, "input_present")
    if h.input is not None:
        i = h.input
        values = (*i.shape, *i.mean, *i.std, i.resize or 0)
        for what, fmt, v in zip(("input_c", "input_h", "input_w", "mean0", "mean1", "mean2", "std0", "std1", "std2",
                                 "resize"), "HHHddddddH", values):
            out.put("<" + fmt, v, what)


def _parse_input(src: _In, fail) -> InputSpec | None:
    src.where = "the input block"
    present = src.u8()
    if present == 0:
        return None
    if present != 1:
        raise fail(f"input block marker {present} is neither 0 (not recorded) nor 1")
    c, h, w, *rest = INPUT.unpack(src.take(INPUT.size))
    try:
        return InputSpec((c, h, w), tuple(rest[0:3]), tuple(rest[3:6]), rest[6] or None)
    except ValueError as err:
        raise fail(f"bad input block: {err}") from None


def parse_preamble(head: bytes, file_size: int, source: str) -> int:
    """Check the first 16 bytes; returns the header length H.

    Raises:
        BadFileError: not a ``.dfmpc`` file, a version-1 or newer file, or a header length beyond the limit or file.
    """
    if len(head) < PREAMBLE_BYTES:
        raise BadFileError(f"{source}: {file_size} bytes is too short for a .dfmpc file (truncated or empty)")
    magic, version, flags, n = PREAMBLE.unpack(head[:PREAMBLE_BYTES])
    if magic != MAGIC:
        if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (16 << 20):
            raise BadFileError(f"{source} is a version-1 .dfmpc file; this dfmpc-deploy ({__version__}) reads "
                               f"format versions {', '.join(map(str, READ_VERSIONS))} only: re-pack the model "
                               f"with it")
        raise BadFileError(f"{source}: not a .dfmpc file (it starts with {head[:8].hex(' ')}, not "
                           f"{MAGIC.hex(' ')})")
    if version not in READ_VERSIONS:
        raise BadFileError(f"{source}: format version {version}; this dfmpc-deploy reads versions "
                           f"{', '.join(map(str, READ_VERSIONS))} "
                           f"({'upgrade dfmpc-deploy' if version > FORMAT_VERSION else 're-pack the model'})")
    if flags:
        raise BadFileError(f"{source}: unknown flags 0x{flags:04x} in the preamble (corrupt, or a newer writer)")
    if not FIXED.size <= n <= MAX_HEADER_BYTES:
        raise BadFileError(f"{source}: header length {n} is outside {FIXED.size}..{MAX_HEADER_BYTES} (corrupt file)")
    if PREAMBLE_BYTES + n + DIGEST_BYTES > file_size:
        raise BadFileError(f"{source}: truncated: the header needs {PREAMBLE_BYTES + n + DIGEST_BYTES} bytes, "
                           f"the file has {file_size}")
    return n


class _In:
    """A cursor over the header bytes; running past the end is a BadFileError naming where."""

    def __init__(self, buf: bytes, source: str):
        self.buf, self.pos, self.source, self.where = buf, 0, source, "the fixed fields"

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise BadFileError(f"{self.source}: the header ends inside {self.where} (corrupt file)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def u8(self) -> int:
        if self.pos >= len(self.buf):
            self.take(1)
        self.pos += 1
        return self.buf[self.pos - 1]

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def text(self, n: int, what: str) -> str:
        self.where = what
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise BadFileError(f"{self.source}: {what} is not UTF-8 text (corrupt file)") from None


def parse_header(blob: bytes, file_size: int, source: str) -> Header:
    """Decode and validate the bytes before the payload (preamble + header + digest) of a ``file_size``-byte file.

    Raises:
        BadFileError: naming the first field that is out of range, inconsistent or does not fit the file.
    """
    n = parse_preamble(blob, file_size, source)
    version = PREAMBLE.unpack(blob[:PREAMBLE_BYTES])[1]
    if len(blob) != PREAMBLE_BYTES + n + DIGEST_BYTES:
        raise BadFileError(f"{source}: truncated: the header needs {PREAMBLE_BYTES + n + DIGEST_BYTES} bytes")
    if hashlib.sha256(blob[:PREAMBLE_BYTES + n]).digest() != blob[PREAMBLE_BYTES + n:]:
        raise BadFileError(f"{source}: header checksum mismatch: the header is corrupt or was edited")
    src = _In(blob[PREAMBLE_BYTES:PREAMBLE_BYTES + n], source)
    *sizes, d0, d1, d2, count, alen, elen = FIXED.unpack(src.take(FIXED.size))

    def fail(msg: str) -> BadFileError:
        return BadFileError(f"{source}: {msg}")

    start = PREAMBLE_BYTES + n + DIGEST_BYTES
    if start + sum(sizes) != file_size:
        raise fail(f"the header declares {start + sum(sizes)} bytes, the file has {file_size} (truncated, extended "
                   f"or corrupt)")
    if not (1 <= alen <= MAX_ARCH_BYTES and elen <= MAX_ESTIMATOR_BYTES):
        raise fail(f"arch/estimator lengths {alen}/{elen} exceed {MAX_ARCH_BYTES}/{MAX_ESTIMATOR_BYTES}")
    arch, estimator = src.text(alen, "the arch name"), src.text(elen, "the estimator")
    spec = _parse_input(src, fail) if version >= 3 else None
    if count > MAX_RECORDS or 5 * count > len(src.buf) - src.pos:
        raise fail(f"record count {count} does not fit the header (limit {MAX_RECORDS}, 5+ bytes each)")
    records: list[Record] = []
    names: set[str] = set()
    prev = b""
    for i in range(count):
        src.where = f"record #{i}"
        p, s = src.u8(), src.u8()
        if p > len(prev) or not 1 <= p + s <= MAX_NAME_BYTES:
            raise fail(f"record #{i}: bad key length {p}+{s}")
        raw = prev[:p] + src.take(s)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(f"record #{i}: the key is not UTF-8 text") from None
        if name in names:
            raise fail(f"record #{i}: duplicate key {printable(name)!r}")
        names.add(name)
        prev = raw
        tag = src.u8()
        if tag == 0:
            code = src.u8()
            if code not in DTYPES:
                raise fail(f"'{printable(name)}': unknown dtype code {code}")
            records.append(TensorRecord(name, DTYPES[code][0], _shape(src, name, 0, fail)))
            continue
        if tag not in KINDS:
            raise fail(f"'{printable(name)}': unknown record tag {tag}")
        bits, lay, role, flags = src.u8(), src.u8(), src.u8(), src.u8()
        partner = src.u32()
        if not 2 <= bits <= 8:
            raise fail(f"layer '{printable(name)}': bits {bits} not in 2..8")
        if lay not in LAYOUT_CODES or LAYOUT_CODES[lay] not in layouts_for_bits(bits):
            raise fail(f"layer '{printable(name)}': layout code {lay} cannot hold {bits}-bit codes")
        if role not in ROLE_CODES:
            raise fail(f"layer '{printable(name)}': unknown role code {role}")
        known = 15 if version >= 4 else 7
        if flags & ~known or (flags & _FLAG_IN_SCALE_ONCE and not flags & _FLAG_IN_SCALE) or (
                flags & _FLAG_INT_GRID and bits == 2):
            raise fail(f"layer '{printable(name)}': bad flags 0x{flags:02x}")
        if not name.endswith(".weight") or len(name) == len(".weight"):
            raise fail(f"layer '{printable(name)}': a quantized layer's key must be '<module>.weight'")
        if partner != NO_PARTNER and (partner >= count or partner == i):
            raise fail(f"layer '{printable(name)}': partner record {partner} does not exist")
        shape = _shape(src, name, 1, fail)
        kind = KINDS[tag]
        if not layer_shape_ok(kind, shape):
            raise fail(f"layer '{printable(name)}': a {kind} weight cannot have shape {list(shape)}")
        if flags & _FLAG_IN_SCALE and len(shape) < 2:
            raise fail(f"layer '{printable(name)}': in_scale on a 1-D weight")
        layout, numel = LAYOUT_CODES[lay], math.prod(shape)
        if layout in COMPRESSED_LAYOUTS:
            nb = src.u32()
            raw_n = -(-numel // 5) if bits == 2 else numel
            dense = layout_nbytes(CodeLayout.TERNARY_BASE3 if bits == 2 else CodeLayout.KBIT, bits, numel)
            if not (1 <= nb < dense and raw_n <= DEFLATE_MAX_RATIO * nb):
                raise fail(f"layer '{printable(name)}': compressed size {nb} must be smaller than the dense {dense} "
                           f"bytes and at least 1/{DEFLATE_MAX_RATIO} of the {raw_n} bytes it inflates to")
        else:
            nb = layout_nbytes(layout, bits, numel)
        records.append(LayerRecord(name, kind, bits, layout, ROLE_CODES[role], shape,
                                   None if partner == NO_PARTNER else partner, bool(flags & _FLAG_IN_SCALE),
                                   bool(flags & _FLAG_SCALE_ONCE), bool(flags & _FLAG_IN_SCALE_ONCE), nb,
                                   "int" if flags & _FLAG_INT_GRID else "dorefa"))
    if src.pos != len(src.buf):
        raise fail(f"{len(src.buf) - src.pos} unexpected bytes at the end of the header")
    for r in records:
        if isinstance(r, LayerRecord) and r.partner is not None and not isinstance(records[r.partner], LayerRecord):
            raise fail(f"layer '{printable(r.name)}': partner record {r.partner} is not a quantized layer")
    h = Header(arch, estimator, tuple(records), (d0, d1, d2), spec, version)
    if h.section_nbytes != tuple(sizes):
        raise fail(f"the records need sections of {list(h.section_nbytes)} bytes, the header declares {sizes}")
    return h


def _shape(src: _In, name: str, lowest: int, fail) -> tuple[int, ...]:
    ndim = src.u8()
    if not lowest <= ndim <= MAX_DIMS:
        raise fail(f"'{printable(name)}': {ndim} dimensions (limit {MAX_DIMS})")
    shape = tuple(src.u32() for _ in range(ndim))
    if any(d < lowest for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise fail(f"'{printable(name)}': shape {list(shape)} has a dimension < {lowest} or more than the "
                   f"{MAX_ELEMENTS} elements allowed")
    return shape
