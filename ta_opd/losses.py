"""Losses on the kept positions (spec: "Loss"; paper Eqs. 6-7), behind a name registry.

Default ``pg_opd``: sampled-token OPD as a policy gradient. Advantage
A_t = -(log π_old(y_t) - log π_T(y_t)) (no reward model, no normalization), PPO-clipped ratio
r_t = π_θ(y_t)/π_old(y_t) in [1 - clip_low, 1 + clip_high], per-token loss
max(-A_t r_t, -A_t clip(r_t)). Aggregation "token-mean" is Eq. 7: Σ m_t ℓ_t / Σ m_t over the
whole batch; "seq-mean-token-mean" (the authors' code) averages each sequence's kept tokens,
then the sequences that kept any. Masked positions contribute exactly zero loss and gradient.

Options ``topk_forward_kl`` / ``topk_reverse_kl``: KL between the student and the teacher on the
teacher's shipped top-K support, both renormalized on that support (so each is a proper KL >= 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ta_opd._checks import check_mask, check_tensor
from ta_opd.errors import TAConfigError, TAInputError
from ta_opd.registry import Registry


@dataclass(frozen=True)
class LossInputs:
    """Everything a registered loss may read. (B, T) unless noted; gradients flow through the
    current-policy tensors (log_prob, student_topk_logp) only."""

    mask: torch.Tensor  # kept positions (selection mask AND valid)
    log_prob: torch.Tensor | None = None  # log π_θ(y_t), current policy
    old_log_prob: torch.Tensor | None = None  # log π_old(y_t), rollout policy
    teacher_log_prob: torch.Tensor | None = None  # log π_T(y_t)
    student_topk_logp: torch.Tensor | None = None  # (B, T, K) log π_θ at the teacher's top-K ids
    teacher_topk_logp: torch.Tensor | None = None  # (B, T, K) log π_T at those ids


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar
    metrics: dict[str, float]


LossFn = Callable[..., LossOutput]
_LOSSES: Registry[LossFn] = Registry("loss")


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        _LOSSES.add(name, fn)
        return fn

    return deco


def available_losses() -> tuple[str, ...]:
    return _LOSSES.names()


def get_loss(name: str) -> LossFn:
    return _LOSSES.get(name)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over the kept positions.

    token-mean (Eq. 7): Σ m·ℓ / denominator, denominator = Σ m of this batch unless given
    (pass the GLOBAL kept count when several micro-batches or ranks each contribute a sum).
    seq-mean-token-mean: Σ_b [token-mean of sequence b] / denominator, denominator = number of
    sequences with a kept token unless given (pass the global one likewise).
    """
    masked = torch.where(mask, loss_mat, torch.zeros_like(loss_mat))  # where, not *, so NaN/inf never leak
    if mode == "token-mean":
        denom = mask.sum().clamp_min(1) if denominator is None else denominator  # clamp: all-masked -> loss 0
        return masked.sum() / denom
    if mode == "seq-mean-token-mean":
        per_seq_count = mask.sum(-1)
        seq_loss = masked.sum(-1) / per_seq_count.clamp_min(1)  # clamp: sequences with no kept token give 0
        denom = (per_seq_count > 0).sum().clamp_min(1) if denominator is None else denominator
        return seq_loss.sum() / denom
    raise TAConfigError(f"loss_agg={mode!r} is unknown; choose 'token-mean' or 'seq-mean-token-mean'")


def _need(inp: LossInputs, *names: str) -> list[torch.Tensor]:
    out = []
    for name in names:
        t = getattr(inp, name)
        if t is None:
            raise TAInputError(f"this loss needs {name}, which was not given")
        check_tensor(name, t, floating=True)
        out.append(t)
    return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float(torch.where(mask, x, torch.zeros_like(x)).sum() / n) if n else 0.0


def pg_opd_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor,
                      *, clip_low: float = 0.2, clip_high: float = 0.28) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clipped policy-gradient loss (plain clipping, no dual clip), all (B, T).

    Returns (per-token loss max(-A r, -A clip(r)), clipped flag, log-ratio). The ratio is taken
    as 1 at masked positions, so their loss and gradient are exactly zero after aggregation.
    """
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(torch.where(mask, log_ratio, torch.zeros_like(log_ratio)))
    advantage = advantage.detach()
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped, log_ratio


@register_loss("pg_opd")
def pg_opd_loss(inp: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.28,
                loss_agg: str = "token-mean", denominator=None) -> LossOutput:
    """Sampled-token PG-OPD with PPO clipping (Eqs. 6-7 with ℓ̂_t)."""
    log_prob, old, teacher = _need(inp, "log_prob", "old_log_prob", "teacher_log_prob")
    if not (log_prob.shape == old.shape == teacher.shape) or log_prob.dim() != 2:
        raise TAInputError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old.shape)} and teacher_log_prob "
            f"{tuple(teacher.shape)} must all be (B, T)")
    mask = check_mask("mask", inp.mask, log_prob.shape)
    advantage = -(old - teacher).detach()  # (B, T)
    per_token, is_clipped, log_ratio = pg_opd_token_loss(log_prob, old, advantage, mask,
                                                         clip_low=clip_low, clip_high=clip_high)
    loss = aggregate(per_token, mask, loss_agg, denominator)
    metrics = {
        "ta_opd/loss/pg_opd": float(loss.detach()),
        "ta_opd/loss/clipfrac": _masked_mean(is_clipped.float(), mask),
        "ta_opd/loss/sampled_kl": _masked_mean((old - teacher).detach(), mask),
        "ta_opd/loss/ppo_kl": _masked_mean(-log_ratio.detach(), mask),
    }
    return LossOutput(loss, metrics)


def topk_kl_per_token(student_topk_logp: torch.Tensor, teacher_topk_logp: torch.Tensor, *,
                      reverse: bool) -> torch.Tensor:
    """(..., K) log-probs at the same K ids -> (...) KL on that support, both renormalized on it:
    forward KL(p̄_T || p̄_S), or reverse KL(p̄_S || p̄_T). Gradient flows through the student side."""
    s_bar = torch.log_softmax(student_topk_logp.float(), dim=-1)  # renormalize on the support
    t_bar = torch.log_softmax(teacher_topk_logp.float().detach(), dim=-1)
    p, a, b = (s_bar.exp(), s_bar, t_bar) if reverse else (t_bar.exp(), t_bar, s_bar)
    return torch.where(p > 0, p * (a - b), torch.zeros_like(p)).sum(-1)


def _topk_kl(inp: LossInputs, reverse: bool, loss_agg: str, denominator) -> LossOutput:
    s, t = _need(inp, "student_topk_logp", "teacher_topk_logp")
    if s.shape != t.shape or s.dim() != 3:
        raise TAInputError(f"student_topk_logp {tuple(s.shape)} and teacher_topk_logp {tuple(t.shape)} must both be (B, T, K)")
    mask = check_mask("mask", inp.mask, s.shape[:2])
    per_token = topk_kl_per_token(s, t, reverse=reverse)  # (B, T)
    loss = aggregate(per_token, mask, loss_agg, denominator)
    name = "topk_reverse_kl" if reverse else "topk_forward_kl"
    return LossOutput(loss, {f"ta_opd/loss/{name}": float(loss.detach())})


@register_loss("topk_forward_kl")
def topk_forward_kl_loss(inp: LossInputs, *, loss_agg: str = "token-mean", denominator=None, **_) -> LossOutput:
    """KL(p̄_T || p̄_S) on the teacher's top-K support."""
    return _topk_kl(inp, reverse=False, loss_agg=loss_agg, denominator=denominator)


@register_loss("topk_reverse_kl")
def topk_reverse_kl_loss(inp: LossInputs, *, loss_agg: str = "token-mean", denominator=None, **_) -> LossOutput:
    """KL(p̄_S || p̄_T) on the teacher's top-K support."""
    return _topk_kl(inp, reverse=True, loss_agg=loss_agg, denominator=denominator)


def compute_loss(name: str, inp: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.28,
                 loss_agg: str = "token-mean", denominator=None) -> LossOutput:
    """Dispatch to a registered loss by name."""
    return get_loss(name)(inp, clip_low=clip_low, clip_high=clip_high, loss_agg=loss_agg, denominator=denominator)


__all__ = ["LossInputs", "LossOutput", "register_loss", "available_losses", "get_loss", "aggregate",
           "compute_loss", "pg_opd_loss", "pg_opd_token_loss", "topk_kl_per_token", "topk_forward_kl_loss", "topk_reverse_kl_loss"]
