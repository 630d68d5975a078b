"""The selection step of one training step: normalize (Eq. 11), score (Eqs. 12-16), keep the
budget (Eq. 13), report metrics. This is the one call both backends make per rollout batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ta_opd._checks import check_mask, check_tensor
from ta_opd.budget import select_budget
from ta_opd.config import TAConfig
from ta_opd.errors import TAInputError
from ta_opd.metrics import selection_metrics
from ta_opd.normalize import _lerp, apply_range, normalize_valid, order_stats
from ta_opd.selectors import ScoreInputs, get_selector, q3_candidates
from ta_opd.stats import PositionStats


@dataclass(frozen=True)
class Normalized:
    """Normalized statistics of a batch, (B, R) float32, 0 at invalid positions."""

    D: torch.Tensor  # D̃
    C: torch.Tensor  # C̃
    H: torch.Tensor  # H̃
    DL: torch.Tensor  # D^L = D̃·C̃ (Eq. 12)
    DI: torch.Tensor  # D^I = D̃(1 - C̃)
    q3: torch.Tensor  # (B, R) bool, Q3 membership
    raw_quantiles: dict[str, tuple[float, float, float]]  # name -> raw (Q_low, median, Q_high)


@dataclass(frozen=True)
class Selection:
    mask: torch.Tensor  # (B, R) bool, positions that receive the OPD loss
    scores: torch.Tensor  # (B, R) float32 selector scores (0 at invalid; valid for "full" too)
    normalized: Normalized
    metrics: dict[str, float]


def _normalize_one(x: torch.Tensor, valid: torch.Tensor, cfg: TAConfig, name: str):
    """Eq. 11 for one statistic. Returns (x̃ (B, R), raw (Q_low, median, Q_high), median of x̃)."""
    norm, lo, hi = normalize_valid(x, valid, q_low=cfg.q_low, q_high=cfg.q_high, eps=cfg.eps, name=name)
    a, b, t = order_stats(x[valid], 0.5)
    # x ↦ x̃ is non-decreasing, so the middle order statistics of x̃ are the images of x's
    fa, fb = apply_range(torch.tensor([a, b], dtype=torch.float64), lo, hi, cfg.eps).tolist()
    return norm, (lo, _lerp(a, b, t), hi), _lerp(fa, fb, t)


def normalize_batch(D: torch.Tensor, C: torch.Tensor, H: torch.Tensor, valid: torch.Tensor,
                    cfg: TAConfig) -> Normalized:
    """Eq. 11 on D, C, H over the valid positions of the whole batch; D^L, D^I; Q3."""
    d, qd, med_d = _normalize_one(D, valid, cfg, "D")
    c, qc, _ = _normalize_one(C, valid, cfg, "C")
    h, qh, med_h = _normalize_one(H, valid, cfg, "H")
    q3 = q3_candidates(h, d, valid, med_h=med_h, med_d=med_d)
    return Normalized(D=d, C=c, H=h, DL=d * c, DI=d * (1 - c), q3=q3, raw_quantiles={"D": qd, "C": qc, "H": qh})


def select_positions(stats: PositionStats, valid: torch.Tensor, cfg: TAConfig, step: int) -> Selection:
    """Choose the supervised positions of one rollout batch.

    stats: :class:`PositionStats` with leading shape (B, R) (values at invalid positions are
    ignored). valid: (B, R) bool, the valid response positions I of the WHOLE batch.
    step: global training step (seeds the random selector together with cfg.seed).
    """
    check_tensor("stats.D", stats.D, ndim=2, floating=True)
    for name in ("C", "C_low", "C_high", "C_hat", "H", "D_spread", "missing"):  # all (B, R), like D
        t = check_tensor(f"stats.{name}", getattr(stats, name))
        if t.shape != stats.D.shape:
            raise TAInputError(f"stats.{name} has shape {tuple(t.shape)}, but stats.D has {tuple(stats.D.shape)}; "
                               "every per-position statistic must have the batch's (B, R) shape")
    valid = check_mask("valid", valid, stats.D.shape)
    if not isinstance(step, int) or step < 0:
        raise TAInputError(f"step={step!r} must be an integer >= 0")
    if int(valid.sum()) == 0:
        raise TAInputError("empty batch: no valid response positions to select from")
    C = stats.compatibility(cfg.compatibility)
    norm = normalize_batch(stats.D, C, stats.H, valid, cfg)
    selector = get_selector(cfg.selector)
    inputs = ScoreInputs(D=norm.D, C=norm.C, H=norm.H, valid=valid, seed=cfg.seed, step=step)
    if selector.score is None:
        scores = torch.where(valid, torch.ones_like(norm.D), torch.zeros_like(norm.D))
        mask, target, shortfall, extra = valid.clone(), int(valid.sum()), 0, 0
    else:
        scores = torch.where(valid, selector.score(inputs), torch.zeros_like(norm.D))
        res = select_budget(scores, valid, cfg.budget, candidates=norm.q3 if selector.q3 else None,
                            min_keep_per_sequence=cfg.min_keep_per_sequence)
        mask, target, shortfall, extra = res.mask, res.target, res.shortfall, res.min_keep_extra
    exact = cfg.compatibility == "exact"
    metrics = selection_metrics(
        D=stats.D, C=C, H=stats.H, DL=norm.DL, DI=norm.DI, q3=norm.q3, valid=valid, mask=mask, scores=scores,
        missing=stats.missing if exact else None, C_low=stats.C_low if exact else None,
        C_high=stats.C_high if exact else None, D_spread=stats.D_spread, target=target,
        shortfall=shortfall, min_keep_extra=extra, raw_quantiles=norm.raw_quantiles,
        quantile_levels=(cfg.q_low, 0.5, cfg.q_high))
    return Selection(mask=mask, scores=scores, normalized=norm, metrics=metrics)


__all__ = ["Normalized", "Selection", "normalize_batch", "select_positions"]
