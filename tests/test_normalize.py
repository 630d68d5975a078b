"""Robust normalization (Eq. 11): numpy-exact quantiles, valid positions only, errors."""

import numpy as np
import pytest
import torch

from ta_opd import TAInputError, apply_range, quantile_range, quantiles, robust_normalize
from tests.naive_reference import normalize as naive_normalize


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 101, 4097])
def test_quantiles_match_numpy(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    qs = (0.0, 0.05, 0.25, 0.5, 0.95, 1.0)
    got = quantiles(x, qs)
    want = np.quantile(x.numpy(), qs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


def test_hand_values():
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    # Q05 = 0.2, Q95 = 3.8 (linear interpolation on 5 points)
    assert quantile_range(z[0]) == pytest.approx((0.2, 3.8))
    got = robust_normalize(z, torch.ones_like(z, dtype=torch.bool))
    want = [0.0, 0.8 / 3.6, 1.8 / 3.6, 2.8 / 3.6, 1.0]
    assert got[0].tolist() == pytest.approx(want, abs=1e-6)


def test_matches_naive_with_padding_ignored():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 9, generator=gen)
    valid = torch.rand(4, 9, generator=gen) > 0.3
    z_padded = torch.where(valid, z, torch.full_like(z, 1e6))  # garbage at padding must not matter
    got = robust_normalize(z_padded, valid)
    want = naive_normalize(z[valid].tolist())
    assert got[valid].tolist() == pytest.approx(want, abs=1e-6)
    assert bool((got[~valid] == 0).all())


def test_constant_batch_is_all_zero_not_nan():
    z = torch.full((2, 3), 0.7)
    out = robust_normalize(z, torch.ones(2, 3, dtype=torch.bool))
    assert bool((out == 0).all())  # (z - lo) / (0 + eps) = 0


def test_apply_range_split_equals_whole():
    gen = torch.Generator().manual_seed(1)
    shards = [torch.randn(n, generator=gen) for n in (5, 11, 3)]
    lo, hi = quantile_range(torch.cat(shards))
    pieces = torch.cat([apply_range(s, lo, hi) for s in shards])
    whole = robust_normalize(torch.cat(shards).unsqueeze(0), torch.ones(1, 19, dtype=torch.bool))[0]
    assert torch.equal(pieces, whole)


def test_errors():
    valid = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(TAInputError, match="non-finite"):
        robust_normalize(torch.tensor([[0.0, float("inf"), 1.0]]), valid)
    with pytest.raises(TAInputError, match="empty batch"):
        robust_normalize(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(TAInputError, match="shape"):
        robust_normalize(torch.zeros(1, 3), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TAInputError, match="q_low"):
        quantile_range(torch.zeros(3), 0.9, 0.1)
    # a NaN at a padding position is fine
    z = torch.tensor([[0.0, float("nan"), 1.0]])
    out = robust_normalize(z, torch.tensor([[True, False, True]]))
    assert out.tolist() == [[0.0, 0.0, pytest.approx(1.0, abs=1e-6)]]
