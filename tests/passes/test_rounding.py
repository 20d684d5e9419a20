"""passes/rounding.py: the fast error-feedback rounding against a plain float64 reference, and the grid search."""
import pytest
import torch

from dfmpc_deploy.core.quantizers import code_range, quantize_weight
from dfmpc_deploy.passes.rounding import (
    best_grid_codes,
    direction_error,
    gptq_codes,
    grouped_codes,
    input_second_moment,
    inverse_factor,
    nearest_codes,
    shrink_to_diagonal,
)


def _problem(seed, rows=24, k=72, n=600):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.exp(0.5 * torch.randn(rows, 1, generator=g))
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)  # correlated inputs, as im2col patches are
    x = torch.randn(n, k, generator=g) @ mix
    return w, x.T @ x / n


def _reference(w, h, scale, bits, damp=0.01):
    """The textbook algorithm: float64, one column at a time, the inverse factor by cholesky_inverse."""
    w, h, scale = w.double().clone(), h.double().clone(), scale.double()
    k = w.shape[1]
    dead = torch.diag(h) == 0
    live_mean = torch.diag(h)[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=h.dtype)
    h[dead, dead] = live_mean
    h += damp * live_mean * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for i in range(k):
        q = nearest_codes(w[:, i], scale, bits)
        codes[:, i] = q
        err = (w[:, i] - q * scale) / u[i, i]
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    return codes


def _out_err(codes, scale, w, h):
    d = codes.double() * scale.double()[:, None] - w.double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("seed", range(3))
def test_inverse_factor_is_the_upper_cholesky_of_the_inverse(seed):
    _, h = _problem(seed)
    u, dead = inverse_factor(h.double(), damp=0.01)
    hd = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    assert not dead.any()
    assert torch.allclose(u, torch.triu(u)) and (torch.diag(u) > 0).all()
    assert torch.allclose(u.T @ u, torch.linalg.inv(hd), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 6])
@pytest.mark.parametrize("seed", range(3))
def test_blocked_float32_matches_the_float64_reference(bits, seed):
    w, h = _problem(seed)
    _, scale = quantize_weight(w, bits)
    ref = _reference(w, h, scale, bits)
    u, _ = inverse_factor(h.float())
    fast = gptq_codes(w.float(), u, scale, bits, block=16)  # several blocks
    agree = float((fast.double() == ref).float().mean())
    assert agree >= 0.99, f"only {agree:.3f} of the codes agree with the reference"
    e_ref, e_fast = _out_err(ref, scale, w, h), _out_err(fast, scale, w, h)
    assert e_fast <= 1.01 * e_ref, f"output error {e_fast:.5g} vs reference {e_ref:.5g}"


@pytest.mark.parametrize("bits,grid", [(2, "int"), (3, "dorefa"), (3, "int")])
def test_error_feedback_beats_nearest_rounding_in_output_error(bits, grid):
    w, h = _problem(5, rows=32, k=90)
    codes_n, scale = quantize_weight(w, bits, grid=grid)
    u, _ = inverse_factor(h)
    fast = gptq_codes(w, u, scale, bits, grid=grid)
    assert _out_err(fast, scale, w, h) < 0.8 * _out_err(codes_n.flatten(1).float(), scale, w, h)
    lo, hi = code_range(bits, grid)
    assert fast.min() >= lo and fast.max() <= hi and torch.equal(fast, fast.round())
    if bits > 2 and grid == "dorefa":
        assert bool(((fast + 2 ** bits - 1) % 2 == 0).all()), "DoReFa codes must stay odd"


def test_grid_search_with_every_row_is_the_exhaustive_choice():
    w, h = _problem(1, rows=20)
    _, scale = quantize_weight(w, 2)
    codes, chosen, m = best_grid_codes(w, h, scale, 2, search_rows=64)
    u, _ = inverse_factor(h)
    errs = {mm: float(direction_error(gptq_codes(w, u, scale * mm, 2), scale * mm, w, h).sum())
            for mm in (0.7, 0.85, 1.0, 1.2, 1.4)}
    assert m == min(errs, key=errs.get)
    assert torch.allclose(chosen, scale * m)
    assert torch.equal(codes, gptq_codes(w, u, scale * m, 2))


def test_grid_search_on_a_row_subset_has_small_regret():
    """Above ``search_rows`` the step is chosen on a subset; its full-layer error stays within 2 % of the best."""
    regrets = []
    for seed in range(4):
        w, h = _problem(seed + 10, rows=256, k=64)
        _, scale = quantize_weight(w, 2)
        _, _, m = best_grid_codes(w, h, scale, 2, search_rows=64, seed=seed)
        u, _ = inverse_factor(h)
        full = {mm: float(direction_error(gptq_codes(w, u, scale * mm, 2), scale * mm, w, h).sum())
                for mm in (0.7, 0.85, 1.0, 1.2, 1.4)}
        regrets.append(full[m] / min(full.values()) - 1)
    assert max(regrets) <= 0.02, regrets


@pytest.mark.parametrize("bits", [2, 4])
def test_a_dead_input_keeps_its_nearest_code_and_feeds_nothing_back(bits):
    """An input that is zero on every calibration input says nothing about its weight: the nearest code, as plain
    rounding gives (synthetic inputs can leave a channel dark that real data lights), and the other columns are
    rounded as if it were not there."""
    w, h = _problem(2)
    h[:, 3] = 0
    h[3, :] = 0
    _, scale = quantize_weight(w, bits)
    codes, _, _ = best_grid_codes(w, h, scale, bits, multipliers=(1.0,))
    assert torch.equal(codes[:, 3], nearest_codes(w[:, 3], scale, bits))
    keep = [i for i in range(w.shape[1]) if i != 3]
    alone, _, _ = best_grid_codes(w[:, keep], h[keep][:, keep], scale, bits, multipliers=(1.0,))
    assert torch.equal(codes[:, keep], alone)


def test_an_all_dead_group_is_rounded_to_nearest():
    w, _ = _problem(3, rows=8, k=9)
    h = torch.zeros(2, 9, 9)
    _, scale = quantize_weight(w, 4)
    codes, _, _ = grouped_codes(w, h, scale, 4, groups=2)
    assert torch.equal(codes, nearest_codes(w, scale[:, None], 4))


def test_second_moment_of_conv_patches_and_row_subset():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    h = input_second_moment(conv, x)
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    assert torch.allclose(h, cols.T @ cols / cols.shape[0], atol=1e-5)
    sub = input_second_moment(conv, x, max_rows=32)
    assert sub.shape == (27, 27) and torch.allclose(sub, sub.T)


@pytest.mark.parametrize("bits", [2, 3])
def test_a_zero_scale_row_stays_finite_and_feeds_its_whole_error_back(bits):
    w, h = _problem(3, rows=8, k=40)
    w[5] = 0.0
    codes, scale = quantize_weight(w, bits, per_channel=True)
    assert scale[5] == 0
    u, _ = inverse_factor(h)
    out = gptq_codes(w, u, scale, bits)
    assert torch.isfinite(out).all()
    c, s, _ = best_grid_codes(w, h, scale, bits)
    assert torch.isfinite(c).all() and s[5] == 0


@pytest.mark.parametrize("bits", [2, 3, 6, 8])
@pytest.mark.parametrize("block", [7, 128])
def test_numpy_column_loop_gives_the_torch_loops_codes_bit_for_bit(monkeypatch, bits, block):
    """The CPU fast path runs each block's column loop through numpy; it must be the same float32 arithmetic."""
    import dfmpc_deploy.passes.rounding as rounding

    w, h = _problem(5, rows=40, k=300)
    u, dead = inverse_factor(h)
    w[:, dead] = 0.0
    scale = quantize_weight(w, bits, per_channel=True)[1].reshape(-1).float().clone()
    scale[3] = 0.0  # a zero-scale row takes the same path in both loops
    fast = gptq_codes(w, u, scale, bits, block=block)
    monkeypatch.setattr(rounding, "_NUMPY_LOOP", False)
    slow = gptq_codes(w, u, scale, bits, block=block)
    assert torch.equal(fast, slow)


def _per_sample_moments(seed, mix):
    g = torch.Generator().manual_seed(seed)
    hs = torch.stack([(lambda a: a.T @ a / 50)(torch.randn(50, 6, generator=g) @ mix) for _ in range(8)])
    return hs.mean(0), (hs * hs).mean(0)


def test_shrinkage_keeps_the_diagonal_and_scales_the_rest_by_one_factor_in_0_1():
    mean, mean_sq = _per_sample_moments(4, torch.eye(6) + 0.8)  # strongly correlated columns
    out = shrink_to_diagonal(mean, mean_sq, 8)
    assert torch.equal(out.diagonal(), mean.diagonal())
    off = ~torch.eye(6, dtype=torch.bool)
    ratio = out[off] / mean[off]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and 0 < float(ratio[0]) < 1
    # independent columns: the off-diagonal entries are mostly noise, so they are shrunk hard
    mean, mean_sq = _per_sample_moments(4, torch.eye(6))
    out = shrink_to_diagonal(mean, mean_sq, 8)
    assert float((out[off] / mean[off]).max()) < 0.5


def test_shrinkage_without_noise_or_with_one_sample_changes_nothing():
    h = torch.randn(5, 5)
    h = h @ h.T
    assert torch.equal(shrink_to_diagonal(h, h * h, 8), h)
    assert torch.equal(shrink_to_diagonal(h, 2 * h * h, 1), h)


@pytest.mark.parametrize("groups", [1, 4])
def test_shrunk_second_moment_of_identical_samples_is_the_plain_one(groups):
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=groups)
    x = torch.randn(1, 4, 6, 6).expand(3, 4, 6, 6).contiguous()
    plain, shrunk = input_second_moment(conv, x), input_second_moment(conv, x, shrink=True)
    assert torch.allclose(shrunk, plain, rtol=1e-4, atol=1e-6)
    y = torch.randn(3, 4, 6, 6)
    p2, s2 = input_second_moment(conv, y), input_second_moment(conv, y, shrink=True)
    assert torch.allclose(s2.diagonal(dim1=-2, dim2=-1), p2.diagonal(dim1=-2, dim2=-1), rtol=1e-4, atol=1e-6)
