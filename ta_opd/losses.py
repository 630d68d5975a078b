"""Losses on the kept positions (spec: "Loss"; paper Eqs. 6-7), behind a name registry.

Default ``pg_opd``: sampled-token OPD as a policy gradient. Advantage
A_t = -(log π_old(y_t) - log π_T(y_t)) (no reward model, no normalization), PPO-clipped ratio
r_t = π_θ(y_t)/π_old(y_t) in [1 - clip_low, 1 + clip_high], per-token loss
max(-A_t r_t, -A_t clip(r_t)). Aggregation "token-mean" is Eq. 7: Σ m_t ℓ_t / Σ m_t over the
whole batch; "seq-mean-token-mean" (the authors' code) averages each sequence's kept tokens,
then the sequences that kept any. Masked positions contribute exactly zero loss and gradient.

Options ``topk_forward_kl`` / ``topk_reverse_kl``: KL between the student and the teacher on
K + 1 bins: the teacher's top-K ids, plus one "rest" bin holding each side's remaining mass
(``topk_kl_per_token``; docs/losses.md). The student's probabilities are its true full-vocabulary
ones (verl's ``forward_kl_topk`` convention), so the loss is a proper KL >= 0 whose minimum is
the student matching the teacher on every bin: it pulls the student's mass into the teacher's
support when the student has more mass outside it than the teacher. (Renormalizing the student
on the support, as an earlier version did, makes the loss blind to that mass: its gradient on
every logit outside the support is exactly zero.) Where the teacher's top-K holds all of its
mass, the forward loss equals verl's ``forward_kl_topk`` in value and gradient.

Per-token form: each built-in loss is registered as a :class:`TokenLoss` function ((B, R) ℓ_t and
per-token metrics, ``register_loss(..., per_token=True)``); the registry derives the aggregated
loss from it (:func:`compute_loss`, used by the CPU backend), and the verl backend runs the same
function under verl's own aggregation. So a loss registered per token runs on both backends; one
registered aggregated only runs on CPU and the verl backend refuses it by name at startup.

Guards: a NaN or infinite input at a KEPT position raises ``TAInputError`` naming the position;
masked positions are never read into the loss (they may hold anything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch

from ta_opd._checks import check_mask, check_tensor, is_real
from ta_opd.errors import TAConfigError, TAInputError
from ta_opd.registry import Registry


@dataclass(frozen=True)
class LossInputs:
    """Everything a registered loss may read. (B, R) unless noted; gradients flow through the
    current-policy tensors (log_prob, student_topk_logp) only."""

    mask: torch.Tensor  # kept positions (selection mask AND valid)
    log_prob: torch.Tensor | None = None  # log π_θ(y_t), current policy
    old_log_prob: torch.Tensor | None = None  # log π_old(y_t), rollout policy
    teacher_log_prob: torch.Tensor | None = None  # log π_T(y_t)
    student_topk_logp: torch.Tensor | None = None  # (B, R, K) log π_θ at the teacher's top-K ids (full-vocab softmax)
    teacher_topk_logp: torch.Tensor | None = None  # (B, R, K) log π_T at those ids
    # (B, R) log of π_θ's mass on every OTHER id, from the logits (see topk_logp_and_rest): it
    # cannot be recovered from student_topk_logp in floating point when the support holds ~all mass
    student_rest_logp: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar
    metrics: dict[str, float]


@dataclass(frozen=True)
class TokenLoss:
    """A loss in per-token form: what a backend that aggregates by itself runs (verl reduces it
    with its own ``agg_loss`` over the kept mask). A loss registered with ``per_token=True``
    returns this; the registry derives its aggregated form (:func:`compute_loss`) from it."""

    loss: torch.Tensor  # (B, R) per-token loss ℓ_t, exactly 0 at masked positions
    # metric name -> (B, R) per-token values (no gradient); logged as their mean over kept positions
    metrics: dict[str, torch.Tensor]


LossFn = Callable[..., LossOutput]  # fn(inp, *, clip_low, clip_high, loss_agg, denominator) -> LossOutput
TokenLossFn = Callable[..., TokenLoss]  # fn(inp, *, clip_low, clip_high) -> TokenLoss
# the LossInputs fields a loss may declare it reads (``mask`` is always given, so never declared)
INPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LossInputs) if f.name != "mask")


@dataclass(frozen=True)
class _Registered:
    fn: LossFn
    needs: tuple[str, ...]  # the LossInputs fields fn reads besides mask
    token_fn: TokenLossFn | None  # the per-token form, when registered with per_token=True


_LOSSES: Registry[_Registered] = Registry("loss")


def _check_needs(name: str, needs) -> tuple[str, ...]:
    if isinstance(needs, str) or not isinstance(needs, (tuple, list)):
        raise TAConfigError(f"register_loss({name!r}, needs={needs!r}): needs must be a tuple of LossInputs field "
                            f"names, e.g. ('log_prob', 'old_log_prob'); valid fields: {', '.join(INPUT_FIELDS)}")
    for field in needs:
        if field != "mask" and field not in INPUT_FIELDS:
            raise TAConfigError(f"register_loss({name!r}): needs names {field!r}, which is not a LossInputs field; "
                                f"valid fields: {', '.join(INPUT_FIELDS)} (mask is always given)")
    return tuple(dict.fromkeys(f for f in needs if f != "mask"))  # declared order, no duplicates


def register_loss(name: str, needs: tuple[str, ...] | None = None, *,
                  per_token: bool = False) -> Callable[[Callable], Callable]:
    """Register loss ``name``. ``needs``: the LossInputs fields it reads (``mask`` is implied);
    backends compute only those, so a field not declared stays None. Omitted: every field (a
    backend then computes all it can, the costly top-K gather and rest mass included).

    ``per_token=False``: ``fn(inp, *, clip_low, clip_high, loss_agg, denominator) -> LossOutput``,
    the aggregated loss; runs on the CPU backend only (the verl backend refuses it by name at
    startup: verl aggregates per-token losses itself). ``per_token=True``:
    ``fn(inp, *, clip_low, clip_high) -> TokenLoss``; :func:`compute_loss` aggregates it (Eq. 7 or
    seq-mean-token-mean) and both backends run it."""
    if not isinstance(per_token, bool):
        raise TAConfigError(f"register_loss({name!r}, per_token={per_token!r}): per_token must be True or False")
    declared = INPUT_FIELDS if needs is None else _check_needs(name, needs)

    def deco(fn: Callable) -> Callable:
        if per_token:
            _LOSSES.add(name, _Registered(_aggregated(name, fn), declared, fn))
        else:
            _LOSSES.add(name, _Registered(fn, declared, None))
        return fn

    return deco


def available_losses() -> tuple[str, ...]:
    return _LOSSES.names()


def get_loss(name: str) -> LossFn:
    return _LOSSES.get(name).fn


def get_token_loss(name: str) -> TokenLossFn | None:
    """The per-token form of registered loss ``name``, or None when it was registered aggregated only."""
    return _LOSSES.get(name).token_fn


def per_token_losses() -> tuple[str, ...]:
    """The registered losses that have a per-token form (those the verl backend can run)."""
    return tuple(n for n in _LOSSES.names() if _LOSSES.get(n).token_fn is not None)


def loss_needs(name: str) -> tuple[str, ...]:
    """The LossInputs fields registered loss ``name`` reads besides ``mask``: all a backend
    needs to compute for it."""
    return _LOSSES.get(name).needs


def _aggregated(name: str, token_fn: TokenLossFn) -> LossFn:
    """The aggregated form of a per-token loss: ``aggregate`` over the kept positions, its metrics
    the kept-position means of the per-token ones, plus ``ta_opd/loss/<name>`` (the loss)."""

    def fn(inp: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.28, loss_agg: str = "token-mean",
           denominator=None) -> LossOutput:
        out = token_fn(inp, clip_low=clip_low, clip_high=clip_high)
        mask = check_mask("mask", inp.mask, out.loss.shape)
        loss = aggregate(out.loss, mask, loss_agg, denominator)
        metrics = {f"ta_opd/loss/{name}": float(loss.detach()),
                   **{k: _masked_mean(v.detach(), mask) for k, v in out.metrics.items()}}
        return LossOutput(loss, metrics)

    fn.__name__ = fn.__qualname__ = f"{name}_loss"
    fn.__doc__ = f"The aggregated form of per-token loss {name!r} (see {token_fn.__name__})."
    return fn


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a (B, R) per-token loss over the kept positions.

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


def check_kept_finite(name: str, x: torch.Tensor, mask: torch.Tensor, *, allow_neg_inf: bool = False) -> None:
    """Raise ``TAInputError`` naming the first kept position where ``x`` is NaN or infinite.
    x: (B, R) or (B, R, K); mask: (B, R) kept positions. -inf passes when ``allow_neg_inf``
    (a log-probability of exactly zero)."""
    bad = (torch.isnan(x) | (x == float("inf"))) if allow_neg_inf else ~torch.isfinite(x)
    if x.dim() == mask.dim() + 1:
        bad = bad.any(-1)
    bad &= mask
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        val = x[b, t]
        shown = val.item() if val.dim() == 0 else [round(v, 4) for v in val.tolist()]
        raise TAInputError(
            f"{name} is {shown} at kept position (row {b}, response position {t}) ({int(bad.sum())} kept "
            f"position(s) affected): a NaN or infinite value there would make the loss NaN or infinite; "
            "check the model and teacher outputs at that position")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float(torch.where(mask, x, torch.zeros_like(x)).sum() / n) if n else 0.0


def pg_opd_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor,
                      *, clip_low: float = 0.2, clip_high: float = 0.28) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clipped policy-gradient loss (plain clipping, no dual clip), all (B, R).

    Returns (per-token loss max(-A r, -A clip(r)), clipped flag, log-ratio). The ratio is taken
    as 1 at masked positions, so their loss and gradient are exactly zero after aggregation.
    Raises ``TAInputError`` if an input is NaN or infinite at a kept position.
    """
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob),
                    ("advantage (log π_T(y_t) - log π_old(y_t))", advantage)):
        check_kept_finite(name, x.detach(), mask)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(torch.where(mask, log_ratio, torch.zeros_like(log_ratio)))
    advantage = advantage.detach()
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped, log_ratio


@register_loss("pg_opd", needs=("log_prob", "old_log_prob", "teacher_log_prob"), per_token=True)
def pg_opd_tokens(inp: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.28) -> TokenLoss:
    """Sampled-token PG-OPD with PPO clipping (Eqs. 6-7 with ℓ̂_t), per token."""
    log_prob, old, teacher = _need(inp, "log_prob", "old_log_prob", "teacher_log_prob")
    if not (log_prob.shape == old.shape == teacher.shape) or log_prob.dim() != 2:
        raise TAInputError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old.shape)} and teacher_log_prob "
            f"{tuple(teacher.shape)} must all be (B, R)")
    mask = check_mask("mask", inp.mask, log_prob.shape)
    for name, x in (("log_prob", log_prob), ("old_log_prob", old), ("teacher_log_prob", teacher)):
        check_kept_finite(name, x.detach(), mask)
    advantage = -(old - teacher).detach()  # (B, R)
    per_token, is_clipped, log_ratio = pg_opd_token_loss(log_prob, old, advantage, mask,
                                                         clip_low=clip_low, clip_high=clip_high)
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return TokenLoss(torch.where(mask, per_token, zero), {  # where, not *: nothing leaks from masked positions
        "ta_opd/loss/clipfrac": is_clipped.float(),
        "ta_opd/loss/sampled_kl": (old - teacher).detach(),
        "ta_opd/loss/ppo_kl": -log_ratio.detach(),
    })


# Largest amount by which top-K probabilities may sum above 1 (float rounding of log-probs
# shipped in fp32); beyond it they are not the log-probs of one distribution.
MASS_TOL = 1e-4


def topk_logp_and_rest(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits and (..., K) distinct token ids -> the student's full-vocabulary log-probs
    at the ids (..., K) and the log of its total mass on every other id (...), both fp32 and
    exact (the rest is a logsumexp over the other logits, not 1 - Σ of rounded probabilities).
    Differentiable; makes one (..., V) fp32 copy, so call it on chunks of positions."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (..., 1)
    topk = x.gather(-1, ids) - lse  # (..., K)
    rest = x.scatter(-1, ids, float("-inf")).logsumexp(-1) - lse.squeeze(-1)  # (...)
    return topk, rest


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate on both sides of -log 2 (Mächler 2012)."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def teacher_rest_logp(teacher_topk_logp: torch.Tensor) -> torch.Tensor:
    """(..., K) teacher log-probs -> (...) log of its mass outside those ids, log(1 - Σ_k p_k),
    computed in float64; -inf where the top-K holds all the mass (up to MASS_TOL, which is
    rounding). Callers check the tolerance (see _check_topk_inputs)."""
    lse = torch.logsumexp(teacher_topk_logp.detach().double(), dim=-1)
    return _log1mexp(lse.clamp_max(0.0)).float()  # clamp: Σ p_k in (1, 1 + tol] is rounding -> rest 0


def topk_kl_per_token(student_topk_logp: torch.Tensor, student_rest_logp: torch.Tensor,
                      teacher_topk_logp: torch.Tensor, *, reverse: bool) -> torch.Tensor:
    """KL on K + 1 bins (the teacher's K ids + one rest bin), per position.

    student_topk_logp (..., K): the student's FULL-vocabulary log-probs at the teacher's ids;
    student_rest_logp (...): log of its mass elsewhere (``topk_logp_and_rest``);
    teacher_topk_logp (..., K): the teacher's log-probs there (rest bin: 1 - Σ_k p_k).
    forward: KL(T̃ || S̃) = Σ_k p_k log(p_k / q_k) + r_T log(r_T / r_S)   (0 log 0 = 0)
    reverse: KL(S̃ || T̃) = Σ_k q_k log(q_k / p_k) + r_S log(r_S / r̂_T),
             r̂_T = max(r_T, K·eps_fp32): the teacher's rest mass is only known to the rounding of its
             K fp32 probabilities, and a rest of exactly 0 would make the reverse KL infinite.
    Both are >= 0 and 0 iff the student matches the teacher on every bin. Gradient flows through
    the student side only. Returns (...), fp32.
    """
    q_lp = student_topk_logp.float()  # (..., K)
    q_rest = student_rest_logp.float()  # (...)
    p_lp = teacher_topk_logp.detach().float()  # (..., K)
    p_rest = teacher_rest_logp(p_lp)  # (...)
    if not reverse:
        return _kl_terms(p_lp, q_lp).sum(-1) + _kl_terms(p_rest, q_rest)
    floor = math.log(p_lp.shape[-1] * torch.finfo(torch.float32).eps)
    return _kl_terms(q_lp, p_lp).sum(-1) + _kl_terms(q_rest, p_rest.clamp_min(floor))


def _kl_terms(a_lp: torch.Tensor, b_lp: torch.Tensor) -> torch.Tensor:
    """exp(a)·(a - b) elementwise, 0 where exp(a) = 0 (0 log 0 = 0), with gradients free of NaN
    there (the masked branch never sees an infinite log-prob)."""
    pos = a_lp > float("-inf")
    a = torch.where(pos, a_lp, torch.zeros_like(a_lp))
    b = torch.where(pos, b_lp, torch.zeros_like(b_lp))
    return torch.where(pos, a.exp() * (a - b), torch.zeros_like(a))


def _check_topk_inputs(s: torch.Tensor, s_rest: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> None:
    check_kept_finite("student_topk_logp", s.detach(), mask, allow_neg_inf=True)
    check_kept_finite("student_rest_logp", s_rest.detach(), mask, allow_neg_inf=True)
    check_kept_finite("teacher_topk_logp", t.detach(), mask, allow_neg_inf=True)
    for name, lp, tol in (("teacher_topk_logp", t, MASS_TOL), ("student_topk_logp", s, MASS_TOL)):
        mass = torch.logsumexp(lp.detach().double(), dim=-1).exp()  # (B, R)
        over = (mass > 1 + tol) & mask
        if bool(over.any()):
            b, tt = (int(i) for i in over.nonzero()[0])
            raise TAInputError(f"{name} at kept position (row {b}, response position {tt}) sums to probability "
                               f"{float(mass[b, tt]):.6f} > 1 (+{tol} rounding): not the log-probs of one distribution")


_TOPK_NEEDS = ("student_topk_logp", "student_rest_logp", "teacher_topk_logp")


def _topk_kl(inp: LossInputs, reverse: bool) -> TokenLoss:
    if inp.student_rest_logp is None and inp.student_topk_logp is not None:
        raise TAInputError("the top-K losses need student_rest_logp, the log of the student's mass outside the "
                           "teacher's top-K ids: compute both from the logits with ta_opd.losses.topk_logp_and_rest")
    s, s_rest, t = _need(inp, *_TOPK_NEEDS)
    if s.shape != t.shape or s.dim() != 3 or s_rest.shape != s.shape[:2]:
        raise TAInputError(f"student_topk_logp {tuple(s.shape)} and teacher_topk_logp {tuple(t.shape)} must both be "
                           f"(B, R, K) and student_rest_logp {tuple(s_rest.shape)} (B, R)")
    mask = check_mask("mask", inp.mask, s.shape[:2])
    _check_topk_inputs(s, s_rest, t, mask)
    # only kept positions enter the computation: masked ones may hold anything (padding, garbage)
    kept = topk_kl_per_token(s[mask], s_rest[mask], t[mask], reverse=reverse)  # (N,)
    per_token = torch.zeros(mask.shape, dtype=kept.dtype, device=kept.device).index_put(mask.nonzero(as_tuple=True), kept)
    check_kept_finite("the top-K KL (one side gives probability 0 to a bin where the other has mass)",
                      per_token.detach(), mask)
    with torch.no_grad():
        metrics = {"ta_opd/loss/student_topk_mass": torch.logsumexp(s.float(), -1).exp(),  # (B, R)
                   "ta_opd/loss/teacher_topk_mass": torch.logsumexp(t.float(), -1).exp()}
    return TokenLoss(per_token, metrics)


@register_loss("topk_forward_kl", needs=_TOPK_NEEDS, per_token=True)
def topk_forward_kl_tokens(inp: LossInputs, **_) -> TokenLoss:
    """KL(T̃ || S̃) on the teacher's top-K ids + a rest bin (see topk_kl_per_token), per token."""
    return _topk_kl(inp, reverse=False)


@register_loss("topk_reverse_kl", needs=_TOPK_NEEDS, per_token=True)
def topk_reverse_kl_tokens(inp: LossInputs, **_) -> TokenLoss:
    """KL(S̃ || T̃) on the teacher's top-K ids + a rest bin (see topk_kl_per_token), per token."""
    return _topk_kl(inp, reverse=True)


def _check_clip(clip_low, clip_high) -> None:
    """The same rule as TAConfig: clip ranges >= 0, clip_low < 1 (the ratio floor 1 - clip_low > 0)."""
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not is_real(v) or v < 0:
            raise TAConfigError(f"{name}={v!r} is not allowed; clip ranges must be numbers >= 0")
    if clip_low >= 1:
        raise TAConfigError(f"clip_low={clip_low!r} is not allowed; it must be < 1 (ratio floor 1 - clip_low > 0)")


def compute_loss(name: str, inp: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.28,
                 loss_agg: str = "token-mean", denominator=None) -> LossOutput:
    """Dispatch to a registered loss by name."""
    _check_clip(clip_low, clip_high)
    return get_loss(name)(inp, clip_low=clip_low, clip_high=clip_high, loss_agg=loss_agg, denominator=denominator)


# the aggregated forms of the built-in losses (what compute_loss dispatches to)
pg_opd_loss = get_loss("pg_opd")
topk_forward_kl_loss = get_loss("topk_forward_kl")
topk_reverse_kl_loss = get_loss("topk_reverse_kl")

__all__ = ["LossInputs", "LossOutput", "TokenLoss", "register_loss", "available_losses", "get_loss", "get_token_loss",
           "per_token_losses", "loss_needs", "aggregate", "compute_loss", "check_kept_finite", "pg_opd_loss",
           "pg_opd_tokens", "pg_opd_token_loss", "teacher_rest_logp", "topk_kl_per_token", "topk_logp_and_rest",
           "topk_forward_kl_loss", "topk_reverse_kl_loss", "topk_forward_kl_tokens", "topk_reverse_kl_tokens"]
