"""Per-position statistics: hand-computed case, naive-loop agreement, identities, bad input."""

import math

import numpy as np
import pytest
import torch

from ta_opd import TAInputError, dense_position_stats, sparse_position_stats
from tests.naive_reference import position_stats as naive_stats

# Hand case, V = 6, K = 2 (worked out on paper; see docs/decisions.md).
P_S = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]  # S_S = {0, 1}
P_T = [0.1, 0.4, 0.3, 0.1, 0.05, 0.05]  # S_T = {1, 2}; U = {0, 1, 2}
# p̄_T^U = [.125, .5, .375], p̄_S^U = [.625, .25, .125]
D_HAND = 0.125 * math.log(0.2) + 0.5 * math.log(2) + 0.375 * math.log(3)  # 0.5573735...
C_HAND = 0.1 + 0.4  # teacher mass on S_S
C_HAT_HAND = 0.4  # teacher mass on S_S ∩ S_T = {1}
H_HAND = -(0.5 * math.log(0.5) + 0.2 * math.log(0.2) + 2 * 0.1 * math.log(0.1) + 2 * 0.05 * math.log(0.05))


def _logp(p):
    return torch.tensor(p, dtype=torch.float64).log().float().unsqueeze(0)


def test_hand_case_dense():
    st = dense_position_stats(_logp(P_S), _logp(P_T), topk=2, sampled_ids=torch.tensor([2]))
    assert D_HAND == pytest.approx(0.5573735, abs=1e-6)
    assert H_HAND == pytest.approx(1.4285514, abs=1e-6)
    assert st.D.item() == pytest.approx(D_HAND, abs=1e-6)
    assert st.C.item() == pytest.approx(C_HAND, abs=1e-6)
    assert st.C_hat.item() == pytest.approx(C_HAT_HAND, abs=1e-6)
    assert st.H.item() == pytest.approx(H_HAND, abs=1e-6)
    assert st.sampled_kl.item() == pytest.approx(math.log(0.1 / 0.3), abs=1e-6)
    assert st.student_topk_ids.tolist() == [[0, 1]]
    assert st.teacher_topk_ids.tolist() == [[1, 2]]
    assert st.missing.item() == 0 and st.C_low.item() == st.C_high.item() == st.C.item()


def test_hand_case_sparse_missing_id_bounds():
    # Teacher ships only its top-2 (K' = 2): id 0 of S_S is missing. Its true p_T(0) = 0.1 lies in
    # [0, min(p_T^(K'), R)] = [0, min(0.3, 0.3)]; point value R / (V - K') = 0.3 / 4.
    t = _logp(P_T)[0]
    ids = torch.tensor([[1, 2]])
    st = sparse_position_stats(_logp(P_S), ids, t[ids[0]].unsqueeze(0), topk=2)
    assert st.missing.item() == 1
    assert st.C_low.item() == pytest.approx(0.4, abs=1e-6)
    assert st.C.item() == pytest.approx(0.4 + 0.3 / 4, abs=1e-6)
    assert st.C_high.item() == pytest.approx(0.4 + 0.3, abs=1e-6)
    assert st.C_low.item() <= C_HAND <= st.C_high.item()
    assert st.C_hat.item() == pytest.approx(C_HAT_HAND, abs=1e-6)
    assert st.D_spread.item() > 0
    # With the teacher's log-prob at the student's top-K shipped as extras, everything is exact.
    ex = sparse_position_stats(_logp(P_S), ids, t[ids[0]].unsqueeze(0), topk=2,
                               teacher_extra_ids=torch.tensor([[0, 1]]), teacher_extra_logp=t[[0, 1]].unsqueeze(0))
    assert ex.missing.item() == 0
    assert ex.D.item() == pytest.approx(D_HAND, abs=1e-6)
    assert ex.C.item() == pytest.approx(C_HAND, abs=1e-6)
    assert ex.D_spread.item() == 0


def _distinct_logits(n, v, gen, scale=1.0 / 16):
    # distinct values exactly representable in bf16/fp16 (integers <= 256 times 2^-4): no top-K ties
    rows = [torch.randperm(v, generator=gen).float() * scale - 4 for _ in range(n)]
    return torch.stack(rows)


SHAPES = [(1, 3, 1), (7, 6, 2), (13, 50, 5), (9, 64, 63), (5, 200, 16), (3, 257, 128)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# distinct low-precision logits (no top-K ties) need V <= 256
CASES = [(s, d) for s in SHAPES for d in DTYPES if d in (torch.float32, torch.float64) or s[1] <= 256]


@pytest.mark.parametrize("shape,dtype", CASES)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_dense_matches_naive_loop(shape, dtype, chunk):
    n, v, k = shape
    gen = torch.Generator().manual_seed(n * 1000 + v + k)
    if dtype in (torch.bfloat16, torch.float16):
        s, t = _distinct_logits(n, v, gen).to(dtype), _distinct_logits(n, v, gen, scale=1.0 / 8).to(dtype)
    else:
        s = (torch.randn(n, v, generator=gen) * 3).to(dtype)
        t = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    st = dense_position_stats(s, t, topk=k, sampled_ids=y, chunk_size=chunk)
    for i in range(n):
        ref = naive_stats(s[i].double().numpy(), t[i].double().numpy(), k, sampled=int(y[i]))
        for name, val in ref.items():
            got = getattr(st, name)[i].item()
            assert got == pytest.approx(val, rel=2e-4, abs=2e-5), (name, i)


@pytest.mark.parametrize("k", [1, 2, 7])
def test_topk_entropy_matches_naive(k):
    gen = torch.Generator().manual_seed(k)
    s, t = torch.randn(6, 40, generator=gen) * 2, torch.randn(6, 40, generator=gen) * 2
    if k == 1:
        with pytest.raises(TAInputError, match="topk >= 2"):
            dense_position_stats(s, t, topk=k, entropy="topk")
        return
    st = dense_position_stats(s, t, topk=k, entropy="topk")
    for i in range(6):
        ref = naive_stats(s[i].double().numpy(), t[i].double().numpy(), k, entropy="topk")
        assert st.H[i].item() == pytest.approx(ref["H"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("k,kp", [(2, 2), (4, 10), (16, 64), (30, 31)])
def test_sparse_agrees_with_dense(k, kp):
    gen = torch.Generator().manual_seed(k + kp)
    b, t_len, v = 3, 5, 80
    s = torch.randn(b, t_len, v, generator=gen) * 3
    t = torch.randn(b, t_len, v, generator=gen) * 3
    y = torch.randint(0, v, (b, t_len), generator=gen)
    dense = dense_position_stats(s, t, topk=k, sampled_ids=y)
    t_logp = torch.log_softmax(t, -1)
    tk_logp, tk_ids = t_logp.topk(kp, dim=-1)
    sp = sparse_position_stats(s, tk_ids, tk_logp, topk=k, sampled_ids=y,
                               teacher_sampled_logp=t_logp.gather(-1, y.unsqueeze(-1)).squeeze(-1),
                               teacher_entropy=dense.teacher_H, chunk_size=4)
    # quantities that never need a missing teacher probability are exact
    for name in ("H", "C_hat", "sampled_kl", "teacher_H"):
        torch.testing.assert_close(getattr(sp, name), getattr(dense, name), rtol=1e-5, atol=1e-6)
    assert torch.equal(sp.student_topk_ids, dense.student_topk_ids)
    assert torch.equal(sp.teacher_topk_ids, dense.teacher_topk_ids)
    # C: exact where nothing is missing, bracketed otherwise
    exact = sp.missing == 0
    torch.testing.assert_close(sp.C[exact], dense.C[exact], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sp.D[exact], dense.D[exact], rtol=1e-5, atol=1e-6)
    assert bool((sp.C_low <= dense.C + 1e-6).all()) and bool((dense.C <= sp.C_high + 1e-6).all())
    # shipping the teacher log-probs at the student's top-K makes everything exact
    s_ids = dense.student_topk_ids
    ex = sparse_position_stats(s, tk_ids, tk_logp, topk=k, teacher_extra_ids=s_ids,
                               teacher_extra_logp=t_logp.gather(-1, s_ids))
    assert int(ex.missing.sum()) == 0
    for name in ("D", "C", "C_hat", "H"):
        torch.testing.assert_close(getattr(ex, name), getattr(dense, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ex.C_high, ex.C_low)


def test_identities():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(40, 30, generator=gen) * 3
    t = torch.randn(40, 30, generator=gen) * 3
    st = dense_position_stats(s, t, topk=5)
    assert bool((st.C_hat <= st.C + 1e-7).all())
    assert bool((st.D >= -1e-6).all())
    # S_S ⊆ S_T (here equal): C == Ĉ
    same_support = dense_position_stats(s, s * 1.5, topk=5)
    torch.testing.assert_close(same_support.C, same_support.C_hat)
    # distributions agree on U (teacher differs only off the shared top-K): D == 0
    top = s.topk(5, dim=-1).indices
    off = torch.ones_like(s, dtype=torch.bool).scatter(-1, top, False)
    t2 = torch.where(off, s - 3.0, s)
    agree = dense_position_stats(s, t2, topk=5)
    torch.testing.assert_close(agree.D, torch.zeros(40), atol=1e-6, rtol=0)
    assert bool((agree.C > dense_position_stats(s, s, topk=5).C).all())  # teacher mass moved onto S_S


def test_masked_vocab_logits_are_handled():
    s = torch.randn(4, 20)
    s[:, 15:] = float("-inf")  # e.g. padded vocabulary rows
    t = torch.randn(4, 20)
    st = dense_position_stats(s, t, topk=3)
    for i in range(4):
        ref = naive_stats(s[i].double().numpy(), t[i].double().numpy(), 3)
        for name in ("H", "C", "C_hat", "D"):
            assert getattr(st, name)[i].item() == pytest.approx(ref[name], rel=1e-5), name


def test_bad_inputs_raise():
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(TAInputError, match="shape"):
        dense_position_stats(s, torch.randn(3, 11), topk=2)
    with pytest.raises(TAInputError, match="topk=10"):
        dense_position_stats(s, t, topk=10)
    with pytest.raises(TAInputError, match="topk=0"):
        dense_position_stats(s, t, topk=0)
    with pytest.raises(TAInputError, match="empty batch"):
        dense_position_stats(torch.randn(0, 10), torch.randn(0, 10), topk=2)
    bad = s.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(TAInputError, match="position 1"):
        dense_position_stats(bad, t, topk=2)
    with pytest.raises(TAInputError, match="position 1"):
        dense_position_stats(s, bad, topk=2)
    with pytest.raises(TAInputError, match="outside the vocabulary"):
        dense_position_stats(s, t, topk=2, sampled_ids=torch.tensor([0, 1, 10]))
    tl, ti = torch.log_softmax(t, -1).topk(4)
    shifted = t.topk(4).values - t.max(-1, keepdim=True).values  # <= 0, but logits, not log-probs
    with pytest.raises(TAInputError, match="not logits"):
        sparse_position_stats(s, ti, shifted, topk=2)
    with pytest.raises(TAInputError, match="none > 0"):
        sparse_position_stats(s, ti, tl + 5, topk=2)
    with pytest.raises(TAInputError, match="K' width 1"):
        sparse_position_stats(s, ti[:, :1], tl[:, :1], topk=2)
    with pytest.raises(TAInputError, match="outside the vocabulary"):
        sparse_position_stats(s, ti + 100, tl, topk=2)
    with pytest.raises(TAInputError, match="together"):
        sparse_position_stats(s, ti, tl, topk=2, sampled_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TAInputError, match="leading shape"):
        sparse_position_stats(s, ti[:2], tl[:2], topk=2)
    with pytest.raises(TAInputError, match="integer tensor"):
        sparse_position_stats(s, ti.float(), tl, topk=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_rows_score_a_packed_tensor_in_place(dtype):
    """rows= (the verl hook's path: packed logits with prompt rows and logit padding columns)
    gives exactly the statistics of the selected rows passed on their own."""
    g = torch.Generator().manual_seed(3)
    V, rows_total = 40, 23
    packed = (torch.randn(1, rows_total, V + 6, generator=g) * 3).to(dtype)  # 6 padding columns
    rows = torch.tensor([2, 3, 4, 9, 10, 17, 18, 19, 20])
    t_logits = torch.randn(rows.numel(), V, generator=g) * 3
    t_logp = torch.log_softmax(t_logits, -1).topk(12, dim=-1)
    kw = dict(topk=4, chunk_size=4)
    got = sparse_position_stats(packed[0, :, :V], t_logp.indices, t_logp.values, rows=rows, **kw)
    want = sparse_position_stats(packed[0, rows, :V].contiguous(), t_logp.indices, t_logp.values, **kw)
    for name in got.SCALARS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    with pytest.raises(TAInputError, match=r"rows must index the 23 positions of student_logits; got range \[2, 23\]"):
        sparse_position_stats(packed[0, :, :V], t_logp.indices, t_logp.values, rows=rows.clamp(min=2) + rows.eq(20) * 3, **kw)
