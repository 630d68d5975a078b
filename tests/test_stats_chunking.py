"""Adaptive chunking, the reused student top-K, the top-K-only entry point and the kernels
behind them (issue 12): results independent of the chunk size, bit for bit."""

import math

import numpy as np
import pytest
import torch

from ta_opd import TAConfig, TAConfigError, TAInputError, dense_position_stats, sparse_position_stats
from ta_opd import support
from ta_opd.stats import student_topk, topk_position_stats
from tests.naive_reference import position_stats as naive_stats

FIELDS = ("D", "C", "C_low", "C_high", "C_hat", "H", "D_spread", "missing", "student_topk_ids",
          "teacher_topk_ids", "teacher_H", "sampled_kl")


@pytest.fixture
def one_thread():
    """Reductions may split a row across threads; bit-for-bit claims are for one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _assert_identical(a, b):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


def _inputs(dtype, n=37, v=96, kp=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    t_logp = torch.log_softmax(t.float(), -1)
    tk_lp, tk_ids = t_logp.topk(kp, dim=-1)
    return s, t, y, t_logp, tk_ids, tk_lp


CHUNKINGS = [dict(chunk_size=1), dict(chunk_size=5), dict(chunk_size=1000), dict(),
             dict(chunk_bytes=4 * 96 * 5 * 3)]  # the last: 3 rows per chunk from the byte budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_independent_of_chunking(one_thread, dtype):
    s, t, y, *_ = _inputs(dtype)
    ref = dense_position_stats(s, t, topk=4, sampled_ids=y, chunk_size=1)
    for kw in CHUNKINGS:
        _assert_identical(dense_position_stats(s, t, topk=4, sampled_ids=y, **kw), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_independent_of_chunking(one_thread, dtype):
    s, _, y, t_logp, tk_ids, tk_lp = _inputs(dtype)
    kw = dict(topk=4, sampled_ids=y, teacher_sampled_logp=t_logp.gather(-1, y[:, None])[:, 0])
    ref = sparse_position_stats(s, tk_ids, tk_lp, chunk_size=1, **kw)
    assert int(ref.missing.sum()) > 0  # the interval code runs too
    for ch in CHUNKINGS:
        _assert_identical(sparse_position_stats(s, tk_ids, tk_lp, **ch, **kw), ref)
    # a student top-K computed beforehand (e.g. for the teacher's extra ids) gives the same result
    pre = student_topk(s, topk=4, chunk_size=3)
    _assert_identical(sparse_position_stats(s, tk_ids, tk_lp, student=pre, **kw), ref)
    with pytest.raises(TAInputError, match="entropy='full'"):
        sparse_position_stats(s, tk_ids, tk_lp, student=pre, topk=4, entropy="topk")
    with pytest.raises(TAInputError, match=r"expected \(37, 5\)"):
        sparse_position_stats(s, tk_ids, tk_lp, student=pre, topk=5)


def test_chunking_options_are_validated():
    s, t, *_ = _inputs(torch.float32, n=3)
    with pytest.raises(TAInputError, match="chunk_size=0"):
        dense_position_stats(s, t, topk=2, chunk_size=0)
    with pytest.raises(TAInputError, match="chunk_bytes=0"):
        dense_position_stats(s, t, topk=2, chunk_bytes=0)
    with pytest.raises(TAConfigError, match="chunk_bytes=-1"):
        TAConfig(chunk_bytes=-1)
    assert TAConfig().stats_chunking() == {"chunk_size": None, "chunk_bytes": 64 << 20}
    assert TAConfig(chunk_size=8, chunk_bytes=None).stats_chunking() == {"chunk_size": 8}


def test_chunk_rows_from_budget():
    # about a million elements per buffer, within the byte budget, at least one row
    assert support.chunk_rows(10**6, 128, chunk_size=None, chunk_bytes=1 << 40, n_buffers=4) == 8192
    assert support.chunk_rows(10**6, 151936, chunk_size=None, chunk_bytes=64 << 20, n_buffers=4) == 6
    assert support.chunk_rows(10**6, 151936, chunk_size=None, chunk_bytes=1, n_buffers=4) == 1
    assert support.chunk_rows(3, 128, chunk_size=None, chunk_bytes=1 << 30, n_buffers=4) == 3
    assert support.chunk_rows(100, 128, chunk_size=8, chunk_bytes=1, n_buffers=4) == 8


def test_topk_rows_orders_ties_by_lower_id():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 12, (300, 64), generator=g).float()  # many ties, also at the cut (V <= 2,048: numpy path)
    x[:100] = torch.randn(100, 64, generator=g)  # and rows without ties
    vals, ids = support.topk_rows(x, 9)
    want = np.argsort(-x.numpy(), axis=-1, kind="stable")[:, :9]  # (value desc, id asc)
    assert torch.equal(ids, torch.from_numpy(want))
    assert torch.equal(vals, x.gather(-1, ids))
    assert torch.equal(vals, x.topk(9, dim=-1).values)


@pytest.mark.parametrize("vocab", [9000, 20011])  # the shortlist path; 20,011: trailing ids
def test_grouped_topk_values_exact(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 40, (6, vocab), generator=g).float()  # ties everywhere
    x[0] = torch.randn(vocab, generator=g)
    x[1, -3] = 100.0  # the maximum among the trailing ids
    vals, ids = support.topk_rows(x, 16)
    assert torch.equal(vals, x.topk(16, dim=-1).values)
    assert torch.equal(x.gather(-1, ids), vals)
    assert all(len(set(r)) == 16 for r in ids.tolist())
    assert ids[1, 0].item() == vocab - 3


@pytest.mark.parametrize("kind", ["dense", "sorted"])
def test_lookup_matches_a_loop(kind):
    g = torch.Generator().manual_seed(2)
    for vocab, width in ((20, 8), (500, 8)):  # table reset by fill and by undoing the writes
        pool = torch.randint(0, vocab, (50, width), generator=g)  # duplicates included
        vals = torch.randn(50, width, generator=g)
        ids = torch.randint(0, vocab, (50, 5), generator=g)
        table = support.DenseLookup(7, vocab, torch.device("cpu")) if kind == "dense" else support.SortedLookup()
        got, known = table.lookup(ids, pool, vals)
        member = table.member(ids, pool)
        for i in range(50):
            for j in range(5):
                slots = [p for p in range(width) if pool[i, p] == ids[i, j]]
                assert bool(known[i, j]) == bool(slots) == bool(member[i, j])
                if slots:
                    assert got[i, j] == vals[i, slots[-1]]  # the last slot wins
        if kind == "dense":
            assert bool(torch.isnan(table.table).all())  # left clean for the next call


# ----------------------------------------------------------------- topk_position_stats

P_S = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]
P_T = [0.1, 0.4, 0.3, 0.1, 0.05, 0.05]


def _lp(p, ids):
    return torch.tensor([p[i] for i in ids], dtype=torch.float64).log().float().unsqueeze(0)


def test_topk_entry_hand_case_with_missing_student_prob():
    # Student ships its top-2 {0, 1}; the teacher its top-2 {1, 2} plus its log-prob at id 0.
    # The student probability at teacher id 2 is unknown: point value R_S / (V - K_s) = 0.3 / 4.
    h = -sum(p * math.log(p) for p in P_S)
    st = topk_position_stats(torch.tensor([[0, 1]]), _lp(P_S, [0, 1]), torch.tensor([[1, 2]]), _lp(P_T, [1, 2]),
                             topk=2, vocab_size=6, student_entropy=torch.tensor([h]),
                             teacher_extra_ids=torch.tensor([[0]]), teacher_extra_logp=_lp(P_T, [0]))
    pt, ps = np.array([0.1, 0.4, 0.3]), np.array([0.5, 0.2, 0.3 / 4])
    pt, ps = pt / pt.sum(), ps / ps.sum()
    assert st.D.item() == pytest.approx(float((pt * np.log(pt / ps)).sum()), abs=1e-6)
    assert st.C.item() == pytest.approx(0.5, abs=1e-6) and st.missing.item() == 0
    assert st.C_hat.item() == pytest.approx(0.4, abs=1e-6)
    assert st.H.item() == pytest.approx(h, abs=1e-6)
    assert st.student_missing.item() == 1
    assert st.D_spread.item() == math.inf  # the student may put no mass on id 2
    # shipping the student's log-prob at id 2 makes D exact
    ex = topk_position_stats(torch.tensor([[0, 1]]), _lp(P_S, [0, 1]), torch.tensor([[1, 2]]), _lp(P_T, [1, 2]),
                             topk=2, vocab_size=6, student_entropy=torch.tensor([h]),
                             teacher_extra_ids=torch.tensor([[0]]), teacher_extra_logp=_lp(P_T, [0]),
                             student_extra_ids=torch.tensor([[2]]), student_extra_logp=_lp(P_S, [2]))
    ref = naive_stats(np.log(P_S), np.log(P_T), 2)
    assert ex.D.item() == pytest.approx(ref["D"], abs=1e-6)
    assert ex.student_missing.item() == 0 and ex.D_spread.item() == 0


@pytest.mark.parametrize("k,ks,kp,v", [(2, 2, 2, 80), (4, 9, 10, 80), (16, 16, 64, 80),
                                       (4, 6, 8, 3000)])  # the last: lookups by sorting, not by a table
def test_topk_entry_agrees_with_dense(k, ks, kp, v):
    g = torch.Generator().manual_seed(k)
    n = 11
    s, t = torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3
    y = torch.randint(0, v, (n,), generator=g)
    dense = dense_position_stats(s, t, topk=k, sampled_ids=y)
    s_lp, t_lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    sk_lp, sk_ids = s_lp.topk(ks, dim=-1)
    tk_lp, tk_ids = t_lp.topk(kp, dim=-1)
    kw = dict(topk=k, vocab_size=v, student_entropy=dense.H, teacher_entropy=dense.teacher_H,
              student_sampled_logp=s_lp.gather(-1, y[:, None])[:, 0], teacher_sampled_logp=t_lp.gather(-1, y[:, None])[:, 0])
    st = topk_position_stats(sk_ids, sk_lp, tk_ids, tk_lp, **kw)
    for name in ("H", "C_hat", "sampled_kl", "teacher_H"):
        torch.testing.assert_close(getattr(st, name), getattr(dense, name), rtol=1e-5, atol=1e-6)
    assert torch.equal(st.student_topk_ids, dense.student_topk_ids)
    assert torch.equal(st.teacher_topk_ids, dense.teacher_topk_ids)
    assert bool((st.C_low <= dense.C + 1e-6).all()) and bool((dense.C <= st.C_high + 1e-6).all())
    exact = (st.missing == 0) & (st.student_missing == 0)
    torch.testing.assert_close(st.D[exact], dense.D[exact], rtol=1e-5, atol=1e-6)
    # both sides' log-probs at the other's top-K: everything exact
    t_ids = dense.teacher_topk_ids
    ex = topk_position_stats(sk_ids, sk_lp, tk_ids, tk_lp, teacher_extra_ids=dense.student_topk_ids,
                             teacher_extra_logp=t_lp.gather(-1, dense.student_topk_ids), student_extra_ids=t_ids,
                             student_extra_logp=s_lp.gather(-1, t_ids), **kw)
    assert int(ex.missing.sum()) == 0 and int(ex.student_missing.sum()) == 0
    for name in ("D", "C", "C_hat", "H"):
        torch.testing.assert_close(getattr(ex, name), getattr(dense, name), rtol=1e-5, atol=1e-6)
    # the "topk" entropy is computed from S_S
    tk = topk_position_stats(sk_ids, sk_lp, tk_ids, tk_lp, topk=k, vocab_size=v, entropy="topk") if k >= 2 else None
    if tk is not None:
        torch.testing.assert_close(tk.H, dense_position_stats(s, t, topk=k, entropy="topk").H, rtol=1e-5, atol=1e-6)


def test_topk_entry_bad_inputs():
    ids, lp = torch.tensor([[0, 1]]), _lp(P_S, [0, 1])
    h = torch.tensor([1.0])
    with pytest.raises(TAInputError, match="needs student_entropy"):
        topk_position_stats(ids, lp, ids, lp, topk=2, vocab_size=6)
    with pytest.raises(TAInputError, match="student_entropy must be None"):
        topk_position_stats(ids, lp, ids, lp, topk=2, vocab_size=6, entropy="topk", student_entropy=h)
    with pytest.raises(TAInputError, match="student top-K_s width 2"):
        topk_position_stats(ids, lp, ids, lp, topk=3, vocab_size=6, student_entropy=h)
    with pytest.raises(TAInputError, match="vocab_size=1"):
        topk_position_stats(ids, lp, ids, lp, topk=1, vocab_size=1, student_entropy=h)
    with pytest.raises(TAInputError, match="outside the vocabulary"):
        topk_position_stats(ids + 5, lp, ids, lp, topk=2, vocab_size=6, student_entropy=h)
    with pytest.raises(TAInputError, match="not logits"):
        topk_position_stats(ids, lp + 0.5, ids, lp, topk=2, vocab_size=6, student_entropy=h)


def test_sparse_union_with_tied_logits_matches_dense():
    """Integer student logits: many ties with the K-th largest one, where S_T ∩ S_S must be
    read from the ids, not from the logit comparison alone (teacher logits distinct)."""
    g = torch.Generator().manual_seed(4)
    s = torch.randint(0, 6, (40, 30), generator=g).float()
    t = torch.randn(40, 30, generator=g) * 2
    t[:, :15] += s[:, :15]  # teacher top ids overlap the student's tied ones
    dense = dense_position_stats(s, t, topk=5)
    t_lp = torch.log_softmax(t, -1)
    tk_lp, tk_ids = t_lp.topk(30, dim=-1)
    sp = sparse_position_stats(s, tk_ids, tk_lp, topk=5)
    assert torch.equal(sp.student_topk_ids, dense.student_topk_ids)
    assert torch.equal(sp.teacher_topk_ids, dense.teacher_topk_ids)
    tau = s.gather(-1, sp.student_topk_ids[:, -1:])  # the K-th largest student logit
    assert bool((s.gather(-1, sp.teacher_topk_ids) == tau).any())  # S_T ids tied with it occur
    for name in ("C", "C_hat", "D"):
        torch.testing.assert_close(getattr(sp, name), getattr(dense, name), rtol=1e-5, atol=1e-6)
