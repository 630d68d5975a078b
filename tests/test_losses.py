"""Losses (Eqs. 6-7): hand values, masks, gradients, aggregation, top-K KL."""

import math

import pytest
import torch

from ta_opd import LossInputs, TAConfigError, TAInputError, aggregate, available_losses, compute_loss, register_loss
from ta_opd.losses import INPUT_FIELDS, _LOSSES, loss_needs, topk_kl_per_token, topk_logp_and_rest


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


def _topk_case(seed=1, B=2, T=3, V=40, K=4):
    """Random student logits (B, T, V) and a teacher's top-K ids/log-probs from random logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen).requires_grad_(True)
    t_full = torch.log_softmax(2 * torch.randn(B, T, V, generator=gen), -1)
    t_lp, ids = t_full.topk(K, dim=-1)
    return logits, ids, t_lp


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_kl_matches_naive_k_plus_1_bins(reverse):
    logits, ids, t = _topk_case()
    mask = torch.tensor([[True, False, True], [True, True, True]])
    s, s_rest = topk_logp_and_rest(logits, ids)
    name = "topk_reverse_kl" if reverse else "topk_forward_kl"
    out = compute_loss(name, LossInputs(mask=mask, student_topk_logp=s, student_rest_logp=s_rest, teacher_topk_logp=t))
    vals = []
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            q_all = torch.softmax(logits[b, i].double(), -1).tolist()
            q = [q_all[j] for j in ids[b, i].tolist()]
            p = [math.exp(x) for x in t[b, i].tolist()]
            q.append(1 - sum(q))  # the rest bins
            p.append(1 - sum(p))
            a, c = (q, p) if reverse else (p, q)
            vals.append(sum(x * math.log(x / y) for x, y in zip(a, c)))
    assert out.loss.item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)
    assert all(v > 0 for v in vals)
    out.loss.backward()
    assert bool((logits.grad[~mask] == 0).all())
    assert out.metrics["ta_opd/loss/student_topk_mass"] == pytest.approx(
        float(torch.softmax(logits.detach(), -1).gather(-1, ids).sum(-1)[mask].mean()), rel=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_kl_is_zero_iff_the_bins_match(reverse):
    # student = teacher on the K bins and the rest (however the rest is spread): KL 0, gradient 0
    logits, ids, _ = _topk_case()
    t = torch.log_softmax(logits.detach(), -1).gather(-1, ids)
    s, s_rest = topk_logp_and_rest(logits, ids)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = compute_loss("topk_reverse_kl" if reverse else "topk_forward_kl",
                       LossInputs(mask=mask, student_topk_logp=s, student_rest_logp=s_rest, teacher_topk_logp=t))
    assert abs(out.loss.item()) < 1e-6
    out.loss.backward()
    assert float(logits.grad.abs().max()) < 1e-6


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_step_pulls_mass_into_the_teachers_support(reverse):
    """One gradient step on a student with more mass outside the teacher's top-K than the teacher
    raises its total mass on the top-K, and pushes EVERY logit outside the support down. The
    old renormalized form gave those logits exactly zero gradient; on this case (student and
    teacher proportional on the support) it was 0 with zero gradient, so the mass never moved."""
    V, K = 50, 4
    z = torch.zeros(1, 1, V)
    z[..., :K] = torch.tensor([2.0, 1.0, 0.5, 0.0])  # student: ~26 % of its mass on the support
    t_lp = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0]), -1).view(1, 1, K) + math.log(0.98)  # teacher: 98 %
    ids = torch.arange(K).view(1, 1, K)
    logits = z.clone().requires_grad_(True)
    s, s_rest = topk_logp_and_rest(logits, ids)
    out = compute_loss("topk_reverse_kl" if reverse else "topk_forward_kl",
                       LossInputs(mask=torch.ones(1, 1, dtype=torch.bool), student_topk_logp=s,
                                  student_rest_logp=s_rest, teacher_topk_logp=t_lp))
    out.loss.backward()
    assert bool((logits.grad[..., K:] > 0).all())  # descent lowers every logit outside the support
    mass = lambda x: float(torch.softmax(x, -1)[..., :K].sum())  # noqa: E731
    stepped = z - 1.0 * logits.grad
    assert mass(stepped) > mass(z) + 0.05
    # the renormalized form this replaces: no gradient outside the support, loss 0 here
    renorm = torch.log_softmax(topk_logp_and_rest(logits, ids)[0], -1)
    kl_renorm = (renorm.exp() * (renorm - torch.log_softmax(t_lp, -1))).sum()
    g, = torch.autograd.grad(kl_renorm, logits)
    assert float(g.abs().max()) < 1e-6


def test_forward_topk_kl_equals_verl_convention_plus_the_rest_bin():
    # Σ_k p_k log(p_k / q_k) with q the full-vocabulary probabilities (verl's forward_kl_topk,
    # unclamped) + r_T log(r_T / r_S): the two coincide where the teacher's top-K holds all its mass
    logits, ids, t = _topk_case(seed=3)
    s, s_rest = topk_logp_and_rest(logits, ids)
    per_token = topk_kl_per_token(s, s_rest, t, reverse=False)
    verl_form = (t.exp() * (t - s)).sum(-1)
    r_t = 1 - t.exp().sum(-1)
    torch.testing.assert_close(per_token, verl_form + r_t * (torch.log(r_t) - s_rest), atol=1e-5, rtol=1e-5)


def test_topk_rest_is_exact_when_the_support_holds_almost_all_mass():
    logits = torch.tensor([[30.0, 0.0, 0.0, -5.0]])
    s, rest = topk_logp_and_rest(logits, torch.tensor([[0]]))
    want = torch.logsumexp(logits[0, 1:].double(), -1) - torch.logsumexp(logits[0].double(), -1)
    assert float(rest) == pytest.approx(float(want), rel=1e-6)  # ~ -30, where 1 - Σ q rounds to 0 in fp32
    assert float(1 - s.exp().sum()) == 0.0


def _kept_inputs():
    mask = torch.tensor([[True, False, True]])
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    return mask, old, torch.tensor([[-1.5, -1.0, -0.5]])


@pytest.mark.parametrize("field", ["log_prob", "old_log_prob", "teacher_log_prob"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_pg_opd_refuses_non_finite_inputs_at_kept_positions(field, bad):
    mask, old, teacher = _kept_inputs()
    vals = {"log_prob": old.clone(), "old_log_prob": old.clone(), "teacher_log_prob": teacher.clone()}
    vals[field][0, 2] = bad
    with pytest.raises(TAInputError, match=rf"{field} is {bad} at kept position \(row 0, response position 2\)"):
        compute_loss("pg_opd", LossInputs(mask=mask, **vals))
    vals[field][0, 2] = -1.0
    vals[field][0, 1] = bad  # masked position: ignored, loss finite
    assert math.isfinite(compute_loss("pg_opd", LossInputs(mask=mask, **vals)).loss.item())


def test_topk_kl_refuses_a_nan_teacher_value_at_a_kept_position():
    logits, ids, t = _topk_case()
    s, s_rest = topk_logp_and_rest(logits, ids)
    mask = torch.ones(2, 3, dtype=torch.bool)
    t_bad = t.clone()
    t_bad[1, 2, 3] = float("nan")
    with pytest.raises(TAInputError, match=r"teacher_topk_logp is .*nan.* at kept position \(row 1, response position 2\)"):
        compute_loss("topk_forward_kl", LossInputs(mask=mask, student_topk_logp=s, student_rest_logp=s_rest,
                                                   teacher_topk_logp=t_bad))
    mask[1, 2] = False  # the same NaN at a masked position is never read
    out = compute_loss("topk_forward_kl", LossInputs(mask=mask, student_topk_logp=s, student_rest_logp=s_rest,
                                                     teacher_topk_logp=t_bad))
    assert math.isfinite(out.loss.item())


def test_topk_kl_input_errors():
    logits, ids, t = _topk_case()
    s, s_rest = topk_logp_and_rest(logits, ids)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TAInputError, match="student_rest_logp.*topk_logp_and_rest"):
        compute_loss("topk_forward_kl", LossInputs(mask=mask, student_topk_logp=s, teacher_topk_logp=t))
    with pytest.raises(TAInputError, match=r"teacher_topk_logp at kept position \(row 0, response position 0\) sums to probability 1\.\d+ > 1"):
        compute_loss("topk_forward_kl", LossInputs(mask=mask, student_topk_logp=s, student_rest_logp=s_rest,
                                                   teacher_topk_logp=t + math.log(2.0)))
    # a teacher id with probability exactly 0 (-inf) is a valid input: it contributes 0 (0 log 0)
    t0 = t.clone()
    t0[..., -1] = float("-inf")
    out = compute_loss("topk_forward_kl", LossInputs(mask=mask, student_topk_logp=s, student_rest_logp=s_rest,
                                                     teacher_topk_logp=t0))
    assert math.isfinite(out.loss.item())
    # reverse: the student has mass where the teacher has none -> infinite KL, refused by name
    with pytest.raises(TAInputError, match="top-K KL"):
        compute_loss("topk_reverse_kl", LossInputs(mask=mask, student_topk_logp=s, student_rest_logp=s_rest,
                                                   teacher_topk_logp=t0))


def test_reverse_topk_kl_is_finite_when_the_teachers_top_k_holds_all_its_mass():
    # a confident teacher: its top-K mass rounds to 1 in fp32 -> rest floored at K·eps, not log 0
    logits, ids, _ = _topk_case()
    t = torch.log_softmax(torch.tensor([40.0, 0.0, -1.0, -2.0]), -1).expand(2, 3, 4).contiguous()
    assert float(1 - t.exp().sum(-1).max()) <= 0
    s, s_rest = topk_logp_and_rest(logits, ids)
    out = compute_loss("topk_reverse_kl", LossInputs(mask=torch.ones(2, 3, dtype=torch.bool), student_topk_logp=s,
                                                     student_rest_logp=s_rest, teacher_topk_logp=t))
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and bool(torch.isfinite(logits.grad).all())


def test_loss_input_errors():
    with pytest.raises(TAInputError, match="needs teacher_log_prob"):
        compute_loss("pg_opd", LossInputs(mask=torch.ones(1, 2, dtype=torch.bool), log_prob=torch.zeros(1, 2),
                                          old_log_prob=torch.zeros(1, 2)))
    with pytest.raises(TAInputError, match=r"\(B, R\)"):
        compute_loss("pg_opd", LossInputs(mask=torch.ones(1, 2, dtype=torch.bool), log_prob=torch.zeros(1, 2),
                                          old_log_prob=torch.zeros(1, 3), teacher_log_prob=torch.zeros(1, 2)))
    with pytest.raises(TAInputError, match="mask"):
        compute_loss("pg_opd", LossInputs(mask=torch.ones(1, 3, dtype=torch.bool), log_prob=torch.zeros(1, 2),
                                          old_log_prob=torch.zeros(1, 2), teacher_log_prob=torch.zeros(1, 2)))


# ----------------------------------------------------------------------------- declared inputs


def _every_field(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A valid value for every LossInputs field but mask, (B, T) = mask's shape."""
    B, T = mask.shape
    logits, ids, t_lp = _topk_case(B=B, T=T)
    s, s_rest = topk_logp_and_rest(logits, ids)
    pg = _inputs(mask, B=B, T=T)
    return {"log_prob": pg.log_prob, "old_log_prob": pg.old_log_prob, "teacher_log_prob": pg.teacher_log_prob,
            "student_topk_logp": s, "student_rest_logp": s_rest, "teacher_topk_logp": t_lp}


def test_built_in_losses_declare_their_inputs():
    assert loss_needs("pg_opd") == ("log_prob", "old_log_prob", "teacher_log_prob")
    for name in ("topk_forward_kl", "topk_reverse_kl"):
        assert loss_needs(name) == ("student_topk_logp", "student_rest_logp", "teacher_topk_logp")
    with pytest.raises(TAConfigError, match="loss='pg' is unknown; valid losses: pg_opd"):
        loss_needs("pg")


@pytest.mark.parametrize("loss", available_losses())
def test_each_loss_declares_exactly_the_fields_it_reads(loss):
    mask = torch.tensor([[True, False, True], [True, True, False]])
    every = _every_field(mask)
    assert set(every) == set(INPUT_FIELDS)
    needs = loss_needs(loss)
    # only the declared fields (every other one None): runs, so it reads nothing undeclared
    out = compute_loss(loss, LossInputs(mask=mask, **{f: every[f] for f in needs}))
    assert math.isfinite(out.loss.item())
    # any one declared field missing: refused by name, so every declared field is read
    for missing in needs:
        with pytest.raises(TAInputError, match=missing):
            compute_loss(loss, LossInputs(mask=mask, **{f: every[f] for f in needs if f != missing}))


def test_register_loss_checks_the_declared_fields():
    with pytest.raises(TAConfigError, match="needs names 'logits', which is not a LossInputs field; valid fields: "
                                            "log_prob, old_log_prob, teacher_log_prob, student_topk_logp"):
        register_loss("test_only_bad_needs", needs=("log_prob", "logits"))(lambda *a, **k: None)
    with pytest.raises(TAConfigError, match="needs must be a tuple of LossInputs field names"):
        register_loss("test_only_bad_needs", needs="log_prob")(lambda *a, **k: None)
    assert "test_only_bad_needs" not in available_losses()  # a refused declaration registers nothing
    try:
        register_loss("test_only_mask_dup", needs=("mask", "log_prob", "log_prob"))(lambda *a, **k: None)
        register_loss("test_only_undeclared")(lambda *a, **k: None)
        assert loss_needs("test_only_mask_dup") == ("log_prob",)  # mask is implied
        assert loss_needs("test_only_undeclared") == INPUT_FIELDS  # no declaration: every field
    finally:
        for name in ("test_only_mask_dup", "test_only_undeclared"):
            _LOSSES._items.pop(name, None)


@pytest.fixture(scope="module")
def cpu_step_case():
    """A tiny student, a rollout at temperature 0.6, and its scored batch (CPU backend)."""
    from recipe.ta_opd.cpu.step import score_batch
    from ta_opd import TAConfig
    from ta_opd.rollout import encode_prompt, generate
    from ta_opd.tools.toy.models import STUDENT_ARCH, build_model
    from ta_opd.tools.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    student, teacher = build_model(tok, STUDENT_ARCH, seed=3), build_model(tok, STUDENT_ARCH, seed=4)
    student.eval()
    prompts = [encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("1+2", "34+67", "5+5")]
    ro = generate(student, prompts, max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  temperature=0.6, generator=torch.Generator().manual_seed(0))
    cfg = TAConfig(selector="full", topk=4, teacher_topk=8)
    return student, ro, score_batch(student, teacher, ro, cfg, step=0, temperature=0.6), cfg


@pytest.mark.parametrize("loss", available_losses())
def test_cpu_loss_inputs_compute_only_the_declared_fields(cpu_step_case, loss, monkeypatch):
    """The CPU update builds only what the loss reads (pg_opd: no top-K gather, no rest-mass
    pass), with the same loss value and gradient as building every field."""
    from dataclasses import replace

    from recipe.ta_opd.cpu import step

    student, ro, scored, cfg = cpu_step_case
    cfg = replace(cfg, loss=loss)

    def run():
        student.zero_grad(set_to_none=True)
        inp = step.loss_inputs(step.response_logits(student, ro, temperature=0.6), ro, scored, cfg)
        out = compute_loss(loss, inp, clip_low=cfg.clip_low, clip_high=cfg.clip_high, loss_agg=cfg.loss_agg)
        out.loss.backward()
        return inp, out.loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    lazy, lazy_loss, lazy_grads = run()
    assert [f for f in INPUT_FIELDS if getattr(lazy, f) is not None] == [f for f in INPUT_FIELDS if f in loss_needs(loss)]
    if loss == "pg_opd":
        assert lazy.student_rest_logp is None and lazy.student_topk_logp is None
    with monkeypatch.context() as m:
        m.setattr(step, "loss_needs", lambda name: INPUT_FIELDS)
        full, full_loss, full_grads = run()
    assert all(getattr(full, f) is not None for f in INPUT_FIELDS)
    assert lazy_loss.item() != 0.0 and torch.equal(lazy_loss, full_loss)
    assert len(lazy_grads) == len(full_grads) > 0 and any(bool(g.abs().max() > 0) for g in lazy_grads)
    for a, b in zip(lazy_grads, full_grads):
        assert torch.equal(a, b)
