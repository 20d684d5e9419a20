import pytest
import torch

from dfmpc_deploy.core.quantizers import code_range, dequantize, dorefa, ternarize


@pytest.mark.parametrize("per_channel", [False, True])
def test_ternarize_matches_twn_equations(per_channel):
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    codes, alpha = ternarize(w, per_channel)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    for j in range(8):
        a = (w[j] if per_channel else w).abs()
        delta = 0.7 * a.mean()
        mask = w[j].abs() > delta
        assert torch.equal(codes[j].bool(), mask)
        assert torch.equal(codes[j][mask], torch.sign(w[j][mask]).to(torch.int8))
        expect = a[a > delta].mean()
        assert torch.isclose(alpha[j], expect, rtol=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_dorefa_is_eq6_exactly(bits):
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(bits))
    codes, scale = dorefa(w, bits)
    n = 2 ** bits - 1
    s = w.abs().max()
    eq6 = 2 / n * torch.round(n * (w / (2 * s) + 0.5)) - 1  # the printed formula, in [-1, 1]
    assert torch.allclose(dequantize(codes, scale), s * eq6, atol=1e-6)
    lo, hi = code_range(bits)
    assert codes.min() >= lo and codes.max() <= hi
    assert bool((codes % 2 != 0).all()), "DoReFa levels are odd multiples of 1/(2^k-1): zero is not a level"
    assert (dequantize(codes, scale) - w).abs().max() <= s / n + 1e-6


def test_dequantize_is_deterministic_float32():
    codes, scale = ternarize(torch.randn(4, 3, 3, 3))
    a, b = dequantize(codes, scale), dequantize(codes.clone(), scale.clone())
    assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_dorefa_keeps_a_pruned_channel_exactly_zero(bits):
    w = torch.randn(4, 3, 3, 3)
    w[2] = 0.0
    codes, scale = dorefa(w, bits, per_channel=True)
    q = dequantize(codes, scale)
    assert torch.equal(q[2], torch.zeros_like(q[2])) and scale[2] == 0
    assert (scale[[0, 1, 3]] > 0).all() and torch.isfinite(q).all()
