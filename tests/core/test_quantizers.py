import numpy as np
import pytest
import torch

from dfmpc_deploy.core.quantizers import (
    DEFAULT_GRID,
    GRIDS,
    code_range,
    dequantize,
    dorefa,
    int_grid,
    quantize_weight,
    round_to_grid,
    ternarize,
)


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
    lo, hi = code_range(bits, "dorefa")
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


# ------------------------------------------------------------------------------------------------ the int grid


def _lattice(seed: int, per_channel: bool, shape=(16, 8, 3, 3)) -> torch.Tensor:
    """Weights on an int8 lattice ``s * q``, q in [-128, 127], -128 used; one step per tensor or per channel, steps
    from 1e-5 to 10 (float32 products, as torch's dequantize computes them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, shape, generator=g)
    q[:, 0, 0, 0] = -128  # every channel reaches the lattice's -128 ...
    q[1::2, 0, 0, 1] = 127  # ... and half of them 127 as well
    q[3] = 0  # a pruned channel
    exp = torch.empty(shape[0] if per_channel else 1).uniform_(-5, 1, generator=g)
    s = (torch.rand(exp.shape, generator=g) + 0.5) * 10 ** exp
    return q.float() * s.float().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_lattice_weights_come_back_exactly_at_8_bits(seed, per_channel):
    w = _lattice(seed, per_channel=False)  # a per-tensor lattice, quantized per tensor and per channel
    codes, scale = int_grid(w, 8, per_channel)
    assert torch.equal(dequantize(codes, scale), w), "a per-tensor int8 lattice must come back bit-exactly"
    assert int(codes.min()) == -128, "the lattice's -128 is a code"


@pytest.mark.parametrize("seed", range(20))
def test_per_channel_int8_lattice_comes_back_exactly_per_channel(seed):
    w = _lattice(seed, per_channel=True)
    codes, scale = int_grid(w, 8, per_channel=True)
    assert torch.equal(dequantize(codes, scale), w)
    codes_t, scale_t = int_grid(w, 8, per_channel=False)  # one step for all: not exact, but a good fit
    assert not torch.equal(dequantize(codes_t, scale_t), w)


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("per_channel", [False, True])
def test_int_codes_range_and_zero(bits, per_channel):
    w = torch.randn(12, 6, 3, 3, generator=torch.Generator().manual_seed(bits))
    w[0, 0] = 0.0
    w[5] = 0.0  # an all-zero channel
    codes, scale = quantize_weight(w, bits, per_channel, "int")
    lo, hi = code_range(bits, "int")
    assert (lo, hi) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert codes.dtype == torch.int16 and int(codes.min()) >= lo and int(codes.max()) <= hi
    q = dequantize(codes, scale)
    assert bool((q[w == 0] == 0).all()), "zero is a level: a zero weight stays exactly zero"
    assert torch.isfinite(q).all() and torch.equal(q[5], torch.zeros_like(q[5]))
    assert (scale[5] == 0) if per_channel else bool((scale == scale[0]).all())
    assert float(scale.max()) > 0


@pytest.mark.parametrize("bits", range(3, 9))
@pytest.mark.parametrize("per_channel", [False, True])
def test_int_weight_error_is_at_most_dorefa_on_gaussian_weights(bits, per_channel):
    w = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(100 + bits))
    e_int = float((dequantize(*int_grid(w, bits, per_channel)) - w).pow(2).sum())
    e_dorefa = float((dequantize(*dorefa(w, bits, per_channel)) - w).pow(2).sum())
    assert e_int <= e_dorefa, f"{bits} bits: int MSE {e_int:.4g} > DoReFa {e_dorefa:.4g}"


def test_int_step_is_a_candidate_and_nearest_rounding():
    w = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    codes, scale = int_grid(w, 6, per_channel=True)
    again = round_to_grid(w, scale[:, None], 6, "int")
    assert torch.equal(again.to(torch.int16), codes), "codes are the nearest on the chosen step"


def test_all_zero_tensor_quantizes_to_zero_scale():
    codes, scale = int_grid(torch.zeros(4, 3, 3, 3), 8)
    assert not codes.any() and not scale.any()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("bits", [2, 3, 6, 8])
def test_round_to_grid_numpy_matches_torch(grid, bits):
    v = torch.randn(64, 9, generator=torch.Generator().manual_seed(bits)) * 3
    s = torch.rand(64, 1, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.01
    a = round_to_grid(v, s, bits, grid)
    b = round_to_grid(v.numpy(), s.numpy(), bits, grid)
    assert b.dtype == np.float32 and np.array_equal(a.numpy(), b)
    lo, hi = code_range(bits, grid)
    assert float(a.min()) >= lo and float(a.max()) <= hi


def test_ternary_is_twn_whatever_the_grid_and_unknown_grids_are_refused():
    w = torch.randn(6, 4, 3, 3)
    for grid in GRIDS:
        assert all(torch.equal(a, b) for a, b in zip(quantize_weight(w, 2, False, grid), ternarize(w)))
    assert DEFAULT_GRID in GRIDS
    with pytest.raises(ValueError, match="unknown grid 'uniform'"):
        quantize_weight(w, 4, grid="uniform")


@pytest.mark.parametrize("largest", [126, 124, 100])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_lattice_whose_codes_stop_below_127_comes_back_exactly(largest, per_channel):
    """Quantization-aware training leaves some layers whose largest code is 124 or 126, not 127 (MobileNetV2)."""
    g = torch.Generator().manual_seed(largest)
    q = torch.randint(-largest, largest + 1, (24, 16, 3, 3), generator=g)
    q[0, 0, 0, 0] = largest
    w = q.float() * torch.tensor(0.00268489774, dtype=torch.float32)
    codes, scale = int_grid(w, 8, per_channel)
    assert torch.equal(dequantize(codes, scale), w)


def _weighted_error(w, codes, scale, col_weight):
    return float(((dequantize(codes, scale) - w).flatten(1) ** 2 * col_weight).sum())


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_weighted_step_has_the_least_weighted_error(bits, per_channel):
    """``col_weight`` (a layer input's per-column energy) changes what the step minimises: the weighted choice is
    never worse on the weighted error than the plain one, and uniform weights change nothing."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 8, 3, 3, generator=g)
    w[:, 0] *= 6  # strong weights on one input channel...
    energy = torch.rand(8, generator=g).repeat_interleave(9) + 0.05
    energy[:9] = 20.0  # ...whose input is strong too: clipping them costs output error, not just weight error
    plain = int_grid(w, bits, per_channel)
    weighted = int_grid(w, bits, per_channel, col_weight=energy)
    assert _weighted_error(w, *weighted, energy) <= _weighted_error(w, *plain, energy) * (1 + 1e-6)
    uniform = int_grid(w, bits, per_channel, col_weight=torch.ones(72))
    assert all(torch.equal(a, b) for a, b in zip(uniform, plain))


@pytest.mark.parametrize("per_channel", [False, True])
def test_weighted_step_keeps_int8_lattices_exact(per_channel):
    w = _lattice(7, per_channel=False)
    energy = torch.rand(w[0].numel(), generator=torch.Generator().manual_seed(1)) + 0.1
    codes, scale = int_grid(w, 8, per_channel, col_weight=energy)
    assert torch.equal(dequantize(codes, scale), w)
