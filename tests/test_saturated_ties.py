"""Saturated soft-OR scores tie exactly, so the documented tie rule decides (issue 12)."""

import pytest
import torch

from ta_opd import PositionStats, TAConfig, select_positions
from ta_opd.selectors import probabilistic_or

# b values for which the old a + b - a·b form gives 1 ± ulp at a = 1 in fp32
B_VALUES = [0.1, 0.3, 0.7, 0.9, 0.33, 0.6]


def test_soft_or_is_exact_at_one():
    a = torch.ones(len(B_VALUES))
    b = torch.tensor(B_VALUES)
    assert bool(((a + b - a * b) != 1).any())  # the rounding noise this guards against
    assert torch.equal(probabilistic_or(a, b), a)
    assert torch.equal(probabilistic_or(b, a), a)
    x, y = torch.rand(100), torch.rand(100)
    torch.testing.assert_close(probabilistic_or(x, y), x + y - x * y, rtol=0, atol=2e-7)


def _stats(D, C, H):
    D, C, H = (torch.as_tensor(v, dtype=torch.float32) for v in (D, C, H))
    z = torch.zeros_like(D)
    ids = torch.zeros(*D.shape, 1, dtype=torch.long)
    return PositionStats(D=D, C=C, C_low=C, C_high=C, C_hat=C, H=H, D_spread=z,
                         missing=torch.zeros_like(D, dtype=torch.int32), student_topk_ids=ids, teacher_topk_ids=ids)


@pytest.mark.parametrize("selector", ["tip", "teachability_entropy"])
def test_saturated_scores_follow_the_tie_rule(selector):
    """Six positions have H at the batch maximum, so H̃ = 1 and their score is 1 whatever D̃, C̃.
    The budget keeps 3 of them: earliest position first, then earliest sequence — never the ones
    the rounding of a + b - ab happens to push above 1."""
    B, T = 3, 8
    H = torch.zeros(B, T)
    D = torch.full((B, T), 0.5)
    C = torch.full((B, T), 0.5)
    D[:, 0] = C[:, 0] = 0.0  # unsaturated positions get D̃, C̃ strictly inside (0, 1)
    saturated = [(2, 1), (0, 3), (1, 3), (2, 2), (0, 5), (1, 4)]
    for (b, t), v in zip(saturated, B_VALUES):
        H[b, t] = 10.0  # above Q95 of H: H̃ = 1
        D[b, t] = v
        C[b, t] = 1.0 - v / 2
    valid = torch.ones(B, T, dtype=torch.bool)
    cfg = TAConfig(selector=selector, budget=3 / (B * T))
    sel = select_positions(_stats(D, C, H), valid, cfg, step=0)
    sat = torch.zeros(B, T, dtype=torch.bool)
    for b, t in saturated:
        sat[b, t] = True
    assert bool((sel.scores[sat] == 1).all())
    assert bool((sel.scores[~sat] < 1).all())
    # position 1: (2, 1); position 2: (2, 2); position 3: (0, 3) before (1, 3)
    want = {(2, 1), (2, 2), (0, 3)}
    assert {tuple(x) for x in sel.mask.nonzero().tolist()} == want
