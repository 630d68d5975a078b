"""Budget selection (Eq. 13): keep exactly n = ceil(rho·|I|) valid positions of the whole batch.

Order: higher score first; ties go to the earlier position within its response, then to the
earlier sequence in batch order. Positions are counted among each row's valid positions, so
padding (left or right) never changes the mask of real positions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ta_opd._checks import check_finite, check_mask, check_tensor
from ta_opd.errors import TAInputError

# rho·|I| within this relative distance of an integer is that integer: in binary floating point
# 0.07 * 100 = 7.000000000000001, whose plain ceil would keep 8 positions instead of 7.
_INTEGER_TOLERANCE = 1e-9


def budget_count(rho: float, n_valid: int) -> int:
    """n = ceil(rho · n_valid), robust to floating-point noise in the product."""
    if not (0.0 < rho <= 1.0):
        raise TAInputError(f"budget rho={rho!r} is not allowed; it must be in (0, 1]")
    if n_valid <= 0:
        raise TAInputError(f"empty batch: {n_valid} valid positions; the budget needs at least one")
    x = rho * n_valid
    r = round(x)
    if r >= 1 and abs(x - r) <= _INTEGER_TOLERANCE * x:
        return min(int(r), n_valid)
    return min(math.ceil(x), n_valid)


@dataclass(frozen=True)
class BudgetResult:
    mask: torch.Tensor  # (B, R) bool, kept positions
    target: int  # n = ceil(rho·|I|)
    kept: int  # positions actually kept
    shortfall: int  # n - kept when fewer candidates than n (Q3 selectors); else 0
    min_keep_extra: int  # positions added by min_keep_per_sequence beyond the global top-n


def _pos_major_index(valid: torch.Tensor) -> torch.Tensor:
    """Flat indices (into valid.view(-1)) of the valid positions, ordered by (position within
    the response, sequence). Rows are left-compacted (each row's valid positions moved to
    columns 0..len-1) and read column by column: O(B·R), no sort. Returns (N,) int64."""
    B, R = valid.shape
    pos = valid.long().cumsum(1) - 1  # (B, R) position among the row's valid positions
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # row-major
    compact = torch.full((B, R), -1, dtype=torch.long, device=valid.device)
    compact[b_idx, pos[b_idx, t_idx]] = b_idx * R + t_idx
    flat = compact.t().reshape(-1)
    return flat[flat >= 0]


def _top_n_threshold(s: torch.Tensor, n: int) -> torch.Tensor:
    """Keep-flags of the n largest of s (N,), ties to the earlier entry. O(N): one kthvalue."""
    m = s.numel()
    if n >= m:
        return torch.ones(m, dtype=torch.bool, device=s.device)
    v = torch.kthvalue(s, m - n + 1).values  # the n-th largest value
    above = s > v
    at = s == v
    return above | (at & (at.cumsum(0) <= n - int(above.sum())))


def _rank_in_row(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """For a sequence of row ids in global order, each entry's rank among entries of its row."""
    grouped = torch.argsort(rows, stable=True)
    r_sorted = rows[grouped]
    counts = torch.bincount(r_sorted, minlength=n_rows)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(rows)
    rank[grouped] = torch.arange(rows.numel(), device=rows.device) - starts[r_sorted]
    return rank


def select_budget(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budget: float,
    *,
    candidates: torch.Tensor | None = None,
    min_keep_per_sequence: int = 0,
) -> BudgetResult:
    """Keep the top-n candidates of the whole batch by score (Eq. 13).

    scores: (B, R) float, finite at valid positions. valid: (B, R) bool (real response
    positions after padding and trainer masks). candidates: optional (B, R) bool restricting
    which valid positions may be kept (Q3 selectors). min_keep_per_sequence: every sequence
    also keeps its best m candidates (the kept count may then exceed n; it is reported).
    """
    check_tensor("scores", scores, ndim=2, floating=True)
    valid = check_mask("valid", valid, scores.shape)
    n_valid = int(valid.sum())
    n = budget_count(budget, n_valid)
    check_finite("scores", scores, valid)
    cand = valid if candidates is None else valid & check_mask("candidates", candidates, scores.shape)
    if not isinstance(min_keep_per_sequence, int) or min_keep_per_sequence < 0:
        raise TAInputError(f"min_keep_per_sequence={min_keep_per_sequence!r} must be an integer >= 0")
    R = scores.shape[1]
    idx = _pos_major_index(valid)  # (N,) flat indices in (position, sequence) order
    idx = idx[cand.reshape(-1)[idx]]  # candidates only
    s = scores.reshape(-1)[idx]
    if min_keep_per_sequence == 0:
        # exact top-n under the tie rule in O(B·R): threshold at the n-th largest score
        keep = _top_n_threshold(s, n)
        top_n = int(keep.sum())
    else:
        order = torch.argsort(s, descending=True, stable=True)  # (score desc, position, sequence)
        idx = idx[order]
        keep = torch.arange(idx.numel(), device=scores.device) < n
        top_n = int(keep.sum())
        keep |= _rank_in_row(idx // R, scores.shape[0]) < min_keep_per_sequence
    mask = torch.zeros_like(valid)
    mask.view(-1)[idx[keep]] = True
    kept = int(keep.sum())
    shortfall = n - top_n
    if shortfall > 0:
        warnings.warn(
            f"only {top_n} candidate positions for a budget of {n}: kept {top_n} "
            f"(shortfall {shortfall}, logged as ta_opd/budget/shortfall)", stacklevel=2)
    return BudgetResult(mask=mask, target=n, kept=kept, shortfall=shortfall, min_keep_extra=kept - top_n)


__all__ = ["budget_count", "select_budget", "BudgetResult"]
