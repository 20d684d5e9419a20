"""Code layouts of the packed file (pure numpy, no torch state): how each layer's integer codes become bytes.

* ``ternary-base3``: 5 ternary codes per byte (``sum (c_i + 1) 3^i``, 1.6 bits/weight), the default.
* ``ternary-2bit``: 4 codes per byte (``c + 1`` in 2 bits), the simpler alternative.
* ``kbit``: k-bit unsigned values (``(q + 2^k - 1) / 2`` for the odd DoReFa codes ``q``), 8 per k bytes, little-endian.
* ``*-deflate``: the base-3 bytes / one byte per k-bit value, Huffman-coded by raw deflate (``--compress``), decoded
  with a bound on the output size.

pack.py (the container) documents the file format; these functions are its only codecs.
"""
from __future__ import annotations

import zlib
from enum import Enum

import numpy as np
import torch

__all__ = ["CodeLayout", "COMPRESSED_LAYOUTS", "pack_ternary_base3", "unpack_ternary_base3", "pack_ternary2",
           "unpack_ternary2", "pack_kbit", "unpack_kbit", "code_nbytes"]

MAX_ELEMENTS = 1 << 31  # per tensor


class CodeLayout(str, Enum):
    """How a layer's integer codes are laid out in its ``codes/<fqn>`` payload (module docstring)."""

    TERNARY_BASE3 = "ternary-base3"
    TERNARY_2BIT = "ternary-2bit"
    KBIT = "kbit"
    TERNARY_DEFLATE = "ternary-base3-deflate"
    KBIT_DEFLATE = "kbit-deflate"


COMPRESSED_LAYOUTS = (CodeLayout.TERNARY_DEFLATE, CodeLayout.KBIT_DEFLATE)
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than this (258-byte matches in ~2 bits); caps what we inflate


# ---------------------------------------------------------------------------------------------- layouts (pure numpy)

_B3_POW = (1, 3, 9, 27, 81)
_B3_LUT = (np.arange(243)[:, None] // np.array(_B3_POW) % 3 - 1).astype(np.int8)  # byte -> 5 codes
_T2_LUT = (((np.arange(256)[:, None] >> np.array([0, 2, 4, 6])) & 3) - 1).astype(np.int8)  # byte -> 4 codes


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


def _payload(data, n: int, nbytes: int, what: str) -> np.ndarray:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_ELEMENTS:
        raise ValueError(f"{what}: element count {n!r} must be an int in [0, {MAX_ELEMENTS}]")
    d = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
    if d.dtype != np.uint8 or d.ndim != 1:
        raise ValueError(f"{what}: payload must be a 1-D uint8 array, got {d.dtype} with shape {d.shape}")
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
    nbytes = (n * k + 7) // 8 if isinstance(n, int) else -1
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


def _deflate(data: bytes) -> bytes:
    """Raw deflate, Huffman only (no string matching): fixed parameters, so the same bytes -> the same output."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return z.compress(data) + z.flush()


def _inflate(data, n: int, what: str) -> np.ndarray:
    """Inverse of :func:`_deflate`, bounded: never produces more than n + 1 bytes whatever the payload says.

    Raises:
        ValueError: not a raw deflate stream, or one that does not decode to exactly n bytes with nothing after it.
    """
    if not _is_int(n) or not 1 <= n <= MAX_ELEMENTS:
        raise ValueError(f"{what}: element count {n!r} must be an int in [1, {MAX_ELEMENTS}]")
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(bytes(data), n + 1)  # max_length >= 1 (0 would mean unlimited)
    except zlib.error as err:
        raise ValueError(f"{what}: the compressed codes are corrupt ({err})") from None
    if len(out) != n or not d.eof or d.unused_data or d.unconsumed_tail:
        raise ValueError(f"{what}: the compressed codes do not decode to exactly {n} bytes "
                         f"({'more' if len(out) > n else 'truncated' if not d.eof else 'trailing data'})")
    return np.frombuffer(out, np.uint8)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _nbytes(layout: str, bits: int, n: int) -> int:
    if layout == CodeLayout.TERNARY_BASE3:
        return -(-n // 5)
    return -(-n // 4) if layout == CodeLayout.TERNARY_2BIT else (n * bits + 7) // 8


def code_nbytes(bits: int, n: int) -> int:
    """Bytes of the dense (uncompressed) code payload of ``n`` weights at ``bits`` (2 = ternary base-3 layout)."""
    return _nbytes(CodeLayout.TERNARY_BASE3 if bits == 2 else CodeLayout.KBIT, bits, n)
