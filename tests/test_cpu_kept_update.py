"""The CPU update on the kept rows (recipe.ta_opd.cpu.step.update, kept_rows=True) against the
full path (kept_rows=False: the (B, R, V) logits of every response position): same loss, same
gradient of every parameter, same metrics, at ρ 5 %, ρ 100 % and with nothing kept; and it
really runs fewer rows.

Tolerance: fp32 throughout. The trimmed forward runs attention over shorter rows and the LM head
on (n, H) instead of (B, R, H), so sums are taken in another order: gradients agree to
rtol 1e-4 / atol 1e-6 (observed on this case: max |Δgrad| 2.2e-8, at most 3.3e-6 of the
tensor's largest gradient), metrics to rtol 1e-5."""

import copy
import re
from dataclasses import replace

import pytest
import torch

from recipe.ta_opd.cpu.step import score_batch, update
from ta_opd import TAConfig
from ta_opd.errors import TAConfigError, TAInputError
from ta_opd.losses import available_losses
from ta_opd.rollout import Rollout, kept_rows_supported, rollout_logits, rollout_logits_at

VOCAB, PAD, EOS = 61, 0, 1
PROMPT_LENS = (3, 5, 2, 4, 5, 1, 4, 3)
RESPONSE_LENS = (20, 7, 13, 1, 16, 4, 20, 9)  # tokens up to and including EOS


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=PAD,
                      eos_token_id=EOS, bos_token_id=None, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()  # 3 logit padding rows beyond the tokenizer's VOCAB: sliced off


def _rollout(seed: int = 0) -> Rollout:
    """Left-padded prompts + right-padded responses, the layout ta_opd.rollout.generate returns."""
    g = torch.Generator().manual_seed(seed)
    B, P, R = len(PROMPT_LENS), max(PROMPT_LENS), max(RESPONSE_LENS)
    ids = torch.full((B, P + R), PAD, dtype=torch.long)
    att = torch.zeros((B, P + R), dtype=torch.long)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids[b, P - p:P] = torch.randint(2, VOCAB, (p,), generator=g)
        ids[b, P:P + r] = torch.randint(2, VOCAB, (r,), generator=g)
        ids[b, P + r - 1] = EOS
        att[b, P - p:P + r] = 1
    return Rollout(input_ids=ids, attention_mask=att, prompt_len=P, responses=ids[:, P:],
                   response_mask=att[:, P:].bool())


@pytest.fixture(scope="module")
def case():
    student, teacher, ro = _model(1), _model(2), _rollout()
    cfg = TAConfig(selector="teachability", topk=4, teacher_topk=8)
    return student, teacher, ro, cfg


def _scored(case, budget: float, loss: str, loss_agg: str, nothing_kept: bool = False):
    student, teacher, ro, cfg = case
    cfg = replace(cfg, budget=budget, loss=loss, loss_agg=loss_agg)
    scored = score_batch(student, teacher, ro, cfg, step=0, vocab_size=VOCAB, temperature=0.7)
    if nothing_kept:  # no selector keeps nothing (Eq. 13 keeps ⌈ρ|I|⌉ >= 1); a micro-batch can
        scored = replace(scored, selection=replace(scored.selection, mask=torch.zeros_like(scored.selection.mask)))
    return scored, cfg


def _step(student, ro, scored, cfg, kept_rows: bool, opt_cls=torch.optim.SGD, **kw):
    model = copy.deepcopy(student)
    opt = opt_cls(model.parameters(), lr=1e-3)
    m = update(model, opt, ro, scored, cfg, grad_clip=1e9, vocab_size=VOCAB, temperature=0.7, kept_rows=kept_rows,
               **kw)
    return model, m


def _assert_same_step(full, kept):
    (m_full, met_full), (m_kept, met_kept) = full, kept
    assert met_full.keys() == met_kept.keys()
    for k in met_full:
        assert met_kept[k] == pytest.approx(met_full[k], rel=1e-5, abs=1e-7), k
    for (name, p_full), p_kept in zip(m_full.named_parameters(), m_kept.parameters()):
        assert p_kept.grad is not None and p_full.grad is not None, name
        torch.testing.assert_close(p_kept.grad, p_full.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("budget", [0.05, 1.0])
@pytest.mark.parametrize("loss", available_losses())
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_kept_rows_update_equals_the_full_path(case, budget, loss, loss_agg):
    student, _, ro, _ = case
    scored, cfg = _scored(case, budget, loss, loss_agg)
    n_kept = int((scored.selection.mask & ro.response_mask).sum())
    assert n_kept == (int(ro.response_mask.sum()) if budget == 1.0 else 5)  # ⌈0.05 · 93⌉
    full, kept = _step(student, ro, scored, cfg, False), _step(student, ro, scored, cfg, True)
    assert full[1][f"ta_opd/loss/{loss}"] != 0.0
    _assert_same_step(full, kept)


@pytest.mark.parametrize("loss", ["pg_opd", "topk_forward_kl"])
def test_nothing_kept_steps_exactly_like_the_full_path(case, loss):
    """The full path backpropagates an exactly-zero loss: zero gradients, and AdamW still steps
    (moment decay, weight decay). The kept path runs no forward and takes that same step."""
    student, _, ro, _ = case
    warm, cfg = _scored(case, 0.05, loss, "token-mean")
    empty, _ = _scored(case, 0.05, loss, "token-mean", nothing_kept=True)
    model = copy.deepcopy(student)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    update(model, opt, ro, warm, cfg, grad_clip=1.0, vocab_size=VOCAB, temperature=0.7, kept_rows=False)  # Adam state
    runs = []
    for kept_rows in (False, True):
        m = copy.deepcopy(model)
        o = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: the step updates the moments in place
        calls = []
        hook = m.get_decoder().register_forward_hook(lambda *a: calls.append(1))
        metrics = update(m, o, ro, empty, cfg, grad_clip=1.0, vocab_size=VOCAB, temperature=0.7, kept_rows=kept_rows)
        hook.remove()
        runs.append((m, metrics, len(calls)))
    (m_full, met_full, fwd_full), (m_kept, met_kept, fwd_kept) = runs
    assert fwd_full == 1 and fwd_kept == 0  # no forward at all on the kept path
    assert met_kept == met_full and met_full["actor/grad_norm"] == 0.0 and met_full[f"ta_opd/loss/{loss}"] == 0.0
    moved = False
    for (name, p_full), p_kept, p_before in zip(m_full.named_parameters(), m_kept.parameters(), model.parameters()):
        assert torch.equal(p_kept.grad, p_full.grad) and not bool(p_full.grad.any()), name
        assert torch.equal(p_kept, p_full), name  # bit-identical AdamW step
        moved |= not torch.equal(p_full, p_before)
    assert moved  # the zero-gradient step is not a no-op: skipping it would be caught


def test_kept_rows_drop_sequences_and_cut_the_batch(case):
    """The trimmed forward: a sequence with no kept position is not run, the batch ends at the last
    kept column, the LM head sees only the kept rows; its logits equal the full forward's."""
    student, _, ro, _ = case
    rows = torch.zeros_like(ro.response_mask)
    rows[0, 3] = rows[2, 5] = rows[4, 9] = True  # rows 1, 3, 5, 6, 7 keep nothing; last kept column 9
    shapes = {}
    hooks = [student.get_decoder().register_forward_hook(lambda mod, a, kw, out: shapes.update(dec=kw["input_ids"].shape),
                                                         with_kwargs=True),
             student.get_output_embeddings().register_forward_hook(lambda mod, a, out: shapes.update(head=a[0].shape))]
    try:
        with torch.no_grad():
            got = rollout_logits_at(student, ro, rows, vocab_size=VOCAB, temperature=0.7)
    finally:
        for h in hooks:
            h.remove()
    # response token 9 is scored by the logits at column P - 1 + 9: the forward needs columns 0 .. P + 8
    assert shapes["dec"] == (3, ro.prompt_len + 9) and shapes["head"] == (3, 32)
    with torch.no_grad():
        want = rollout_logits(student, ro, vocab_size=VOCAB, temperature=0.7)[rows]
    assert got.shape == (3, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert rollout_logits_at(student, ro, torch.zeros_like(rows), vocab_size=VOCAB).shape == (0, VOCAB)


def test_gradient_checkpointing_gives_the_same_step_and_is_switched_back_off(case):
    student, _, ro, _ = case
    scored, cfg = _scored(case, 0.05, "pg_opd", "token-mean")
    plain = _step(student, ro, scored, cfg, True)
    ckpt = _step(student, ro, scored, cfg, True, gradient_checkpointing=True)
    _assert_same_step(plain, ckpt)
    assert not ckpt[0].is_gradient_checkpointing


def test_models_that_post_process_logits_use_the_full_path(case):
    student, _, ro, _ = case
    capped = copy.deepcopy(student)
    capped.config.final_logit_softcapping = 30.0
    assert kept_rows_supported(student) and not kept_rows_supported(capped)
    with pytest.raises(TAInputError, match="post-processes its logits"):
        rollout_logits_at(capped, ro, ro.response_mask)


def test_rows_must_be_a_bool_grid_of_response_positions(case):
    student, _, ro, _ = case
    with pytest.raises(TAInputError, match=r"rows must be a \(B, R\) = \(8, 20\) bool tensor"):
        rollout_logits_at(student, ro, ro.response_mask.long())
    with pytest.raises(TAInputError, match=r"rows must be a \(B, R\)"):
        rollout_logits_at(student, ro, ro.response_mask[:, :5])


def test_the_cpu_run_honours_verls_gradient_checkpointing_key():
    """``actor_rollout_ref.model.enable_gradient_checkpointing`` (verl's key, true in the composed
    default as in the paper settings) reaches the CPU update; a non-boolean is refused by name."""
    from recipe.ta_opd.cpu.plan import read
    from tests.cli_inprocess import config

    key = "actor_rollout_ref.model.enable_gradient_checkpointing"
    assert read(config(["trainer.experiment_name=t"]))["gradient_checkpointing"] is True
    assert read(config(["trainer.experiment_name=t", f"{key}=false"]))["gradient_checkpointing"] is False
    with pytest.raises(TAConfigError, match=rf"^{re.escape(key)}='yes' is not allowed"):
        read(config(["trainer.experiment_name=t", f"{key}=yes"]))
