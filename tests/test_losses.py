"""Losses (Eqs. 6-7): hand values, masks, gradients, aggregation, top-K KL."""

import math

import pytest
import torch

from ta_opd import LossInputs, TAConfigError, TAInputError, aggregate, available_losses, compute_loss, register_loss


def _inputs(mask, seed=0, B=3, T=5):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=gen) - 2
    logp = (old + 0.3 * torch.randn(B, T, generator=gen)).requires_grad_(True)
    teacher = torch.randn(B, T, generator=gen) - 2
    return LossInputs(mask=mask, log_prob=logp, old_log_prob=old, teacher_log_prob=teacher)


def test_registry():
    assert set(available_losses()) >= {"pg_opd", "topk_forward_kl", "topk_reverse_kl"}
    with pytest.raises(TAConfigError, match="valid losses: pg_opd"):
        compute_loss("pg", _inputs(torch.ones(3, 5, dtype=torch.bool)))
    with pytest.raises(TAConfigError, match="already registered"):
        register_loss("pg_opd")(lambda *a, **k: None)


def test_pg_opd_hand_value_on_policy():
    # on-policy (log π_θ = log π_old): ratio 1, loss_t = -A_t = log π_old - log π_T; Eq. 7 mean over kept
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    out = compute_loss("pg_opd", LossInputs(mask=mask, log_prob=old.clone().requires_grad_(True),
                                            old_log_prob=old, teacher_log_prob=teacher))
    assert out.loss.item() == pytest.approx(((-1.0 + 1.5) + (-2.0 + 1.0)) / 2)
    assert out.metrics["ta_opd/loss/sampled_kl"] == pytest.approx(-0.25)


def test_pg_opd_clipping_hand_value():
    # A = -(old - teacher) = +1 > 0: ratio e^{0.5} is clipped to 1.28 -> loss -1.28 (no gradient)
    old, teacher = torch.tensor([[-2.0]]), torch.tensor([[-1.0]])
    logp = torch.tensor([[-1.5]], requires_grad=True)
    out = compute_loss("pg_opd", LossInputs(mask=torch.ones(1, 1, dtype=torch.bool), log_prob=logp,
                                            old_log_prob=old, teacher_log_prob=teacher))
    assert out.loss.item() == pytest.approx(-1.28)
    out.loss.backward()
    assert logp.grad.item() == 0.0
    assert out.metrics["ta_opd/loss/clipfrac"] == 1.0
    # A < 0 and ratio below 1 - 0.2: clipped at 0.8
    logp2 = torch.tensor([[-2.5]], requires_grad=True)
    out2 = compute_loss("pg_opd", LossInputs(mask=torch.ones(1, 1, dtype=torch.bool), log_prob=logp2,
                                             old_log_prob=old, teacher_log_prob=torch.tensor([[-3.0]])))
    assert out2.loss.item() == pytest.approx(1.0 * 0.8)


def test_all_ones_mask_equals_unmasked_loss():
    inp = _inputs(torch.ones(3, 5, dtype=torch.bool))
    out = compute_loss("pg_opd", inp)
    adv = -(inp.old_log_prob - inp.teacher_log_prob)
    ratio = torch.exp(inp.log_prob - inp.old_log_prob)
    unmasked = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)).mean()
    assert out.loss.item() == pytest.approx(unmasked.item(), rel=1e-6)


def test_all_zero_mask_zero_loss_and_gradient():
    inp = _inputs(torch.zeros(3, 5, dtype=torch.bool))
    for agg in ("token-mean", "seq-mean-token-mean"):
        out = compute_loss("pg_opd", inp, loss_agg=agg)
        assert out.loss.item() == 0.0
        inp.log_prob.grad = None
        out.loss.backward()
        assert torch.equal(inp.log_prob.grad, torch.zeros(3, 5))


def test_gradient_zero_on_unkept_positions_even_with_extreme_values():
    mask = torch.tensor([[True, False, True, False, False]] * 3)
    inp = _inputs(mask)
    with torch.no_grad():
        inp.log_prob[mask] = inp.old_log_prob[mask]  # on-policy at kept positions: ratio 1, never clipped
        inp.log_prob[~mask] = 80.0  # would overflow exp() if it leaked into the ratio
    out = compute_loss("pg_opd", inp)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert bool((inp.log_prob.grad[~mask] == 0).all())
    assert bool((inp.log_prob.grad[mask] != 0).all())


def test_denominator_and_seq_mean_token_mean():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate(loss_mat, mask).item() == pytest.approx(7 / 3)
    assert aggregate(loss_mat, mask, denominator=7).item() == pytest.approx(1.0)
    assert aggregate(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    with pytest.raises(TAConfigError, match="loss_agg"):
        aggregate(loss_mat, mask, "sum")
    # two micro-batches with a global denominator add up to the whole-batch Eq. 7 loss
    halves = aggregate(loss_mat[:1], mask[:1], denominator=3) + aggregate(loss_mat[1:], mask[1:], denominator=3)
    assert halves.item() == pytest.approx(aggregate(loss_mat, mask).item())


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_kl_matches_naive(reverse):
    gen = torch.Generator().manual_seed(1)
    s = torch.log_softmax(torch.randn(2, 3, 40, generator=gen), -1)[..., :4].clone().requires_grad_(True)
    t = torch.log_softmax(torch.randn(2, 3, 40, generator=gen), -1)[..., :4]
    mask = torch.tensor([[True, False, True], [True, True, True]])
    name = "topk_reverse_kl" if reverse else "topk_forward_kl"
    out = compute_loss(name, LossInputs(mask=mask, student_topk_logp=s, teacher_topk_logp=t))
    vals = []
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            ps = [math.exp(x) for x in s[b, i].tolist()]
            pt = [math.exp(x) for x in t[b, i].tolist()]
            ps = [x / sum(ps) for x in ps]
            pt = [x / sum(pt) for x in pt]
            p, q = (ps, pt) if reverse else (pt, ps)
            vals.append(sum(a * math.log(a / c) for a, c in zip(p, q)))
    assert out.loss.item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)
    out.loss.backward()
    assert bool((s.grad[~mask] == 0).all())


def test_loss_input_errors():
    with pytest.raises(TAInputError, match="needs teacher_log_prob"):
        compute_loss("pg_opd", LossInputs(mask=torch.ones(1, 2, dtype=torch.bool), log_prob=torch.zeros(1, 2),
                                          old_log_prob=torch.zeros(1, 2)))
    with pytest.raises(TAInputError, match=r"\(B, T\)"):
        compute_loss("pg_opd", LossInputs(mask=torch.ones(1, 2, dtype=torch.bool), log_prob=torch.zeros(1, 2),
                                          old_log_prob=torch.zeros(1, 3), teacher_log_prob=torch.zeros(1, 2)))
    with pytest.raises(TAInputError, match="mask"):
        compute_loss("pg_opd", LossInputs(mask=torch.ones(1, 3, dtype=torch.bool), log_prob=torch.zeros(1, 2),
                                          old_log_prob=torch.zeros(1, 2), teacher_log_prob=torch.zeros(1, 2)))
