"""One TA-OPD step's tensor work on CPU: aligned logits, teacher outputs, statistics, update.

Alignment: a rollout row is [left-padded prompt (P) | response (R)]; the logits at position
P - 1 + t score response token t, so response logits are ``logits[:, P-1 : P-1+R]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ta_opd.config import TAConfig
from ta_opd.losses import LossInputs, compute_loss
from ta_opd.select import Selection, select_positions
from ta_opd.stats import PositionStats, sparse_position_stats
from ta_opd.teacher_outputs import TeacherOutputs, teacher_outputs
from ta_opd.toy.generate import Rollout
from ta_opd.toy.generate import response_logits as lm_response_logits


def response_logits(model, ro: Rollout, vocab_size: int | None = None) -> torch.Tensor:
    """(B, R, V) logits that score each response token (see module docstring), sliced to the
    tokenizer's vocabulary when the model has padding rows (e.g. 152,064 logits for 151,936 tokens)."""
    logits = lm_response_logits(model, ro.input_ids, ro.attention_mask, ro.prompt_len, ro.responses.shape[1])
    return logits if vocab_size is None else logits[..., :vocab_size]


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, fp32, without a (B, R, V) log-prob tensor. -> (B, R)"""
    lf = logits.float()
    return lf.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lf, dim=-1)


@dataclass(frozen=True)
class ScoredBatch:
    old_logp: torch.Tensor  # (B, R) log π_old(y_t)
    teacher: TeacherOutputs  # (N, ...) at valid positions
    teacher_logp: torch.Tensor  # (B, R) log π_T(y_t), 0 at padding
    stats: PositionStats  # (B, R)
    selection: Selection


@torch.no_grad()
def score_batch(student, teacher, ro: Rollout, cfg: TAConfig, step: int, vocab_size: int | None = None) -> ScoredBatch:
    """Old log-prob pass (the student's full logits), teacher outputs, statistics, selection."""
    valid = ro.response_mask
    s_logits = response_logits(student, ro, vocab_size)  # (B, R, V): the one student forward of the step
    old_logp = token_logp(s_logits, ro.responses)
    t_logits = response_logits(teacher, ro, vocab_size)
    s_valid = s_logits[valid]  # (N, V)
    y = ro.responses[valid]
    # With compatibility "exact" the teacher also returns its log-probs at the student's top-K.
    extra = s_valid.topk(cfg.topk, dim=-1).indices if cfg.compatibility == "exact" else None
    tout = teacher_outputs(t_logits[valid], y, topk=cfg.teacher_topk, extra_ids=extra, chunk_size=cfg.chunk_size)
    stats = sparse_position_stats(
        s_valid, tout.topk_ids, tout.topk_logp, topk=cfg.topk, teacher_extra_ids=extra,
        teacher_extra_logp=tout.extra_logp, sampled_ids=y, teacher_sampled_logp=tout.sampled_logp,
        teacher_entropy=tout.entropy, entropy=cfg.entropy, chunk_size=cfg.chunk_size,
    ).scatter(valid)
    teacher_logp = torch.zeros_like(old_logp)
    teacher_logp[valid] = tout.sampled_logp
    sel = select_positions(stats, valid, cfg, step)
    return ScoredBatch(old_logp, tout, teacher_logp, stats, sel)


def update(student, optimizer, ro: Rollout, scored: ScoredBatch, cfg: TAConfig, grad_clip: float,
           vocab_size: int | None = None) -> dict:
    """One optimizer step of the registered loss on the kept positions (Eq. 7)."""
    student.train()
    logits = response_logits(student, ro, vocab_size)
    mask = scored.selection.mask & ro.response_mask
    if cfg.loss == "pg_opd":
        inp = LossInputs(mask=mask, log_prob=token_logp(logits, ro.responses), old_log_prob=scored.old_logp,
                         teacher_log_prob=scored.teacher_logp)
    else:  # top-K distribution losses on the teacher's top-K support
        valid = ro.response_mask
        k = cfg.topk
        t_ids = torch.zeros(*valid.shape, k, dtype=torch.long)
        t_lp = torch.zeros(*valid.shape, k)
        t_ids[valid] = scored.teacher.topk_ids[:, :k].long()
        t_lp[valid] = scored.teacher.topk_logp[:, :k].float()
        s_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, t_ids)
        inp = LossInputs(mask=mask, student_topk_logp=s_lp, teacher_topk_logp=t_lp)
    out = compute_loss(cfg.loss, inp, clip_low=cfg.clip_low, clip_high=cfg.clip_high, loss_agg=cfg.loss_agg)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    optimizer.step()
    student.eval()
    return {**out.metrics, "actor/grad_norm": float(grad_norm)}
