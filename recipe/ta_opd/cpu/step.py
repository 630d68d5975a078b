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
without an edit to this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ta_opd.config import TAConfig
from ta_opd.losses import LossInputs, compute_loss, loss_needs
from ta_opd.rollout import Rollout, rollout_logits, token_logp
from ta_opd.select import Selection, select_positions
from ta_opd.stats import PositionStats, sparse_position_stats, student_topk
from ta_opd.teacher_outputs import TeacherOutputs, teacher_outputs


def response_logits(model, ro: Rollout, vocab_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """(B, R, V) logits that score each response token at ``temperature`` (> 0;
    ``ta_opd.rollout.rollout_logits``)."""
    return rollout_logits(model, ro, vocab_size, temperature)


@dataclass(frozen=True)
class ScoredBatch:
    old_logp: torch.Tensor  # (B, R) log π_old(y_t)
    teacher: TeacherOutputs  # (N, ...) at valid positions
    teacher_logp: torch.Tensor  # (B, R) log π_T(y_t), 0 at padding
    stats: PositionStats  # (B, R)
    selection: Selection


@torch.no_grad()
def score_batch(student, teacher, ro: Rollout, cfg: TAConfig, step: int, vocab_size: int | None = None,
                temperature: float = 1.0) -> ScoredBatch:
    """Old log-prob pass (the student's full logits at the rollout ``temperature``), teacher
    outputs (temperature 1), statistics, selection."""
    valid = ro.response_mask
    s_logits = response_logits(student, ro, vocab_size, temperature)  # (B, R, V): the one student forward of the step
    old_logp = token_logp(s_logits, ro.responses)
    t_logits = response_logits(teacher, ro, vocab_size)
    s_valid = s_logits[valid]  # (N, V)
    y = ro.responses[valid]
    # The student's top-K, once per position: the statistics reuse it, and with compatibility
    # "exact" the teacher also returns its log-probs at those ids.
    s_top = student_topk(s_valid, topk=cfg.topk, entropy=cfg.entropy, **cfg.stats_chunking())
    extra = s_top.ids if cfg.compatibility == "exact" else None
    tout = teacher_outputs(t_logits[valid], y, teacher_topk=cfg.teacher_topk, extra_ids=extra,
                           chunk_size=cfg.chunk_size)
    stats = sparse_position_stats(
        s_valid, tout.topk_ids, tout.topk_logp, topk=cfg.topk, teacher_extra_ids=extra,
        teacher_extra_logp=tout.extra_logp, sampled_ids=y, teacher_sampled_logp=tout.sampled_logp,
        teacher_entropy=tout.entropy, entropy=cfg.entropy, student=s_top, **cfg.stats_chunking(),
    ).scatter(valid)
    teacher_logp = torch.zeros_like(old_logp)
    teacher_logp[valid] = tout.sampled_logp
    sel = select_positions(stats, valid, cfg, step)
    return ScoredBatch(old_logp, tout, teacher_logp, stats, sel)


def loss_inputs(logits: torch.Tensor, ro: Rollout, scored: ScoredBatch, cfg: TAConfig) -> LossInputs:
    """The LossInputs fields the loss ``cfg.loss`` reads (``ta_opd.losses.loss_needs``), from
    the update's (B, R, V) logits; the others stay None and are never computed (pg_opd: no
    top-K gather, no (B, R, V) rest-mass pass).

    The student's log-probs at the teacher's top-K ids share the log-partition of the sampled
    token's log-prob, so they cost a (B, R, K) gather, never a (B, R, V) log-prob tensor."""
    valid = ro.response_mask
    lf = logits.float()

    @cache
    def lse() -> torch.Tensor:
        return torch.logsumexp(lf, dim=-1, keepdim=True)  # (B, R, 1)

    @cache
    def teacher_topk() -> tuple[torch.Tensor, torch.Tensor]:
        k = cfg.topk
        t_ids = torch.zeros(*valid.shape, k, dtype=torch.long)  # (B, R, K) teacher's top-K ids, 0 at padding
        t_lp = torch.zeros(*valid.shape, k)  # (B, R, K)
        t_ids[valid] = scored.teacher.topk_ids[:, :k].long()
        t_lp[valid] = scored.teacher.topk_logp[:, :k].float()
        return t_ids, t_lp

    available = {
        "log_prob": lambda: (lf.gather(-1, ro.responses.unsqueeze(-1)) - lse()).squeeze(-1),  # (B, R)
        "old_log_prob": lambda: scored.old_logp,
        "teacher_log_prob": lambda: scored.teacher_logp,
        "student_topk_logp": lambda: lf.gather(-1, teacher_topk()[0]) - lse(),  # (B, R, K)
        # (B, R) log-mass on every other id, exact (a logsumexp over the other logits; one (B, R, V) copy)
        "student_rest_logp": lambda: lf.scatter(-1, teacher_topk()[0], float("-inf")).logsumexp(-1) - lse().squeeze(-1),
        "teacher_topk_logp": lambda: teacher_topk()[1],
    }
    # a needed field this backend does not provide stays None; the loss says so by name
    return LossInputs(mask=scored.selection.mask & valid,  # (B, R) kept positions
                      **{name: available[name]() for name in loss_needs(cfg.loss) if name in available})


def update(student, optimizer, ro: Rollout, scored: ScoredBatch, cfg: TAConfig, grad_clip: float,
           vocab_size: int | None = None, temperature: float = 1.0) -> dict:
    """One optimizer step of the registered loss ``cfg.loss`` on the kept positions (Eq. 7),
    the student's log-probs at the rollout ``temperature`` (as in :func:`score_batch`)."""
    student.train()
    logits = response_logits(student, ro, vocab_size, temperature)
    out = compute_loss(cfg.loss, loss_inputs(logits, ro, scored, cfg), clip_low=cfg.clip_low,
                       clip_high=cfg.clip_high, loss_agg=cfg.loss_agg)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    optimizer.step()
    student.eval()
    return {**out.metrics, "actor/grad_norm": float(grad_norm)}
