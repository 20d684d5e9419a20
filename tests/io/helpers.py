"""Tiny models and file surgery shared by the packed-format tests (tests/io, tests/hostile)."""
from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import nn

from dfmpc_deploy.io.header import DIGEST_BYTES, PREAMBLE_BYTES, Header, LayerRecord, encode_header, parse_header
from tests.conftest import trained_bn_statistics_


def quick_config(low: int = 2, high: int = 6, per_channel: bool = False) -> dict:
    """Settings without BN re-estimation and with round-to-nearest (c folded): fast, and packing does not depend on
    how the codes were chosen."""
    return {"bits": f"{low}/{high}", "recal": "none", "c_mode": "paper", "rounding": "nearest",
            "per_channel": per_channel}


def variant_net(variant: str = "relu", width: int = 8) -> nn.Module:
    """Seeded Conv-BN-act-Conv-BN-ReLU-GAP-Linear with non-trivial BN statistics (input 3x16x16).

    ``relu``: c folds into BN; ``relu6``: c goes to the next conv's input channels (in_scale);
    ``nobn``: no BN, biased convs, c folds into the low layer's scale and bias.
    """
    torch.manual_seed(0)
    act = nn.ReLU6() if variant == "relu6" else nn.ReLU()
    if variant == "nobn":
        net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), act, nn.Conv2d(width, width, 3), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))
    else:
        net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), act,
                            nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def bell_net() -> nn.Module:
    """variant_net("relu") widened, with Gaussian weights: its 6-bit codes compress, its small layers do not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
    return net.eval()


class OddNet(nn.Module):
    """Odd element counts everywhere (5 x 3 x 3 x 3 = 135, 7 x 5 x 3 x 1 = 105, 3 x 7 = 21) and stored tensors of
    other dtypes (float16, float64, bool, a 0-d int64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(5)
        self.b = nn.Conv2d(5, 7, (3, 1), padding=(1, 0), bias=False)
        self.bn_b = nn.BatchNorm2d(7)
        self.fc = nn.Linear(7, 3)
        self.act = nn.ReLU6()
        self.register_buffer("f16", torch.linspace(-1, 1, 3).half())
        self.register_buffer("f64", torch.tensor(0.125, dtype=torch.float64))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("count", torch.tensor(7))
        trained_bn_statistics_(self)  # identity statistics would read as folded BN (another recipe)

    def forward(self, x):
        x = self.act(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(x.mean(dim=(2, 3))) + self.f16.float() * self.mask + self.f64.float()


def variant_inputs(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def assert_same_model(a, b, x) -> None:
    """Same outputs bit for bit, same state dict, same layers (codes, scales, roles); ``b`` was loaded from a file."""
    assert torch.equal(forward(a.module, x), forward(b.module, x)), "outputs differ after the round trip"
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert list(a.layers) == list(b.layers)
    for fqn, qa in a.layers.items():
        qb = b.layers[fqn]
        assert (qa.kind, qa.role, qa.bits, qa.partner) == (qb.kind, qb.role, qb.bits, qb.partner)
        assert qa.bits == 2 or qa.grid == qb.grid, f"{fqn}: grid {qa.grid} read back as {qb.grid}"
        assert qa.codes.dtype == qb.codes.dtype and torch.equal(qa.codes, qb.codes)
        assert qb.scale.dtype == torch.float32 and torch.equal(qa.scale, qb.scale)
        assert (qa.in_scale is None) == (qb.in_scale is None)
        assert qa.in_scale is None or torch.equal(qa.in_scale, qb.in_scale)
    assert (a.arch, a.estimator) == (b.arch, b.estimator) and b.config is None


# ------------------------------------------------------------------------------------------------ file surgery

def header_nbytes_of(data: bytes) -> int:
    """H, the header length in the preamble."""
    return int.from_bytes(data[12:16], "little")


def split(data: bytes) -> tuple[Header, bytes]:
    """(header, payload) of a valid file."""
    n = header_nbytes_of(data)
    end = PREAMBLE_BYTES + n + DIGEST_BYTES
    return parse_header(data[:end], len(data), "test"), data[end:]


def sections(h: Header, payload: bytes) -> list[bytes]:
    t, s, _ = h.section_nbytes
    return [payload[:t], payload[t:t + s], payload[t + s:]]


def join(h: Header, payload: bytes, fix_digests: bool = True) -> bytes:
    """Encode ``h`` (re-signed) in front of ``payload``; with ``fix_digests`` the section digests match it."""
    if fix_digests:
        t, s, c = h.section_nbytes
        parts = [payload[:t], payload[t:t + s], payload[t + s:t + s + c]]
        h = dataclasses.replace(h, digests=tuple(hashlib.sha256(p).digest() for p in parts))
    return encode_header(h) + payload


def resign(data: bytes) -> bytes:
    """Recompute the header digest after the header bytes were edited in place."""
    n = header_nbytes_of(data)
    end = PREAMBLE_BYTES + n
    if len(data) < end + DIGEST_BYTES:
        return data
    return data[:end] + hashlib.sha256(data[:end]).digest() + data[end + DIGEST_BYTES:]


def field_spans(data: bytes) -> list[tuple[str, int, int]]:
    """(field, offset, size) of every header field of a valid file."""
    spans: list = []
    encode_header(split(data)[0], spans)
    return spans


def poke(data: bytes, offset: int, size: int, value: int) -> bytes:
    """Overwrite ``size`` bytes at ``offset`` with ``value`` little-endian (wrapped to the field's width)."""
    return data[:offset] + (value % (1 << (8 * size))).to_bytes(size, "little") + data[offset + size:]


def edit_payload(data: bytes, fn) -> bytes:
    """Apply ``fn(header, bytearray payload)`` and fix the section digests (the header is re-signed)."""
    h, payload = split(data)
    buf = bytearray(payload)
    fn(h, buf)
    return join(h, bytes(buf))


def layer_offsets(h: Header) -> dict[str, tuple[int, int, int]]:
    """fqn -> (payload offset of its scale, of its in_scale or -1, of its codes)."""
    t, s, _ = h.section_nbytes
    spos, cpos, out = t, t + s, {}
    for r in h.records:
        if isinstance(r, LayerRecord):
            ins = spos + 4 * r.scale_count if r.in_scale else -1
            out[r.fqn] = (spos, ins, cpos)
            spos += 4 * (r.scale_count + r.in_scale_count)
            cpos += r.nbytes
    return out


def tensor_offsets(h: Header) -> dict[str, int]:
    """state-dict key -> payload offset of a stored tensor."""
    pos, out = 0, {}
    for r in h.tensors:
        out[r.name] = pos
        pos += r.nbytes
    return out
