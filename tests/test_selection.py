"""Selectors and budget (Eqs. 12-16, 13): hand mask, exact counts, ties, padding, seeds."""

import math
import warnings

import pytest
import torch

from ta_opd import (PositionStats, TAConfig, TAConfigError, TAInputError, available_selectors, budget_count,
                    get_selector, normalize_batch, register_selector, select_budget, select_positions)
from ta_opd.selectors import random_scores

SPEC_SELECTORS = ["full", "teachability", "teachability_entropy", "entropy", "divergence", "tip",
                  "compatibility", "incompatible", "random"]


def make_stats(D, C, H):
    """PositionStats with given raw D, C, H; exact C (no missing ids)."""
    D, C, H = (torch.as_tensor(x, dtype=torch.float32) for x in (D, C, H))
    z = torch.zeros_like(D)
    ids = torch.zeros(*D.shape, 1, dtype=torch.long)
    return PositionStats(D=D, C=C, C_low=C, C_high=C, C_hat=C * 0.5, H=H, D_spread=z,
                         missing=torch.zeros_like(D, dtype=torch.int32), student_topk_ids=ids, teacher_topk_ids=ids)


def test_every_spec_selector_and_q3_variant_registered():
    names = available_selectors()
    for s in SPEC_SELECTORS:
        assert s in names
        if s != "full":
            assert f"q3_{s}" in names


def test_registry_errors():
    with pytest.raises(TAConfigError, match="valid selectors: full, teachability"):
        get_selector("teachabilty")
    with pytest.raises(TAConfigError, match="already registered"):
        register_selector("entropy")(lambda x: x.H)
    with pytest.raises(TAConfigError, match="selector='nope' is unknown"):
        TAConfig(selector="nope")


def test_hand_normalized_scores_and_mask():
    # D = [0..4]: Q05 = .2, Q95 = 3.8; C sorted [.1,.3,.5,.7,.9]: Q05 = .14, Q95 = .86
    stats = make_stats([[0, 1, 2, 3, 4]], [[0.9, 0.1, 0.5, 0.3, 0.7]], [[1, 2, 3, 4, 5]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    cfg = TAConfig(budget=0.4)
    norm = normalize_batch(stats.D, stats.C, stats.H, valid, cfg)
    d_t = [0, 0.8 / 3.6, 1.8 / 3.6, 2.8 / 3.6, 1]
    c_t = [1, 0, 0.36 / 0.72, 0.16 / 0.72, 0.56 / 0.72]
    assert norm.D[0].tolist() == pytest.approx(d_t, abs=1e-6)
    assert norm.C[0].tolist() == pytest.approx(c_t, abs=1e-6)
    assert norm.DL[0].tolist() == pytest.approx([a * b for a, b in zip(d_t, c_t)], abs=1e-6)
    assert norm.DI[0].tolist() == pytest.approx([a * (1 - b) for a, b in zip(d_t, c_t)], abs=1e-6)
    sel = select_positions(stats, valid, cfg, step=0)
    assert sel.mask[0].tolist() == [False, False, True, False, True]  # n = ceil(.4*5) = 2
    assert sel.metrics["ta_opd/kept_ratio"] == pytest.approx(0.4)
    ent = select_positions(stats, valid, TAConfig(selector="entropy", budget=0.4), step=0)
    assert ent.mask[0].tolist() == [False, False, False, True, True]


def test_budget_count_exact_and_float_noise():
    assert budget_count(0.1, 10) == 1
    assert budget_count(0.07, 100) == 7  # 0.07*100 == 7.000000000000001 in binary floating point
    assert budget_count(0.1, 11) == 2
    assert budget_count(1.0, 5) == 5
    assert budget_count(1e-12, 100) == 1
    with pytest.raises(TAInputError, match="empty batch"):
        budget_count(0.1, 0)


@pytest.mark.parametrize("selector", SPEC_SELECTORS[1:])
@pytest.mark.parametrize("rho", [0.01, 0.05, 0.1, 0.3, 1.0])
def test_exactly_n_kept(selector, rho):
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 37
    valid = torch.rand(B, T, generator=gen) > 0.2
    stats = make_stats(torch.rand(B, T, generator=gen), torch.rand(B, T, generator=gen), torch.rand(B, T, generator=gen))
    sel = select_positions(stats, valid, TAConfig(selector=selector, budget=rho), step=4)
    assert int(sel.mask.sum()) == budget_count(rho, int(valid.sum()))
    assert not bool((sel.mask & ~valid).any())


def test_full_keeps_every_valid_position():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    sel = select_positions(make_stats(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3)), valid,
                           TAConfig(selector="full"), step=0)
    assert torch.equal(sel.mask, valid)
    assert sel.metrics["ta_opd/kept_ratio"] == 1.0


def test_ties_earlier_position_then_earlier_sequence():
    scores = torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 0.2]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    res = select_budget(scores, valid, budget=2 / 6)  # n = 2 among four tied 1.0 scores
    # tied at 1.0: (b0,t1), (b0,t2), (b1,t0), (b1,t1) -> position 0 first: (b1,t0); position 1: b0 then b1
    assert res.mask.tolist() == [[False, True, False], [True, False, False]]


@pytest.mark.parametrize("selector", SPEC_SELECTORS + ["q3_teachability", "q3_random"])
def test_padding_never_changes_real_mask(selector):
    gen = torch.Generator().manual_seed(5)
    B, T = 5, 12
    lengths = torch.randint(3, T + 1, (B,), generator=gen)
    valid = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # right-padded
    raw = [torch.rand(B, T, generator=gen) for _ in range(3)]
    cfg = TAConfig(selector=selector, budget=0.2)
    base = select_positions(make_stats(*raw), valid, cfg, step=2).mask
    # left-pad by 4 extra columns holding garbage: real positions must keep their decisions
    pad = 4
    shifted_valid = torch.zeros(B, T + pad, dtype=torch.bool)
    shifted = [torch.full((B, T + pad), 99.0) for _ in range(3)]
    for b in range(B):
        n = int(lengths[b])
        shifted_valid[b, T + pad - n:] = True
        for s, r in zip(shifted, raw):
            s[b, T + pad - n:] = r[b, :n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = select_positions(make_stats(*shifted), shifted_valid, cfg, step=2).mask
    for b in range(B):
        n = int(lengths[b])
        assert base[b, :n].tolist() == other[b, T + pad - n:].tolist()


def test_random_selector_reproducible_from_seed_and_step():
    valid = torch.ones(4, 50, dtype=torch.bool)
    stats = make_stats(torch.rand(4, 50), torch.rand(4, 50), torch.rand(4, 50))
    m = lambda seed, step: select_positions(stats, valid, TAConfig(selector="random", seed=seed), step).mask
    assert torch.equal(m(1, 7), m(1, 7))
    assert not torch.equal(m(1, 7), m(1, 8))
    assert not torch.equal(m(1, 7), m(2, 7))
    assert torch.equal(random_scores(valid, 3, 9), random_scores(valid, 3, 9))


def test_min_keep_per_sequence():
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.3, 0.2], [0.6, 0.5, 0.4]])
    valid = torch.ones(3, 3, dtype=torch.bool)
    valid[2] = False  # a sequence with no valid position keeps nothing
    res = select_budget(scores, valid, budget=2 / 6, min_keep_per_sequence=1)
    assert res.mask.tolist() == [[True, True, False], [False, True, False], [False, False, False]]
    assert (res.target, res.kept, res.min_keep_extra) == (2, 3, 1)
    plain = select_budget(scores, valid, budget=2 / 6)
    assert plain.kept == 2 and plain.min_keep_extra == 0


def test_q3_restricts_candidates_and_reports_shortfall():
    gen = torch.Generator().manual_seed(11)
    B, T = 4, 40
    valid = torch.ones(B, T, dtype=torch.bool)
    stats = make_stats(torch.rand(B, T, generator=gen), torch.rand(B, T, generator=gen), torch.rand(B, T, generator=gen))
    sel = select_positions(stats, valid, TAConfig(selector="q3_teachability", budget=0.1), step=0)
    assert bool((sel.mask <= sel.normalized.q3).all())
    assert sel.metrics["ta_opd/q3/kept_fraction"] == 1.0
    n_q3 = int(sel.normalized.q3.sum())
    with pytest.warns(UserWarning, match="shortfall"):
        big = select_positions(stats, valid, TAConfig(selector="q3_teachability", budget=1.0), step=0)
    assert int(big.mask.sum()) == n_q3
    assert big.metrics["ta_opd/budget/shortfall"] == B * T - n_q3


def test_metrics_names_and_kept_vs_dropped():
    gen = torch.Generator().manual_seed(2)
    stats = make_stats(torch.rand(3, 30, generator=gen), torch.rand(3, 30, generator=gen), torch.rand(3, 30, generator=gen))
    sel = select_positions(stats, torch.ones(3, 30, dtype=torch.bool), TAConfig(budget=0.1), step=0)
    m = sel.metrics
    for key in ("ta_opd/kept_ratio", "ta_opd/D/p05", "ta_opd/D/p95", "ta_opd/C/p50", "ta_opd/H/p50",
                "ta_opd/DL/kept_mean", "ta_opd/DL/dropped_mean", "ta_opd/DI/kept_mean", "ta_opd/q3/kept_fraction",
                "ta_opd/missing/fraction", "ta_opd/C_bound/max_width"):
        assert key in m
    assert m["ta_opd/DL/kept_mean"] > m["ta_opd/DL/dropped_mean"]  # teachability keeps high D^L


def test_selection_errors():
    stats = make_stats(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3))
    with pytest.raises(TAInputError, match="empty batch"):
        select_positions(stats, torch.zeros(2, 3, dtype=torch.bool), TAConfig(), 0)
    with pytest.raises(TAInputError, match="shape"):
        select_positions(stats, torch.ones(2, 4, dtype=torch.bool), TAConfig(), 0)
    bad = make_stats(torch.tensor([[0.1, float("nan"), 0.3]]), torch.rand(1, 3), torch.rand(1, 3))
    with pytest.raises(TAInputError, match="non-finite"):
        select_positions(bad, torch.ones(1, 3, dtype=torch.bool), TAConfig(), 0)
    with pytest.raises(TAInputError, match="step"):
        select_positions(stats, torch.ones(2, 3, dtype=torch.bool), TAConfig(), -1)


def _naive_select(scores, valid, n, cand=None, m=0):
    """Spec order by a plain Python sort: (score desc, position in response asc, sequence asc)."""
    entries = []
    for b in range(scores.shape[0]):
        pos = 0
        for t in range(scores.shape[1]):
            if valid[b, t]:
                if cand is None or cand[b, t]:
                    entries.append((-float(scores[b, t]), pos, b, t))
                pos += 1
    entries.sort()
    kept = {(b, t) for _, _, b, t in entries[:n]}
    for b in range(scores.shape[0]):
        row = [e for e in entries if e[2] == b][:m]
        kept |= {(e[2], e[3]) for e in row}
    return kept


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m", [0, 1, 3])
def test_budget_matches_naive_sort_with_heavy_ties(seed, m):
    gen = torch.Generator().manual_seed(seed)
    B, T = 7, 23
    scores = torch.randint(0, 4, (B, T), generator=gen).float() / 3  # four distinct values: many ties
    valid = torch.rand(B, T, generator=gen) > 0.3
    cand = (torch.rand(B, T, generator=gen) > 0.2) if seed % 2 else None
    for rho in (0.05, 0.2, 0.5, 1.0):
        n = budget_count(rho, int(valid.sum()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = select_budget(scores, valid, rho, candidates=cand, min_keep_per_sequence=m)
        got = {tuple(x) for x in res.mask.nonzero().tolist()}
        assert got == _naive_select(scores, valid, n, cand, m)


def test_q3_shared_medians_equal_direct_medians():
    gen = torch.Generator().manual_seed(8)
    B, T = 9, 31
    valid = torch.rand(B, T, generator=gen) > 0.25
    raw = [torch.randint(0, 6, (B, T), generator=gen).float() for _ in range(3)]  # ties and clipping
    norm = normalize_batch(*raw, valid, TAConfig())
    from ta_opd.selectors import q3_candidates
    assert torch.equal(norm.q3, q3_candidates(norm.H, norm.D, valid))


def test_kept_advantage_metrics_by_hand():
    """issue 11 §2: the share of negative PG-OPD advantages among kept vs all valid positions."""
    from ta_opd.metrics import kept_advantage_metrics

    adv = torch.tensor([[-2.0, 0.0, 3.0, -1.0], [-4.0, 5.0, -6.0, 9.0]])  # (B, T)
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])  # (2, 3) is padding
    mask = torch.tensor([[True, True, False, True], [True, False, False, True]])  # padding kept: ignored
    m = kept_advantage_metrics(adv, valid, mask)
    # kept & valid: -2, 0, -1, -4 -> 3 negative of 4 (0 is not negative); mean -7/4
    assert m["ta_opd/kept/neg_adv_fraction"] == pytest.approx(0.75)
    assert m["ta_opd/kept/adv_mean"] == pytest.approx(-1.75)
    # valid: -2, 0, 3, -1, -4, 5, -6 -> 4 of 7 negative
    assert m["ta_opd/valid/neg_adv_fraction"] == pytest.approx(4 / 7)
    empty = kept_advantage_metrics(adv, valid, torch.zeros_like(mask))
    assert math.isnan(empty["ta_opd/kept/neg_adv_fraction"]) and math.isnan(empty["ta_opd/kept/adv_mean"])
    with pytest.raises(TAInputError, match="same"):
        kept_advantage_metrics(adv[:, :3], valid, mask)
