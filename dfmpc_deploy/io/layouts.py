"""Code layouts of the ``.dfmpc`` file (pure numpy): how one layer's integer codes become bytes and back.

Every layout is little-endian: element 0 takes the lowest-order bits of byte 0, and a partial last group is padded
with zeros (a reader rejects non-zero padding). Codes are flattened in C order.

* ``ternary-base3`` (default for ternary, 1.6 bits/weight): code c in {-1, 0, +1} -> trit t = c + 1; five trits per
  byte, ``b = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4`` (0..242; 243..255 are invalid). Codes ``[1, -1, 0, 0, 1, -1, 1]``
  -> t = [2, 0, 1, 1, 2 | 0, 2] -> ``b0 = 2 + 0 + 9 + 27 + 162 = 200 (0xC8)``, ``b1 = 0 + 3*2 = 6 (0x06)``.
* ``ternary-2bit`` (2 bits/weight): t = c + 1 in bits ``2(i%4) .. 2(i%4)+1`` of byte ``i//4`` (t = 3 is invalid).
  Same codes -> ``b0 = 2 | 0<<2 | 1<<4 | 1<<6 = 0x52``, ``b1 = 2 | 0<<2 | 2<<4 = 0x22``.
* ``kbit`` (3 <= k <= 8): each code q becomes an unsigned k-bit value m in [0, 2^k-1], by the layer's grid:
  ``dorefa``: odd q in [-(2^k-1), 2^k-1] -> m = (q + 2^k - 1) / 2; ``int`` (format 4, the record's grid flag):
  q in [-2^(k-1), 2^(k-1)-1] -> m = q + 2^(k-1) (offset binary: two's complement with the top bit flipped). m_i fills
  bits ``i*k .. i*k+k-1`` of the bit stream (stream bit s is bit ``s % 8`` of byte ``s // 8``), least significant bit
  first; 8 values take k bytes, e.g. 6-bit: 4 values -> 3 bytes. ``m = [1, 2, 3, 63]``, k = 6:
  ``b0 = m0 | (m1 & 3) << 6 = 0x81``, ``b1 = m1 >> 2 | (m2 & 15) << 4 = 0x30``, ``b2 = m2 >> 4 | m3 << 2 = 0xFC``
  (DoReFa codes ``[-61, -59, -57, 63]``; int codes ``[-31, -30, -29, 31]``).
* ``ternary-base3-deflate`` / ``kbit-deflate`` (opt-in ``compress=True``): the ``ternary-base3`` bytes / one byte
  per k-bit value m, as one raw deflate stream (zlib wbits -15, level 9, memLevel 9, Huffman only: near the codes'
  order-0 entropy, and fast). Used only where it is smaller than the dense layout. A reader inflates in bounded
  chunks, never past the expected length + 1, and requires exactly that length, the end of the stream and nothing
  after it; no stream may claim more than :data:`DEFLATE_MAX_RATIO` output bytes per input byte.

``docs/FORMAT.md`` has the whole file format; the container (``container.py``) calls only the public functions here.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from enum import Enum

import numpy as np
import torch

__all__ = ["CodeLayout", "COMPRESSED_LAYOUTS", "CODE_GRIDS", "kbit_offset", "codes_to_unsigned", "unsigned_to_codes",
           "DEFLATE_MAX_RATIO", "MAX_ELEMENTS", "layouts_for_bits",
           "layout_nbytes", "code_nbytes", "pack_ternary_base3", "unpack_ternary_base3", "pack_ternary2",
           "unpack_ternary2", "pack_kbit", "unpack_kbit", "deflate_bytes", "inflate_bytes", "encode_codes",
           "iter_codes", "decode_codes"]

MAX_ELEMENTS = 1 << 31  # per tensor
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than this (258-byte matches in ~2 bits); caps what we inflate
CHUNK_BYTES = 1 << 20  # decoding works on at most this many payload bytes at a time


class CodeLayout(str, Enum):
    """How a layer's integer codes are laid out in its code payload (module docstring)."""

    TERNARY_BASE3 = "ternary-base3"
    TERNARY_2BIT = "ternary-2bit"
    KBIT = "kbit"
    TERNARY_DEFLATE = "ternary-base3-deflate"
    KBIT_DEFLATE = "kbit-deflate"


COMPRESSED_LAYOUTS = (CodeLayout.TERNARY_DEFLATE, CodeLayout.KBIT_DEFLATE)
#: how k-bit codes map to the unsigned values of the kbit layouts (core.quantizers.GRIDS)
CODE_GRIDS = ("dorefa", "int")


def _check_grid(grid: str) -> str:
    if grid not in CODE_GRIDS:
        raise ValueError(f"grid {grid!r}: choose one of {', '.join(CODE_GRIDS)}")
    return grid


def kbit_offset(bits: int, grid: str) -> tuple[int, int, int]:
    """``(lo, hi, offset)``: the code range of a ``bits``-bit grid and the offset of its unsigned value ``m``."""
    if _check_grid(grid) == "int":
        half = 1 << (bits - 1)
        return -half, half - 1, half
    top = (1 << bits) - 1
    return -top, top, top


def codes_to_unsigned(codes, bits: int, grid: str) -> np.ndarray:
    """k-bit codes -> unsigned values m in [0, 2^k-1] (uint8, flattened): ``(q + 2^k-1) / 2`` for ``dorefa`` (odd
    codes), ``q + 2^(k-1)`` for ``int``.

    Raises:
        ValueError: a code outside the grid's range, or an even DoReFa code.
    """
    c = _ints(codes)
    lo, hi, off = kbit_offset(bits, grid)
    if grid == "int":
        _in_range(c, lo, hi, f"{bits}-bit int codes")
        return (c.astype(np.int16) + off).astype(np.uint8)
    if c.size and (c.min() < lo or c.max() > hi or not (c & 1).all()):  # & 1: odd, also when negative
        raise ValueError(f"{bits}-bit DoReFa codes must be odd integers in [{lo}, {hi}]")
    return ((c.astype(np.int16) + off) >> 1).astype(np.uint8)


def unsigned_to_codes(m: np.ndarray, bits: int, grid: str) -> np.ndarray:
    """Inverse of :func:`codes_to_unsigned` (int16); ``m`` must already lie in [0, 2^k-1]."""
    _, _, off = kbit_offset(bits, grid)
    return m.astype(np.int16) - off if grid == "int" else m.astype(np.int16) * 2 - off


def layouts_for_bits(bits: int) -> tuple[CodeLayout, ...]:
    """The layouts that can hold ``bits``-bit codes (2 = ternary)."""
    if bits == 2:
        return CodeLayout.TERNARY_BASE3, CodeLayout.TERNARY_2BIT, CodeLayout.TERNARY_DEFLATE
    return CodeLayout.KBIT, CodeLayout.KBIT_DEFLATE


def layout_nbytes(layout: CodeLayout | str, bits: int, n: int) -> int:
    """Bytes of ``n`` codes in a dense layout: ``ceil(n/5)`` base-3, ``ceil(n/4)`` 2-bit, ``ceil(n*bits/8)`` kbit.

    Raises:
        ValueError: a compressed layout (its size depends on the data).
    """
    layout = CodeLayout(layout)
    if layout == CodeLayout.TERNARY_BASE3:
        return -(-n // 5)
    if layout == CodeLayout.TERNARY_2BIT:
        return -(-n // 4)
    if layout == CodeLayout.KBIT:
        return (n * bits + 7) // 8
    raise ValueError(f"{layout.value}: the size of a compressed layout depends on the data")


def code_nbytes(bits: int, n: int) -> int:
    """Bytes of the dense code payload of ``n`` weights at ``bits`` (2 = ternary, base-3 layout)."""
    return layout_nbytes(CodeLayout.TERNARY_BASE3 if bits == 2 else CodeLayout.KBIT, bits, n)


# ---------------------------------------------------------------------------------------------- dense layouts

_B3_POW = (1, 3, 9, 27, 81)
_B3_LUT = (np.arange(243)[:, None] // np.array(_B3_POW) % 3 - 1).astype(np.int8)  # byte -> 5 codes
_T2_LUT = (((np.arange(256)[:, None] >> np.array([0, 2, 4, 6])) & 3) - 1).astype(np.int8)  # byte -> 4 codes


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(codes) -> np.ndarray:
    a = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if a.dtype.kind not in "iu":
        raise ValueError(f"codes must be an integer array, got dtype {a.dtype}")
    return a.reshape(-1)


def _in_range(a: np.ndarray, lo: int, hi: int, what: str) -> None:
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}]; found values in [{a.min()}, {a.max()}]")


def _groups(t: np.ndarray, per: int, dtype=np.uint8) -> np.ndarray:
    """``t`` zero-padded to whole groups, shape (ceil(n/per), per)."""
    out = np.zeros(-(-t.size // per) * per, dtype)
    out[: t.size] = t
    return out.reshape(-1, per)


def _bytes(data, what: str) -> np.ndarray:
    d = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
    if d.dtype != np.uint8 or d.ndim != 1:
        raise ValueError(f"{what}: payload must be a 1-D uint8 array, got {d.dtype} with shape {d.shape}")
    return d


def _payload(data, n: int, nbytes: int, what: str) -> np.ndarray:
    if not _is_int(n) or not 0 <= n <= MAX_ELEMENTS:
        raise ValueError(f"{what}: element count {n!r} must be an int in [0, {MAX_ELEMENTS}]")
    d = _bytes(data, what)
    if d.size != nbytes:
        raise ValueError(f"{what}: {n} values need {nbytes} bytes, the payload has {d.size}")
    return d


def pack_ternary_base3(codes) -> np.ndarray:
    """Pack ternary codes five per byte (``b = sum t_i 3^i``, t = code + 1), 1.6 bits/weight.

    Args:
        codes: integer array or tensor, any shape, values in {-1, 0, 1}; flattened in C order.

    Returns:
        uint8 array of ``ceil(n / 5)`` bytes.

    Raises:
        ValueError: a value outside {-1, 0, 1} or a non-integer dtype.
    """
    c = _ints(codes)
    _in_range(c, -1, 1, "ternary codes")
    g = _groups((c + 1).astype(np.uint8), 5)
    out = g[:, 0].copy()
    for i in range(1, 5):  # max 2 * 121 = 242: no uint8 overflow
        out += g[:, i] * np.uint8(_B3_POW[i])
    return out


def unpack_ternary_base3(data, n: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary_base3`: ``ceil(n/5)`` bytes -> (n,) int8 codes in {-1, 0, 1}.

    Raises:
        ValueError: wrong payload length, a byte > 242, or non-zero padding trits.
    """
    d = _payload(data, n, -(-n // 5), "ternary-base3")
    if d.size and d.max() > 242:
        raise ValueError(f"ternary-base3: byte value {int(d.max())} > 242 is not 5 trits")
    if n % 5 and d[-1] >= 3 ** (n % 5):
        raise ValueError("ternary-base3: non-zero padding trits in the last byte")
    return _B3_LUT[d].reshape(-1)[:n]


def pack_ternary2(codes) -> np.ndarray:
    """Pack ternary codes four per byte, t = code + 1 in bits ``2(i%4) .. 2(i%4)+1`` of byte ``i//4``.

    Args:
        codes: integer array or tensor, values in {-1, 0, 1}; flattened in C order.

    Returns:
        uint8 array of ``ceil(n / 4)`` bytes.
    """
    c = _ints(codes)
    _in_range(c, -1, 1, "ternary codes")
    g = _groups((c + 1).astype(np.uint8), 4)
    return g[:, 0] | g[:, 1] << 2 | g[:, 2] << 4 | g[:, 3] << 6


def unpack_ternary2(data, n: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary2`: ``ceil(n/4)`` bytes -> (n,) int8 codes.

    Raises:
        ValueError: wrong payload length, a 2-bit field holding 3, or non-zero padding.
    """
    d = _payload(data, n, -(-n // 4), "ternary-2bit")
    if (d & (d >> 1) & 0x55).any():
        raise ValueError("ternary-2bit: a 2-bit field holds 3, which is not a trit")
    if n % 4 and d[-1] >> (2 * (n % 4)):
        raise ValueError("ternary-2bit: non-zero padding bits in the last byte")
    return _T2_LUT[d].reshape(-1)[:n]


def _check_k(k) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= 8:
        raise ValueError(f"bit width k={k!r} must be an int in 1..8")
    return int(k)


def pack_kbit(codes_unsigned, k: int) -> np.ndarray:
    """Pack unsigned k-bit values densely into a little-endian bit stream (8 values -> k bytes).

    Args:
        codes_unsigned: integer array or tensor with values in [0, 2^k - 1]; flattened in C order.
        k: bits per value, 1..8.

    Returns:
        uint8 array of ``ceil(n * k / 8)`` bytes.
    """
    k = _check_k(k)
    m = _ints(codes_unsigned)
    _in_range(m, 0, (1 << k) - 1, f"{k}-bit codes")
    if k == 8:
        return m.astype(np.uint8)
    g = _groups(m, 8, np.uint64)
    w = g[:, 0].copy()
    for j in range(1, 8):
        w |= g[:, j] << np.uint64(j * k)
    return w.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :k].reshape(-1)[: (m.size * k + 7) // 8].copy()


def unpack_kbit(data, k: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_kbit`: ``ceil(n*k/8)`` bytes -> (n,) uint8 values.

    Raises:
        ValueError: wrong payload length or non-zero padding bits.
    """
    k = _check_k(k)
    nbytes = (n * k + 7) // 8 if _is_int(n) else -1
    d = _payload(data, n, nbytes, f"{k}-bit")
    if (n * k) % 8 and d[-1] >> ((n * k) % 8):
        raise ValueError(f"{k}-bit: non-zero padding bits in the last byte")
    if k == 8:
        return d.copy()
    groups = -(-n // 8)
    buf = np.zeros((groups, 8), np.uint8)
    buf[:, :k] = _groups(d, k)  # ceil(ceil(n*k/8) / k) == groups rows
    w = buf.view("<u8").reshape(-1)
    out = np.empty((groups, 8), np.uint8)
    mask = np.uint64((1 << k) - 1)
    for j in range(8):
        out[:, j] = (w >> np.uint64(j * k)) & mask
    return out.reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------- deflate

def deflate_bytes(data: bytes) -> bytes:
    """Raw deflate, Huffman only (no string matching): fixed parameters, so the same bytes -> the same output."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return z.compress(data) + z.flush()


def _inflate_chunks(data, n: int, what: str, chunk: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Inflate a raw deflate stream that must hold exactly ``n`` bytes, ``chunk`` bytes of output at a time.

    Never holds more than one chunk of output, whatever the stream claims.
    """
    if not _is_int(n) or not 1 <= n <= MAX_ELEMENTS:
        raise ValueError(f"{what}: element count {n!r} must be an int in [1, {MAX_ELEMENTS}]")
    z = zlib.decompressobj(-15)
    pending, total = bytes(_bytes(data, what)), 0
    while True:
        try:
            out = z.decompress(pending, min(chunk, n + 1 - total))  # max_length >= 1 (0 would mean unlimited)
        except zlib.error as err:
            raise ValueError(f"{what}: the compressed codes are corrupt ({err})") from None
        pending, total = z.unconsumed_tail, total + len(out)
        if total > n:
            raise ValueError(f"{what}: the compressed codes decode to more than {n} bytes")
        if out:
            yield np.frombuffer(out, np.uint8)
        if z.eof or not (out or pending):
            break
    if total != n or not z.eof or z.unused_data:
        raise ValueError(f"{what}: the compressed codes do not decode to exactly {n} bytes "
                         f"({'truncated' if not z.eof or total < n else 'trailing data'})")


def inflate_bytes(data, n: int, what: str = "deflate") -> np.ndarray:
    """Inverse of :func:`deflate_bytes`, bounded: never produces more than n + 1 bytes whatever the payload says.

    Raises:
        ValueError: not a raw deflate stream, or one that does not decode to exactly n bytes with nothing after it.
    """
    out = np.empty(n if _is_int(n) and 0 <= n <= MAX_ELEMENTS else 0, np.uint8)
    pos = 0
    for c in _inflate_chunks(data, n, what):
        out[pos:pos + c.size] = c
        pos += c.size
    return out


# ---------------------------------------------------------------------------------------------- codes <-> bytes

def encode_codes(codes, bits: int, ternary_layout: CodeLayout | str = CodeLayout.TERNARY_BASE3,
                 compress: bool = False, grid: str = "dorefa") -> tuple[CodeLayout, np.ndarray]:
    """Lay out one layer's integer codes.

    Args:
        codes: integer array/tensor, any shape: ternary codes in {-1, 0, 1} (``bits == 2``), odd DoReFa codes in
            ``[-(2^bits-1), 2^bits-1]`` or int codes in ``[-2^(bits-1), 2^(bits-1)-1]``.
        bits: 2 (ternary) .. 8.
        ternary_layout: ``ternary-base3`` or ``ternary-2bit``, for ternary codes.
        compress: try the deflate layout, and keep it only where it is smaller than the dense one.
        grid: ``dorefa`` or ``int``, for k-bit codes (ignored for ternary).

    Returns:
        (layout, uint8 payload).

    Raises:
        ValueError: codes outside their range, or a bad layout/bit width.
    """
    ternary_layout = CodeLayout(ternary_layout)
    layout: CodeLayout
    if not _is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"bits {bits!r} must be an int in 2..8")
    if bits == 2:
        if ternary_layout not in (CodeLayout.TERNARY_BASE3, CodeLayout.TERNARY_2BIT):
            raise ValueError(f"ternary_layout {ternary_layout.value!r}: choose 'ternary-base3' or 'ternary-2bit'")
        base3 = pack_ternary_base3(codes)
        layout, dense, raw = ternary_layout, base3, base3
        if ternary_layout == CodeLayout.TERNARY_2BIT:
            dense = pack_ternary2(codes)
        comp = CodeLayout.TERNARY_DEFLATE
    else:
        raw = codes_to_unsigned(codes, bits, grid)
        layout, dense, comp = CodeLayout.KBIT, pack_kbit(raw, bits), CodeLayout.KBIT_DEFLATE
    if compress and dense.size:
        z = deflate_bytes(raw.tobytes())
        if len(z) < dense.size:  # otherwise this layer stays dense
            return comp, np.frombuffer(z, np.uint8)
    return layout, dense


def _check_layout(layout, bits: int, n: int) -> CodeLayout:
    layout = CodeLayout(layout)
    if layout not in layouts_for_bits(bits):
        raise ValueError(f"layout {layout.value} cannot hold {bits}-bit codes")
    if not _is_int(n) or not 0 <= n <= MAX_ELEMENTS:
        raise ValueError(f"{layout.value}: element count {n!r} must be an int in [0, {MAX_ELEMENTS}]")
    return layout


def iter_codes(layout: CodeLayout | str, bits: int, data, n: int,
               chunk: int = CHUNK_BYTES, grid: str = "dorefa") -> Iterator[np.ndarray]:
    """Decode and validate a layer's payload piece by piece: yields consecutive runs of its ``n`` codes.

    Ternary codes come as int8 in {-1, 0, 1}, k-bit codes as int16 on ``grid`` (:func:`unsigned_to_codes`: odd in
    ``[-(2^k-1), 2^k-1]`` for ``dorefa``, ``[-2^(k-1), 2^(k-1)-1]`` for ``int``). At most ``chunk``
    payload bytes (or inflated bytes) are worked on at a time, so memory stays bounded whatever the payload claims.

    Raises:
        ValueError: wrong length, invalid values (a base-3 byte > 242, a 2-bit field of 3, an out-of-range k-bit
            value), non-zero padding, or a corrupt/oversized/truncated deflate stream.
    """
    layout = _check_layout(layout, bits, n)
    _check_grid(grid)
    top = (1 << bits) - 1
    if layout in COMPRESSED_LAYOUTS:
        if n == 0:
            raise ValueError(f"{layout.value}: an empty layer cannot be compressed")
        raw = -(-n // 5) if bits == 2 else n
        left = n
        for piece in _inflate_chunks(data, raw, layout.value, chunk):
            if bits == 2:
                k = min(left, 5 * piece.size)
                yield unpack_ternary_base3(piece, k)
            else:
                if piece.max() > top:
                    raise ValueError(f"{layout.value}: value {int(piece.max())} does not fit in {bits} bits")
                k = piece.size
                yield unsigned_to_codes(piece, bits, grid)
            left -= k
        return
    d = _payload(data, n, layout_nbytes(layout, bits, n), layout.value)
    group, per = {CodeLayout.TERNARY_BASE3: (1, 5), CodeLayout.TERNARY_2BIT: (1, 4)}.get(layout, (bits, 8))
    step = max(group, chunk // group * group)
    left = n
    for start in range(0, d.size, step):
        piece = d[start:start + step]
        k = min(left, piece.size // group * per) if start + step < d.size else left
        if layout == CodeLayout.TERNARY_BASE3:
            yield unpack_ternary_base3(piece, k)
        elif layout == CodeLayout.TERNARY_2BIT:
            yield unpack_ternary2(piece, k)
        else:
            yield unsigned_to_codes(unpack_kbit(piece, bits, k), bits, grid)
        left -= k


def decode_codes(layout: CodeLayout | str, bits: int, data, n: int, grid: str = "dorefa") -> np.ndarray:
    """All ``n`` codes of a payload (:func:`iter_codes`): int8 for ternary, int16 for k-bit (on ``grid``), shape (n,).

    Raises:
        ValueError: as :func:`iter_codes`.
    """
    _check_layout(layout, bits, n)
    out = np.empty(n, np.int8 if bits == 2 else np.int16)
    pos = 0
    for c in iter_codes(layout, bits, data, n, grid=grid):
        out[pos:pos + c.size] = c
        pos += c.size
    if pos != n:  # cannot happen for a well-formed payload; guards the chunk arithmetic
        raise ValueError(f"{CodeLayout(layout).value}: decoded {pos} codes, expected {n}")
    return out
