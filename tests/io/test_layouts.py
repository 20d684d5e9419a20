"""dfmpc_deploy.io.layouts: exact round trips of every code layout, its documented bytes, and its refusals."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from dfmpc_deploy.io import layouts as L
from dfmpc_deploy.io.layouts import (
    CodeLayout,
    code_nbytes,
    decode_codes,
    deflate_bytes,
    encode_codes,
    inflate_bytes,
    iter_codes,
    layout_nbytes,
    layouts_for_bits,
    pack_kbit,
    pack_ternary2,
    pack_ternary_base3,
    unpack_kbit,
    unpack_ternary2,
    unpack_ternary_base3,
)

LENGTHS = list(range(1, 38)) + [41, 43, 47, 97, 101, 257, 1009]
SHAPES = [(7,), (3, 5), (2, 3, 7), (4, 3, 3, 3), (5, 1, 3, 3), (1, 1, 1, 1), (13, 11)]
TERNARY = {"ternary-base3": (pack_ternary_base3, unpack_ternary_base3, 5),
           "ternary-2bit": (pack_ternary2, unpack_ternary2, 4)}


@pytest.mark.parametrize("layout", list(TERNARY))
@pytest.mark.parametrize("n", LENGTHS)
def test_ternary_round_trip_lengths(layout, n):
    pack, unpack, per = TERNARY[layout]
    codes = np.random.default_rng(n).integers(-1, 2, n).astype(np.int8)
    data = pack(codes)
    assert data.dtype == np.uint8 and data.shape == (math.ceil(n / per),) == (layout_nbytes(layout, 2, n),)
    out = unpack(data, n)
    assert out.dtype == np.int8 and np.array_equal(out, codes)
    assert np.array_equal(unpack(data.tobytes(), n), codes)  # bytes in, same answer


@pytest.mark.parametrize("layout", list(TERNARY))
@pytest.mark.parametrize("shape", SHAPES)
def test_ternary_round_trip_shapes(layout, shape):
    pack, unpack, _ = TERNARY[layout]
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(len(shape))).to(torch.int8)
    out = unpack(pack(codes), codes.numel()).reshape(shape)
    assert torch.equal(torch.from_numpy(out), codes)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_kbit_round_trip_lengths(k, n):
    m = np.random.default_rng(100 * k + n).integers(0, 2 ** k, n)
    data = pack_kbit(m, k)
    assert data.dtype == np.uint8 and data.size == math.ceil(n * k / 8)
    out = unpack_kbit(data, k, n)
    assert out.dtype == np.uint8 and np.array_equal(out, m)


@pytest.mark.parametrize("k", range(3, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_kbit_round_trip_shapes_and_extremes(k, shape):
    n = math.prod(shape)
    for m in (np.zeros(shape, np.int64), np.full(shape, 2 ** k - 1),
              np.random.default_rng(k).integers(0, 2 ** k, shape)):
        assert np.array_equal(unpack_kbit(pack_kbit(torch.from_numpy(m), k), k, n).reshape(shape), m)


@pytest.mark.parametrize("k", range(1, 9))
def test_kbit_is_a_dense_little_endian_bit_stream(k):
    m = np.random.default_rng(k).integers(0, 2 ** k, 29)
    bits = np.array([(v >> b) & 1 for v in m for b in range(k)], np.uint8)  # LSB first, element by element
    assert np.array_equal(pack_kbit(m, k), np.packbits(bits, bitorder="little"))


def test_documented_examples():
    """The worked examples of the module docstring and docs/FORMAT.md."""
    codes = [1, -1, 0, 0, 1, -1, 1]
    assert pack_ternary_base3(codes).tolist() == [0xC8, 0x06]
    assert pack_ternary2(codes).tolist() == [0x52, 0x22]
    assert pack_kbit([1, 2, 3, 63], 6).tolist() == [0x81, 0x30, 0xFC]  # 6-bit: 4 values in 3 bytes
    q = np.array([1, 2, 3, 63]) * 2 - 63  # the odd DoReFa codes behind m = [1, 2, 3, 63]
    layout, data = encode_codes(q, 6)
    assert layout == CodeLayout.KBIT and data.tolist() == [0x81, 0x30, 0xFC]
    assert encode_codes(np.array(codes), 2)[1].tolist() == [0xC8, 0x06]
    q_int = np.array([1, 2, 3, 63]) - 32  # the int codes behind the same m: m = q + 2^(k-1)
    assert q_int.tolist() == [-31, -30, -29, 31]
    assert encode_codes(q_int, 6, grid="int")[1].tolist() == [0x81, 0x30, 0xFC]


@pytest.mark.parametrize("pack,unpack", [(pack_ternary_base3, unpack_ternary_base3), (pack_ternary2, unpack_ternary2),
                                         (lambda c: pack_kbit(c, 6), lambda d, n: unpack_kbit(d, 6, n))])
def test_empty_round_trip(pack, unpack):
    data = pack(np.zeros(0, np.int8))
    assert data.size == 0 and unpack(data, 0).size == 0


def test_pack_rejects_bad_codes():
    for bad in ([2], [-2], np.array([0.5]), ["a"]):
        with pytest.raises(ValueError):
            pack_ternary_base3(bad)
        with pytest.raises(ValueError):
            pack_ternary2(bad)
    with pytest.raises(ValueError, match="6-bit codes"):
        pack_kbit([64], 6)
    with pytest.raises(ValueError, match="6-bit codes"):
        pack_kbit([-1], 6)
    for k in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="bit width"):
            pack_kbit([0], k)
    for bad in ([2], [-65], [65], [-1, 63, 64 - 1, 0]):  # even, out of range, out of range, a zero (even)
        with pytest.raises(ValueError, match="odd integers"):
            encode_codes(np.array(bad, np.int16), 6)
    with pytest.raises(ValueError, match="ternary_layout"):
        encode_codes(np.zeros(3, np.int8), 2, CodeLayout.KBIT)


def test_unpack_rejects_bad_payloads():
    with pytest.raises(ValueError, match="242"):
        unpack_ternary_base3(np.array([243], np.uint8), 5)
    with pytest.raises(ValueError, match="padding"):
        unpack_ternary_base3(np.array([9], np.uint8), 2)  # third trit set, only 2 codes
    with pytest.raises(ValueError, match="holds 3"):
        unpack_ternary2(np.array([0b11], np.uint8), 1)
    with pytest.raises(ValueError, match="padding"):
        unpack_ternary2(np.array([0b0100], np.uint8), 1)
    with pytest.raises(ValueError, match="padding"):
        unpack_kbit(np.array([0x81, 0x40], np.uint8), 6, 2)  # 12 bits used, bit 14 set
    with pytest.raises(ValueError, match="need 3 bytes"):
        unpack_kbit(np.zeros(2, np.uint8), 6, 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_ternary_base3(np.zeros(3, np.uint8), 7)
    with pytest.raises(ValueError, match="uint8"):
        unpack_ternary2(np.zeros(2, np.int16), 4)
    for n in (-1, 2.0, True, 1 << 40):
        with pytest.raises(ValueError, match="element count"):
            unpack_ternary_base3(np.zeros(1, np.uint8), n)


def test_layout_table():
    assert layouts_for_bits(2) == (CodeLayout.TERNARY_BASE3, CodeLayout.TERNARY_2BIT, CodeLayout.TERNARY_DEFLATE)
    assert all(layouts_for_bits(k) == (CodeLayout.KBIT, CodeLayout.KBIT_DEFLATE) for k in range(3, 9))
    assert [code_nbytes(2, n) for n in (1, 5, 6)] == [1, 1, 2] and code_nbytes(6, 5) == 4 and code_nbytes(3, 8) == 3
    with pytest.raises(ValueError, match="depends on the data"):
        layout_nbytes(CodeLayout.KBIT_DEFLATE, 6, 10)


# ---------------------------------------------------------------------------------------- decode in chunks

def _codes(k: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if k == 2:
        return rng.integers(-1, 2, n).astype(np.int8)
    return (2 * rng.integers(0, 1 << k, n) - ((1 << k) - 1)).astype(np.int16)


@pytest.mark.parametrize("layout,k", [("ternary-base3", 2), ("ternary-2bit", 2), ("kbit", 3), ("kbit", 6),
                                      ("kbit", 8)])
@pytest.mark.parametrize("n", [1, 7, 40, 41, 1009])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_iter_codes_any_chunk_size_gives_the_same_codes(layout, k, n, chunk):
    codes = _codes(k, n, n + k)
    data = encode_codes(codes, k, "ternary-2bit" if layout == "ternary-2bit" else "ternary-base3")[1]
    pieces = list(iter_codes(layout, k, data, n, chunk))
    assert all(p.dtype == (np.int8 if k == 2 else np.int16) for p in pieces)
    assert np.array_equal(np.concatenate(pieces), codes) and np.array_equal(decode_codes(layout, k, data, n), codes)
    if chunk == 1 and data.size > 8:  # chunking really happens (8 bytes: one 8-bit group)
        assert len(pieces) > 1


def _bell_codes(k: int, n: int, seed: int = 0) -> np.ndarray:
    """Odd k-bit codes (or ternary for k = 2) with a bell-shaped histogram, like real weights."""
    rng = np.random.default_rng(seed)
    if k == 2:
        return np.clip(np.round(rng.normal(0, 0.6, n)), -1, 1).astype(np.int8)
    top = (1 << k) - 1
    m = np.clip(np.round(rng.normal(top / 2, top / 10, n)), 0, top).astype(np.int16)
    return 2 * m - top


@pytest.mark.parametrize("k", [2, 3, 6, 8])
@pytest.mark.parametrize("n", [1, 7, 41, 1009, 5003, 40_001])
def test_compressed_layouts_round_trip(k, n):
    codes = _bell_codes(k, n)
    for c in (codes, _bell_codes(k, n, seed=1) if k == 2 else _codes(k, n, n)):  # bell, then uniform
        dense_layout, dense = encode_codes(c, k)
        layout, payload = encode_codes(c, k, compress=True)
        if layout in L.COMPRESSED_LAYOUTS:
            assert payload.size < dense.size
        else:  # compression lost: the dense layout, byte for byte
            assert layout == dense_layout and np.array_equal(payload, dense)
        assert np.array_equal(decode_codes(layout, k, payload.tobytes(), n), c)
        if layout in L.COMPRESSED_LAYOUTS:  # small chunks: the same codes
            assert np.array_equal(np.concatenate(list(iter_codes(layout, k, payload, n, chunk=5))), c)
    if n >= 5003 and k in (3, 6, 8):  # a bell-shaped layer of this size must compress
        assert encode_codes(codes, k, compress=True)[0] == "kbit-deflate"


def test_compressed_layout_falls_back_per_layer():
    assert encode_codes(_codes(6, 999), 6, compress=True)[0] == "kbit"  # uniform 6-bit codes: no gain
    assert encode_codes(_bell_codes(6, 999), 6, compress=True)[0] == "kbit-deflate"
    two = encode_codes(_bell_codes(2, 13), 2, CodeLayout.TERNARY_2BIT, compress=True)
    assert two[0] == "ternary-2bit"  # 13 trits: 4 bytes dense, deflate's block header alone is larger


def test_inflate_is_bounded_and_strict():
    m = np.random.default_rng(0).integers(0, 8, 1000).astype(np.uint8)
    z = deflate_bytes(m.tobytes())
    assert np.array_equal(inflate_bytes(z, 1000), m)
    bomb = deflate_bytes(bytes(50_000_000))  # 50 MB of zeros; only n + 1 bytes are ever produced
    for data, n in [(z[:-3], 1000), (z + b"\0", 1000), (z, 999), (z, 1001), (b"\xff" * 40, 1000), (b"", 1000),
                    (bomb, 1000)]:
        with pytest.raises(ValueError):
            inflate_bytes(data, n)
    with pytest.raises(ValueError, match="does not fit"):
        decode_codes("kbit-deflate", 2 + 1, deflate_bytes(bytes([9] * 1000)), 1000)  # 9 in a 3-bit layer
    with pytest.raises(ValueError, match="242"):
        decode_codes("ternary-base3-deflate", 2, deflate_bytes(b"\xf3" * 200), 1000)  # byte 243 is not 5 trits
    with pytest.raises(ValueError, match="cannot hold"):
        decode_codes("kbit-deflate", 2, z, 1000)


def test_bomb_is_refused_in_bounded_memory():
    """A stream that inflates to 50 MB, declared as 1,000 codes: refused after at most n + 1 output bytes."""
    bomb = deflate_bytes(bytes(50_000_000))
    pieces = []
    with pytest.raises(ValueError, match="more than 1000"):
        for p in L._inflate_chunks(bomb, 1000, "t", chunk=1 << 20):
            pieces.append(p)
    assert sum(p.size for p in pieces) <= 1000


def test_unpack_resnet50_sized_codes_is_fast():
    """ResNet-50 at 2/6: 11.3 M ternary + 14.2 M 6-bit weights must decode in well under 0.5 s."""
    rng = np.random.default_rng(0)
    tern = pack_ternary_base3(rng.integers(-1, 2, 11_317_248).astype(np.int8))
    six = pack_kbit(rng.integers(0, 64, 14_185_664).astype(np.uint8), 6)
    best = math.inf
    for _ in range(2):
        t = time.perf_counter()
        decode_codes("ternary-base3", 2, tern, 11_317_248)
        decode_codes("kbit", 6, six, 14_185_664)
        best = min(best, time.perf_counter() - t)
    assert best < 0.5, f"decoding ResNet-50-sized codes took {best:.3f} s"


# ------------------------------------------------------------------------------------------------ the int grid


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 257, 1009])
@pytest.mark.parametrize("compress", [False, True])
def test_int_grid_codes_round_trip_exactly(bits, n, compress):
    half = 1 << (bits - 1)
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(-half, half, n).astype(np.int16)
    codes[0] = -half  # the two's complement minimum, e.g. -128 at 8 bits
    if n > 1:
        codes[1] = half - 1
    if compress:  # bell-shaped codes, so deflate wins where the payload is long enough
        codes[2:] = np.clip(np.round(rng.normal(0, half / 6, n - 2)), -half, half - 1) if n > 2 else codes[2:]
    layout, data = encode_codes(codes, bits, compress=compress, grid="int")
    assert layout in layouts_for_bits(bits)
    if layout == CodeLayout.KBIT:
        assert data.size == layout_nbytes(CodeLayout.KBIT, bits, n) == code_nbytes(bits, n)
        assert np.array_equal(unpack_kbit(data, bits, n), (codes + half).astype(np.uint8)), "m = q + 2^(k-1)"
    back = decode_codes(layout, bits, data, n, "int")
    assert back.dtype == np.int16 and np.array_equal(back, codes)
    assert np.array_equal(np.concatenate(list(iter_codes(layout, bits, data, n, chunk=3, grid="int"))), codes)


@pytest.mark.parametrize("bits", [3, 6, 8])
def test_int_grid_refuses_codes_out_of_range(bits):
    half = 1 << (bits - 1)
    for bad in ([half], [-half - 1]):
        with pytest.raises(ValueError, match=f"{bits}-bit int codes must lie in \\[-{half}, {half - 1}\\]"):
            encode_codes(np.array(bad, np.int16), bits, grid="int")
    with pytest.raises(ValueError, match="grid 'uniform'"):
        encode_codes(np.zeros(3, np.int16), bits, grid="uniform")


def test_the_same_payload_reads_as_either_grid():
    """The grid only maps m to codes: a DoReFa payload read as int is a different (shifted) set of codes."""
    q = np.array([-63, -1, 1, 63], np.int16)
    layout, data = encode_codes(q, 6)
    assert decode_codes(layout, 6, data, 4, "dorefa").tolist() == q.tolist()
    assert decode_codes(layout, 6, data, 4, "int").tolist() == [-32, -1, 0, 31]
