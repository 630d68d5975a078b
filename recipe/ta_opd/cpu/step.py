"""One TA-OPD step's tensor work on CPU: teacher outputs, statistics, selection, update.

Logits are aligned to response tokens by ``ta_opd.rollout`` (the logits at position P - 1 + t
score response token t).

Temperature, as on verl: the student's distribution everywhere in the step (old log-probs,
statistics, selection, loss) is softmax(logits / T) at the rollout temperature T, the
distribution the rollouts were sampled from (verl's actor divides its logits by
``rollout.temperature`` before log-probs and before our statistics hook); the teacher is scored
at temperature 1 (verl's teacher path does the same). Training needs T > 0 (refused before step 1).

The update builds the fields of ``ta_opd.losses.LossInputs`` the loss declares it reads
(``ta_opd.losses.loss_needs``; all it can provide for a loss that declares none) and dispatches
by name through the loss registry, so a newly registered loss that reads those fields runs here
without an edit to this file. It computes the student's logits only where the loss reads them,
the kept positions (:func:`kept_loss_inputs`; docs/budget.md): same loss and gradient as the
full (B, R, V) path, which stays available (``update(..., kept_rows=False)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ta_opd.config import TAConfig
from ta_opd.losses import LossInputs, compute_loss, loss_needs
from ta_opd.rollout import Rollout, kept_rows_supported, rollout_logits, rollout_logits_at
from ta_opd.select import Selection, select_positions
from ta_opd.stats import PositionStats, sparse_position_stats, student_topk
from ta_opd.teacher_outputs import TeacherOutputs, teacher_outputs


def response_logits(model, ro: Rollout, vocab_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """(B, R, V) logits that score each response token at ``temperature`` (> 0;
    ``ta_opd.rollout.rollout_logits``)."""
    return rollout_logits(model, ro, vocab_size, temperature)


@dataclass(frozen=True)
class ScoredBatch:
    old_logp: torch.Tensor  # (B, R) log π_old(y_t), 0 at padding
    teacher: TeacherOutputs  # (N, ...) at valid positions
    teacher_logp: torch.Tensor  # (B, R) log π_T(y_t), 0 at padding
    stats: PositionStats  # (B, R)
    selection: Selection


@torch.no_grad()
def score_batch(student, teacher, ro: Rollout, cfg: TAConfig, step: int, vocab_size: int | None = None,
                temperature: float = 1.0) -> ScoredBatch:
    """Old log-prob pass (the student's full logits at the rollout ``temperature``), teacher
    outputs (temperature 1), statistics, selection. The student's (B, R, V) logits are swept
    once (``ta_opd.stats.student_topk``): H, top-K and log Z come from that pass, and the old
    log-probs are logit - log Z (no second logsumexp over V, no (N, V) copy of the valid rows)."""
    valid = ro.response_mask
    s_logits = response_logits(student, ro, vocab_size, temperature)  # (B, R, V): the one student forward of the step
    s_flat = s_logits.reshape(-1, s_logits.shape[-1])  # (B·R, V), a view: scored in place, no (N, V) copy
    rows = valid.flatten().nonzero().squeeze(-1)  # (N,) valid positions of s_flat
    y = ro.responses[valid]  # (N,)
    # The one sweep over the student's logits: top-K, entropy and log Z per valid position. The
    # statistics reuse it, the old log-probs are logit - log Z from it, and with compatibility
    # "exact" the teacher also returns its log-probs at the student's top-K ids.
    s_top = student_topk(s_flat, topk=cfg.topk, entropy=cfg.entropy, rows=rows, **cfg.stats_chunking())
    old_logp = torch.zeros(valid.shape)  # (B, R), 0 at padding
    old_logp[valid] = s_flat[rows, y].float() - s_top.log_z
    t_logits = response_logits(teacher, ro, vocab_size)
    extra = s_top.ids if cfg.compatibility == "exact" else None
    tout = teacher_outputs(t_logits[valid], y, teacher_topk=cfg.teacher_topk, extra_ids=extra,
                           chunk_size=cfg.chunk_size)
    stats = sparse_position_stats(
        s_flat, tout.topk_ids, tout.topk_logp, topk=cfg.topk, teacher_extra_ids=extra,
        teacher_extra_logp=tout.extra_logp, sampled_ids=y, teacher_sampled_logp=tout.sampled_logp,
        teacher_entropy=tout.entropy, entropy=cfg.entropy, rows=rows, student=s_top, **cfg.stats_chunking(),
    ).scatter(valid)
    teacher_logp = torch.zeros_like(old_logp)
    teacher_logp[valid] = tout.sampled_logp
    sel = select_positions(stats, valid, cfg, step)
    return ScoredBatch(old_logp, tout, teacher_logp, stats, sel)


def _student_fields(logits: torch.Tensor, tokens: torch.Tensor, teacher_topk, names) -> dict[str, torch.Tensor]:
    """The LossInputs fields among ``names`` that come from the student's logits (..., V) at
    positions with sampled tokens ``tokens`` (...); ``teacher_topk()`` gives the teacher's top-K
    ids (..., K) and log-probs, computed only if a field reads them.

    The student's log-probs at the teacher's top-K ids share the log-partition of the sampled
    token's log-prob, so they cost a (..., K) gather, never a (..., V) log-prob tensor."""
    lf = logits.float()

    @cache
    def lse() -> torch.Tensor:
        return torch.logsumexp(lf, dim=-1, keepdim=True)  # (..., 1)

    available = {
        "log_prob": lambda: (lf.gather(-1, tokens.unsqueeze(-1)) - lse()).squeeze(-1),  # (...)
        "student_topk_logp": lambda: lf.gather(-1, teacher_topk()[0]) - lse(),  # (..., K)
        # (...) log-mass on every other id, exact (a logsumexp over the other logits; one (..., V) copy)
        "student_rest_logp": lambda: lf.scatter(-1, teacher_topk()[0], float("-inf")).logsumexp(-1) - lse().squeeze(-1),
        "teacher_topk_logp": lambda: teacher_topk()[1],
    }
    return {name: available[name]() for name in names if name in available}


def _scored_fields(scored: ScoredBatch, names) -> dict[str, torch.Tensor]:
    """The (B, R) LossInputs fields the scoring pass already holds."""
    available = {"old_log_prob": scored.old_logp, "teacher_log_prob": scored.teacher_logp}
    return {name: available[name] for name in names if name in available}


def loss_inputs(logits: torch.Tensor, ro: Rollout, scored: ScoredBatch, cfg: TAConfig) -> LossInputs:
    """The LossInputs fields the loss ``cfg.loss`` reads (``ta_opd.losses.loss_needs``), from
    the (B, R, V) logits of every response position (the full path); the others stay None and are
    never computed (pg_opd: no top-K gather, no (B, R, V) rest-mass pass)."""
    valid = ro.response_mask
    names = loss_needs(cfg.loss)

    @cache
    def teacher_topk() -> tuple[torch.Tensor, torch.Tensor]:
        k = cfg.topk
        t_ids = torch.zeros(*valid.shape, k, dtype=torch.long)  # (B, R, K) teacher's top-K ids, 0 at padding
        t_lp = torch.zeros(*valid.shape, k)  # (B, R, K)
        t_ids[valid] = scored.teacher.topk_ids[:, :k].long()
        t_lp[valid] = scored.teacher.topk_logp[:, :k].float()
        return t_ids, t_lp

    # a needed field this backend does not provide stays None; the loss says so by name
    return LossInputs(mask=scored.selection.mask & valid,  # (B, R) kept positions
                      **_student_fields(logits, ro.responses, teacher_topk, names), **_scored_fields(scored, names))


def kept_loss_inputs(student, ro: Rollout, scored: ScoredBatch, cfg: TAConfig, vocab_size: int | None = None,
                     temperature: float = 1.0) -> LossInputs:
    """:func:`loss_inputs` with the student's logits computed at the kept positions only
    (``ta_opd.rollout.rollout_logits_at``: rows with nothing kept dropped, the batch cut after
    the last kept column, the LM head and log-softmax on the n kept rows). The fields are computed
    at the n kept positions and placed in the (B, R) / (B, R, K) grid (0 elsewhere, never read:
    the loss is masked), so every ``loss_agg`` mode sees the per-sequence structure it had."""
    valid, kept = ro.response_mask, scored.selection.mask & ro.response_mask  # (B, R)
    names = loss_needs(cfg.loss)
    logits = rollout_logits_at(student, ro, kept, vocab_size, temperature)  # (n, V)
    at = kept.nonzero(as_tuple=True)  # (n,) row, (n,) response position
    valid_rank = (valid.flatten().long().cumsum(0) - 1).view_as(valid)  # (B, R) index into the (N, ...) teacher fields
    t_rows = valid_rank[at]  # (n,)

    @cache
    def teacher_topk() -> tuple[torch.Tensor, torch.Tensor]:
        k = cfg.topk
        return scored.teacher.topk_ids[t_rows, :k].long(), scored.teacher.topk_logp[t_rows, :k].float()  # (n, K)

    def grid(v: torch.Tensor) -> torch.Tensor:  # (n, ...) -> (B, R, ...), differentiable, 0 off the kept positions
        return v.new_zeros((*kept.shape, *v.shape[1:])).index_put(at, v)

    fields = {name: grid(v) for name, v in _student_fields(logits, ro.responses[at], teacher_topk, names).items()}
    return LossInputs(mask=kept, **fields, **_scored_fields(scored, names))


def update(student, optimizer, ro: Rollout, scored: ScoredBatch, cfg: TAConfig, grad_clip: float,
           vocab_size: int | None = None, temperature: float = 1.0, *, kept_rows: bool = True,
           gradient_checkpointing: bool = False) -> dict:
    """One optimizer step of the registered loss ``cfg.loss`` on the kept positions (Eq. 7),
    the student's log-probs at the rollout ``temperature`` (as in :func:`score_batch`).

    ``kept_rows`` (default): the student's logits only where the loss reads them
    (:func:`kept_loss_inputs`); same loss, gradient and metrics as the full path (``False``: the
    (B, R, V) logits of every response position; also used for a model whose LM head
    post-processes its logits, ``ta_opd.rollout.kept_rows_supported``). With nothing kept in
    the batch no forward runs, and the step is the one the full path takes then: its masked loss
    is exactly 0, so every parameter gets an all-zero gradient and the optimizer still steps
    (AdamW: moment decay, weight decay, step count). ``gradient_checkpointing``: Hugging Face's
    activation checkpointing (non-reentrant) during this step, as the paper's settings run the
    actor (``actor_rollout_ref.model.enable_gradient_checkpointing``)."""
    was_checkpointing = student.is_gradient_checkpointing
    if gradient_checkpointing and not was_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    try:
        if kept_rows and kept_rows_supported(student):
            inputs = kept_loss_inputs(student, ro, scored, cfg, vocab_size, temperature)
        else:
            inputs = loss_inputs(response_logits(student, ro, vocab_size, temperature), ro, scored, cfg)
        out = compute_loss(cfg.loss, inputs, clip_low=cfg.clip_low, clip_high=cfg.clip_high, loss_agg=cfg.loss_agg)
        optimizer.zero_grad(set_to_none=True)
        if out.loss.requires_grad:
            out.loss.backward()
        else:  # nothing kept, no forward: the zero gradients the full path's backward of a 0 loss gives
            for p in student.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        optimizer.step()
    finally:
        student.eval()
        if gradient_checkpointing and not was_checkpointing:
            student.gradient_checkpointing_disable()
    return {**out.metrics, "actor/grad_norm": float(grad_norm)}
