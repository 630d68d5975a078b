"""Diagnostic scoring: gain and KLs against direct full-vocabulary computation; chunk invariance."""

import numpy as np
import pytest
import torch

from ta_opd.kl import forward_kl
from ta_opd.tools.diagnose.scoring import score_positions


def test_forward_kl_and_gain_match_direct():
    gen = torch.Generator().manual_seed(0)
    s0, st, t = (torch.randn(13, 40, generator=gen) * 2 for _ in range(3))
    kl, bc = forward_kl(t, s0, chunk_size=4)
    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s0, -1)
    torch.testing.assert_close(kl, (lt.exp() * (lt - ls)).sum(-1))
    torch.testing.assert_close(bc, (lt.exp() * ls.exp()).sqrt().sum(-1))
    cols = score_positions(s0, st, t, ks=(2, 5), chunk_size=3)
    lst = torch.log_softmax(st, -1)
    want = (lt.exp() * (lt - ls)).sum(-1) - (lt.exp() * (lt - lst)).sum(-1)
    np.testing.assert_allclose(cols["gain"], want.numpy(), rtol=1e-5, atol=1e-6)
    assert set(cols) >= {"H", "teacher_H", "D_k2", "C_k5", "Chat_k5", "overlap_k2", "jaccard_k5",
                         "shared_teacher_mass_k2", "bhattacharyya", "gain_rel", "kl0", "kl_tau"}
    # chunked = single pass
    one = score_positions(s0, st, t, ks=(2, 5), chunk_size=1000)
    for k in cols:
        np.testing.assert_allclose(cols[k], one[k], rtol=1e-6, atol=1e-7)


def test_support_proxies_hand_case():
    # student top-2 {0, 1}, teacher top-2 {1, 2}: overlap 1/2, Jaccard 1/3
    ps = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]]).log()
    pt = torch.tensor([[0.1, 0.4, 0.3, 0.1, 0.05, 0.05]]).log()
    cols = score_positions(ps, ps, pt, ks=(2,))
    assert cols["overlap_k2"][0] == pytest.approx(0.5)
    assert cols["jaccard_k2"][0] == pytest.approx(1 / 3)
    assert cols["shared_teacher_mass_k2"][0] == pytest.approx(0.4, abs=1e-6)
    assert cols["gain"][0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same vocabulary"):
        score_positions(ps, ps, torch.randn(1, 7))


def test_relative_gain_is_nan_where_undefined():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    other = torch.tensor([[0.0, 2.0, -1.0]])
    cols = score_positions(logits, other, logits, ks=(1,))  # θ0 = teacher: KL0 = 0, KLτ > 0
    assert cols["kl0"][0] == pytest.approx(0.0, abs=1e-7) and cols["gain"][0] < 0
    assert np.isnan(cols["gain_rel"][0])
