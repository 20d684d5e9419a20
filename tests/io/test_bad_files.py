"""Bad .dfmpc files and unpackable models: every case is one BadFileError/DfmpcError line naming it.

Header problems make both ``load_packed`` and ``inspect_packed`` raise; content problems (codes, scales, tensors)
make ``load_packed`` raise and ``inspect_packed`` report ``ok=False`` naming the same problem, and the CLI exit 1.
"""
from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np
import pytest
import torch

from dfmpc_deploy.cli import main
from dfmpc_deploy.errors import BadFileError, DfmpcError
from dfmpc_deploy.io.container import inspect_packed, load_packed, save_packed
from dfmpc_deploy.io.header import MAGIC, LayerRecord, TensorRecord
from dfmpc_deploy.io.layouts import COMPRESSED_LAYOUTS, deflate_bytes, layout_nbytes
from dfmpc_deploy.passes.recipes import compensate
from tests.io.helpers import (
    bell_net,
    edit_payload,
    field_spans,
    forward,
    join,
    layer_offsets,
    poke,
    quick_config,
    resign,
    split,
    tensor_offsets,
    variant_inputs,
    variant_net,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid file of the relu6 tiny net (ternary-base3 + kbit layers, in_scale) and its skeleton."""
    mp = compensate(variant_net("relu6"), (3, 16, 16), **quick_config(), arch="tiny")
    path = tmp_path_factory.mktemp("base") / "m.dfmpc"
    save_packed(mp, path)
    return path.read_bytes()


def _field(data: bytes, name: str) -> tuple[int, int]:
    return next((off, size) for what, off, size in field_spans(data) if what == name)


def _set_field(data: bytes, name: str, value: int, sign: bool = True, ref: bytes | None = None) -> bytes:
    """``data`` with one header field set; the field's place is looked up in ``ref`` (a valid file), else ``data``."""
    off, size = _field(data if ref is None else ref, name)
    out = poke(data, off, size, value)
    return resign(out) if sign else out


def _record(data: bytes, index: int, keep_sizes: bool = False, **changes) -> bytes:
    """The file with record ``index`` changed, re-signed; the declared section sizes follow the records (or, with
    ``keep_sizes``, stay those of ``data``)."""
    h, payload = split(data)
    recs = list(h.records)
    r = dataclasses.replace(recs[index], **changes)
    if isinstance(r, LayerRecord) and "shape" in changes and r.layout not in COMPRESSED_LAYOUTS:
        r = dataclasses.replace(r, nbytes=layout_nbytes(r.layout, r.bits, r.numel))
    recs[index] = r
    out = join(dataclasses.replace(h, records=tuple(recs)), payload)
    if keep_sizes:
        for name in ("tensors_nbytes", "scales_nbytes", "codes_nbytes"):
            out = _set_field(out, name, _get(data, name), sign=False, ref=data)
        out = resign(out)
    return out


def _swap_records(data: bytes) -> bytes:
    h, payload = split(data)
    recs = list(h.records)
    recs[1], recs[2] = recs[2], recs[1]
    return join(dataclasses.replace(h, records=tuple(recs)), payload)


HEADER_CASES = {
    "empty": (lambda d: b"", "too short"),
    "fifteen bytes": (lambda d: d[:15], "too short"),
    "other magic": (lambda d: b"GGUF\x03\x00\x00\x00" + d[8:], "not a .dfmpc file"),
    "newer version": (lambda d: d[:8] + struct.pack("<H", 5) + d[10:], "format version 5.*upgrade dfmpc-deploy"),
    "older version": (lambda d: d[:8] + struct.pack("<H", 1) + d[10:], "format version 1.*re-pack"),
    "flags": (lambda d: d[:10] + b"\x01\x00" + d[12:], "unknown flags"),
    "huge header length": (lambda d: d[:12] + b"\xff\xff\xff\xff" + d[16:], "outside"),
    "tiny header length": (lambda d: d[:12] + b"\x08\x00\x00\x00" + d[16:], "outside"),
    "header length past end": (lambda d: d[:12] + struct.pack("<I", len(d)) + d[16:], "truncated"),
    "header edited, not re-signed": (lambda d: _set_field(d, "arch", ord("X"), sign=False), "header checksum"),
    "truncated payload": (lambda d: d[:-1], "declares .* the file has"),
    "trailing bytes": (lambda d: d + b"\0", "declares .* the file has"),
    "section length": (lambda d: _set_field(d, "codes_nbytes", 10 ** 9), "declares .* the file has"),
    "sections moved": (lambda d: _set_field(_set_field(d, "codes_nbytes", 1 + _get(d, "codes_nbytes")),
                                            "scales_nbytes", _get(d, "scales_nbytes") - 1, ref=d),
                       "records need sections"),
    "record count": (lambda d: _set_field(d, "record_count", 2 ** 31), "record count"),
    "fewer records": (lambda d: _set_field(d, "record_count", _get(d, "record_count") - 1), "unexpected bytes"),
    "arch length": (lambda d: _set_field(d, "arch_nbytes", 0), "arch/estimator lengths"),
    "arch not utf-8": (lambda d: _set_field(d, "arch", 0xFF), "not UTF-8"),
    "key prefix": (lambda d: _set_field(d, "r1.prefix", 200), "bad key length"),
    "key not utf-8": (lambda d: _set_field(d, "r0.suffix", 0xC3), "not UTF-8"),
    "duplicate key": (lambda d: _record(d, 1, name="0.weight"), "duplicate key"),
    "unknown dtype": (lambda d: _set_field(d, "r1.dtype", 77), "unknown dtype code 77"),
    "unknown tag": (lambda d: _set_field(d, "r0.tag", 9), "unknown record tag 9"),
    "bits": (lambda d: _set_field(d, "r0.bits", 9), "bits 9 not in 2..8"),
    "layout for bits": (lambda d: _set_field(d, "r0.layout", 2), "cannot hold 2-bit codes"),
    "role": (lambda d: _set_field(d, "r0.role", 5), "unknown role code 5"),
    "flags of a layer": (lambda d: _set_field(d, "r0.flags", 0x10), "bad flags"),
    "partner out of range": (lambda d: _set_field(d, "r0.partner", 10 ** 6), "partner record"),
    "partner is a tensor": (lambda d: _set_field(d, "r0.partner", 1), "is not a quantized layer"),
    "ndim": (lambda d: _set_field(d, "r1.ndim", 9), "dimensions"),
    "shape vs payload": (lambda d: _set_field(d, "r0.dim1", 4), "records need sections"),
    "layer of 2^28 weights": (lambda d: _record(d, 0, shape=(1 << 16, 1 << 12, 1, 1)), "declares .* the file has"),
    "layer of 2^40 weights": (lambda d: _record(d, 0, keep_sizes=True, shape=(1 << 20, 1 << 20, 1, 1)),
                              "elements allowed"),
    "conv shape on a linear": (lambda d: _record(d, 0, kind="linear"), "linear weight cannot have shape"),
    "layer key": (lambda d: _record(d, 0, name="0.bias2"), "must be '<module>.weight'"),
}


def _get(data: bytes, name: str) -> int:
    off, size = _field(data, name)
    return int.from_bytes(data[off:off + size], "little")


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_headers_raise_one_line(base, tmp_path, case):
    mutate, message = HEADER_CASES[case]
    path = tmp_path / "m.dfmpc"
    path.write_bytes(mutate(base))
    for fn in (lambda: load_packed(path, model=variant_net("relu6")), lambda: inspect_packed(path)):
        with pytest.raises(BadFileError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)


FIT_CASES = {
    "records swapped": (_swap_records, "entry #1 is '1.running_var'|entry #1"),
    "dtype vs architecture": (lambda d: _record(d, 1, dtype="I32"), "'1.weight' is torch.int32 \\[8\\] in the file"),
    "shape vs architecture": (lambda d: _record(d, 1, shape=(4, 2)), "does not fit"),
    "renamed key": (lambda d: _record(d, 1, name="1.gamma"), "entry #1 is '1.gamma' in the file but '1.weight'"),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_files_that_do_not_fit_the_architecture(base, tmp_path, case):
    """Consistent files for another architecture: refused before any payload is decoded."""
    mutate, message = FIT_CASES[case]
    path = tmp_path / "m.dfmpc"
    path.write_bytes(mutate(base))
    with pytest.raises(BadFileError, match=message):
        load_packed(path, model=variant_net("relu6"))


def _low(h) -> LayerRecord:
    return next(r for r in h.layers if r.bits == 2)


def _six(h) -> LayerRecord:
    return next(r for r in h.layers if r.bits == 6 and r.in_scale)


def _set_codes(fn):
    def edit(h, buf):
        r = _low(h)
        _, _, c = layer_offsets(h)[r.fqn]
        fn(buf, c, r)
    return edit


def _set_f32(which: str, value: float, count: int = 1):
    def edit(h, buf):
        r = _six(h)
        s, ins, _ = layer_offsets(h)[r.fqn]
        off = {"scale": s, "in_scale": ins}[which]
        buf[off:off + 4 * count] = struct.pack(f"<{count}f", *[value] * count)
    return edit


def _set_tensor(key: str, value: float, index: int = 0):
    def edit(h, buf):
        off = tensor_offsets(h)[key] + 4 * index
        buf[off:off + 4] = struct.pack("<f", value)
    return edit


CONTENT_CASES = {
    "invalid trit byte": (_set_codes(lambda b, c, r: b.__setitem__(c, 250)), "250 > 242"),
    "non-zero padding": (_set_codes(lambda b, c, r: b.__setitem__(c + r.nbytes - 1, 242)), "padding"),
    "NaN scale": (_set_f32("scale", math.nan), "the scale holds 1 non-finite"),  # stored once, for 8 channels
    "Inf in_scale": (_set_f32("in_scale", math.inf), "the in_scale holds 1 non-finite"),
    "huge scale": (_set_f32("scale", 1e38), "make weights up to [0-9.]+e\\+39, beyond float32"),
    "NaN BN weight": (_set_tensor("1.weight", math.nan), "'1.weight' holds 1 non-finite"),
    "Inf BN mean": (_set_tensor("4.running_mean", -math.inf, 3), "'4.running_mean' holds 1 non-finite"),
    "NaN BN variance": (_set_tensor("1.running_var", math.nan), "'1.running_var' holds 1 non-finite"),
    "negative BN variance": (_set_tensor("1.running_var", -0.5, 2), "'1.running_var' has 1 negative value"),
    "negative zero-ish variance": (_set_tensor("4.running_var", -1e-30, 7), "'4.running_var' has 1 negative value"),
}


def _assert_bad_content(path, message, net, capsys):
    with pytest.raises(BadFileError, match=message) as info:
        load_packed(path, model=net)
    assert "\n" not in str(info.value)
    res = inspect_packed(path)
    assert not res.ok and any(__import__("re").search(message, p) for p in res.problems), res.problems
    assert "verdict: BAD" in res.text and " BAD" in res.text
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "verdict: BAD" in out


@pytest.mark.parametrize("case", list(CONTENT_CASES))
def test_bad_content_is_refused_and_flagged(base, tmp_path, capsys, case):
    edit, message = CONTENT_CASES[case]
    path = tmp_path / "m.dfmpc"
    path.write_bytes(edit_payload(base, edit))
    _assert_bad_content(path, message, variant_net("relu6"), capsys)


def test_section_checksum(base, tmp_path, capsys):
    data = bytearray(base)
    data[-5] ^= 0x40
    (tmp_path / "m.dfmpc").write_bytes(bytes(data))
    _assert_bad_content(tmp_path / "m.dfmpc", "checksum mismatch", variant_net("relu6"), capsys)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    mp = compensate(bell_net(), (3, 16, 16), **quick_config(), arch="bell")
    path = tmp_path_factory.mktemp("z") / "m.dfmpc"
    save_packed(mp, path, compress=True)
    return path.read_bytes()


def _deflated(h) -> LayerRecord:
    return next(r for r in h.layers if r.layout == "kbit-deflate")


def _replace_stream(make):
    def edit(h, buf):
        r = _deflated(h)
        _, _, c = layer_offsets(h)[r.fqn]
        z = make(r)
        z = z[: r.nbytes] + bytes(max(0, r.nbytes - len(z)))  # same length: the sizes stay consistent
        buf[c:c + r.nbytes] = z
    return edit


@pytest.mark.parametrize("case,make,message", [
    ("garbage", lambda r: b"\xff" * r.nbytes, "corrupt"),
    ("too short", lambda r: deflate_bytes(bytes(r.numel - 1)), "do not decode to exactly|truncated"),
    ("too long", lambda r: deflate_bytes(bytes(r.numel + 50)), "more than"),
    ("out of range", lambda r: deflate_bytes(bytes([64]) * r.numel), "does not fit in 6 bits"),
])
def test_bad_deflate_streams(compressed, tmp_path, capsys, case, make, message):
    path = tmp_path / "m.dfmpc"
    path.write_bytes(edit_payload(compressed, _replace_stream(make)))
    _assert_bad_content(path, message, bell_net(), capsys)


def test_deflate_size_claims(compressed, tmp_path):
    h, _ = split(compressed)
    i = next(i for i, r in enumerate(h.records) if isinstance(r, LayerRecord) and r.layout == "kbit-deflate")
    r = h.records[i]
    for nb in (1, 10 ** 8):
        path = tmp_path / "m.dfmpc"
        path.write_bytes(_record(compressed, i, keep_sizes=True, nbytes=nb))
        with pytest.raises(BadFileError, match="compressed size"):
            load_packed(path, model=bell_net())
    assert r.nbytes > 1


def test_zero_scale_on_an_all_zero_layer_is_legitimate(tmp_path):
    """A ternary layer whose codes are all 0 may have scale 0 (TWN gives alpha = 0 to an all-zero weight)."""
    net = variant_net("relu")
    with torch.no_grad():
        net[0].weight.zero_()
    mp = compensate(net, (3, 16, 16), **quick_config(), arch="z")
    q = mp.layers["0"]
    assert q.bits == 2 and not q.codes.any() and not q.scale.any()
    save_packed(mp, tmp_path / "z.dfmpc")
    back = load_packed(tmp_path / "z.dfmpc", model=net)
    x = variant_inputs()
    assert torch.equal(forward(back.module, x), forward(mp.module, x))
    assert inspect_packed(tmp_path / "z.dfmpc").ok


def test_zero_bn_variance_is_legitimate(tmp_path):
    """A channel whose quantized weights are all 0 has a re-estimated variance of exactly 0 (zeroq on the tiny net
    gives one); BatchNorm divides by sqrt(var + eps), so the model is finite and packs."""
    net = variant_net("relu")
    mp = compensate(net, (3, 16, 16), **quick_config(), arch="v")
    with torch.no_grad():
        mp.module[1].running_var[3] = 0.0
    save_packed(mp, tmp_path / "v.dfmpc")
    back = load_packed(tmp_path / "v.dfmpc", model=net)
    x = variant_inputs()
    assert torch.equal(forward(back.module, x), forward(mp.module, x)) and inspect_packed(tmp_path / "v.dfmpc").ok


# ------------------------------------------------------------------------------------------- unpackable models

@pytest.fixture
def tiny_mp():
    return compensate(variant_net("relu6"), (3, 16, 16), **quick_config(), arch="tiny")


def _broken(mp, what: str):
    mp = dataclasses.replace(mp, layers=dict(mp.layers))
    with torch.no_grad():
        if what == "nan scale":
            q = mp.layers["3"]
            mp.layers["3"] = dataclasses.replace(q, scale=torch.full_like(q.scale, math.nan))
            mp.module[3].weight.copy_(mp.layers["3"].weight())
        elif what == "huge scale":
            q = mp.layers["3"]
            mp.layers["3"] = dataclasses.replace(q, scale=torch.full_like(q.scale, 1e37))
        elif what == "zero scales":
            q = mp.layers["3"]
            mp.layers["3"] = dataclasses.replace(q, scale=torch.zeros_like(q.scale))
            mp.module[3].weight.copy_(mp.layers["3"].weight())
        elif what == "nan statistics":
            mp.module[4].running_mean[2] = math.nan
        elif what == "negative variance":
            mp.module[1].running_var[0] = -1.0
        elif what == "inf bias":
            mp.module[8].bias[1] = math.inf
        elif what == "partner":
            mp.layers["0"] = dataclasses.replace(mp.layers["0"], partner="nowhere")
    return mp


@pytest.mark.parametrize("what,message", [
    ("nan scale", "layer '3': the scale holds 8 non-finite"),
    ("huge scale", "layer .3.: scales up to 1e\\+37 make weights up to [0-9.]+e\\+38, beyond float32"),
    ("nan statistics", "'4.running_mean': it holds 1 non-finite"),
    ("negative variance", "'1.running_var': it has 1 negative value"),
    ("inf bias", "'8.bias': it holds 1 non-finite"),
    ("partner", "partner 'nowhere' is not a quantized layer"),
])
def test_writer_refuses_broken_models(tiny_mp, tmp_path, what, message):
    """NaN statistics or zero scales (a failed method) are refused in one line naming the tensor; nothing written."""
    with pytest.raises(DfmpcError, match=message) as info:
        save_packed(_broken(tiny_mp, what), tmp_path / "m.dfmpc")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_what_the_format_cannot_hold(tiny_mp, tmp_path):
    mp = dataclasses.replace(tiny_mp, arch="x" * 300)
    with pytest.raises(DfmpcError, match="arch name"):
        save_packed(mp, tmp_path / "m.dfmpc")
    net = torch.nn.Sequential()
    net.add_module("m" * 300, torch.nn.Linear(2, 2))
    with pytest.raises(DfmpcError, match="longer than 255 bytes"):
        save_packed(dataclasses.replace(tiny_mp, module=net, layers={}), tmp_path / "m.dfmpc")
    net = torch.nn.Sequential()
    net.add_module("a\ud800", torch.nn.Linear(2, 2))  # a lone surrogate has no UTF-8
    with pytest.raises(DfmpcError, match="not valid Unicode text"):
        save_packed(dataclasses.replace(tiny_mp, module=net, layers={}), tmp_path / "m.dfmpc")
    flat = dict(tiny_mp.layers)
    q = flat["8"]
    flat["8"] = dataclasses.replace(q, kind="conv")  # a 2-D conv weight would not be readable
    with pytest.raises(DfmpcError, match="a conv weight of shape \\[5, 8\\] is beyond the format's limits"):
        save_packed(dataclasses.replace(tiny_mp, layers=flat), tmp_path / "m.dfmpc")
    assert list(tmp_path.iterdir()) == []


def test_magic_is_documented_bytes():
    assert MAGIC == bytes([0x89, 0x44, 0x46, 0x4D, 0x50, 0x43, 0x0D, 0x0A])
    assert isinstance(TensorRecord("a", "F32", (1,)).nbytes, int) and np.dtype("<f4").itemsize == 4


def test_pruned_kbit_layer_packs_and_reads_back_as_zeros(tiny_mp, tmp_path):
    """A pruned k-bit layer (every weight 0: all scales 0, as the odd-code grid has no zero) is a valid model."""
    mp = _broken(tiny_mp, "zero scales")
    assert mp.layers["3"].bits > 2 and not bool(mp.module[3].weight.any())
    save_packed(mp, tmp_path / "m.dfmpc")
    result = inspect_packed(tmp_path / "m.dfmpc")
    assert result.ok, result.problems
