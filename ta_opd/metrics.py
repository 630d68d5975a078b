"""Selection metrics, named ``ta_opd/<quantity>[/<stat>]`` (spec: "Budget"; issue: metrics)."""

from __future__ import annotations

import torch

from ta_opd.errors import TAInputError
from ta_opd.normalize import quantiles

def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def _level(q: float) -> str:
    return f"p{round(q * 100):02d}"


def selection_metrics(*, D, C, H, DL, DI, q3, valid, mask, scores, missing=None, C_low=None, C_high=None,
                      D_spread=None, target=None, shortfall=0, min_keep_extra=0, raw_quantiles=None,
                      quantile_levels=(0.05, 0.5, 0.95)) -> dict[str, float]:
    """All inputs (B, R) except the counts. Raw D, C, H; normalized D^L, D^I; q3 and masks bool.

    raw_quantiles: optional name -> (Q_low, median, Q_high) of raw D, C, H (at quantile_levels).
    Kept-vs-dropped means are over valid positions; a side with no position reports NaN.
    """
    n_valid = int(valid.sum())
    n_kept = int(mask.sum())
    dropped = valid & ~mask
    m = {
        "ta_opd/valid_count": float(n_valid),
        "ta_opd/kept_count": float(n_kept),
        "ta_opd/kept_ratio": n_kept / n_valid,
        "ta_opd/budget/target": float(target if target is not None else n_kept),
        "ta_opd/budget/shortfall": float(shortfall),
        "ta_opd/budget/min_keep_extra": float(min_keep_extra),
        "ta_opd/DL/kept_mean": _mean(DL[mask]),
        "ta_opd/DL/dropped_mean": _mean(DL[dropped]),
        "ta_opd/DI/kept_mean": _mean(DI[mask]),
        "ta_opd/DI/dropped_mean": _mean(DI[dropped]),
        "ta_opd/q3/fraction": float(q3[valid].float().mean()),
        "ta_opd/q3/kept_fraction": _mean(q3[mask].float()),
        "ta_opd/score/kept_mean": _mean(scores[mask]),
    }
    for name, x in (("D", D), ("C", C), ("H", H)):
        # the normalization already computed these quantiles; recompute only when not given
        qv = raw_quantiles[name] if raw_quantiles else quantiles(x[valid].float(), quantile_levels)
        for q, v in zip(quantile_levels, qv):
            m[f"ta_opd/{name}/{_level(q)}"] = v
        m[f"ta_opd/{name}/mean"] = _mean(x[valid])
    if missing is not None:
        miss = missing[valid]
        m["ta_opd/missing/fraction"] = float((miss > 0).float().mean())
        m["ta_opd/missing/ids_mean"] = _mean(miss.float())
    if C_low is not None and C_high is not None:
        width = (C_high - C_low)[valid]
        m["ta_opd/C_bound/max_width"] = float(width.max())
        m["ta_opd/C_bound/mean_width"] = _mean(width)
    if D_spread is not None:
        m["ta_opd/D_spread/max"] = float(D_spread[valid].max())
    return m


def kept_advantage_metrics(advantage: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sign of the PG-OPD advantage A_t = log π_T(y_t) − log π_old(y_t) (Eq. 6), kept vs all valid.

    advantage (B, R) float; valid, mask (B, R) bool. A position with A_t < 0 is one PG-OPD can
    only push down (the student over-rates its own sample); A_t = 0 counts as non-negative. A side
    with no position reports NaN (issue 11 §2).
    """
    if advantage.shape != valid.shape or mask.shape != valid.shape:
        raise TAInputError(f"advantage {tuple(advantage.shape)}, valid {tuple(valid.shape)} and mask "
                           f"{tuple(mask.shape)} must have the same (B, R) shape")
    kept = mask & valid
    neg = advantage < 0  # (B, R)
    return {
        "ta_opd/kept/neg_adv_fraction": _mean(neg[kept].float()),
        "ta_opd/kept/adv_mean": _mean(advantage[kept]),
        "ta_opd/valid/neg_adv_fraction": _mean(neg[valid].float()),
    }


__all__ = ["kept_advantage_metrics", "selection_metrics"]
