"""Robust batch normalization (Eq. 11).

Norm_B(z) = clip((z - Q_lo(z_B)) / (Q_hi(z_B) - Q_lo(z_B) + eps), 0, 1), where z_B holds the
values at the valid positions of the WHOLE rollout batch and Q_q is the linear-interpolation
quantile (numpy's default method).

The computation is split in two so that it can be made global across data-parallel ranks:
:func:`quantile_range` needs every valid value of the batch; :func:`apply_range` is local.
In the verl recipe the driver holds the whole batch (the per-position scalars come back from
every rank in one DataProto), so it calls :func:`robust_normalize` directly. A per-rank caller
instead all-gathers its valid values (``torch.distributed.all_gather`` after padding to the
largest count, then dropping the padding), calls :func:`quantile_range` on the concatenation on
every rank, and :func:`apply_range` on its own shard: the result equals single-process
normalization bit for bit, because the quantiles see the same multiset of values.
"""

from __future__ import annotations

import torch

from ta_opd._checks import check_finite, check_mask, check_tensor
from ta_opd.errors import TAInputError


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's formulation (numpy/lib/_function_base_impl.py::_lerp): exact at both ends.
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def order_stats(values: torch.Tensor, q: float) -> tuple[float, float, float]:
    """(a, b, t) with Q_q = lerp(a, b, t): a, b the order statistics around q·(n-1).

    One O(N) ``kthvalue`` for a; b (the next order statistic) is a or the smallest value above
    a, found with a comparison instead of a second selection. values: (N,) finite.
    """
    n = values.numel()
    pos = q * (n - 1)
    lo = int(pos // 1)
    t = pos - lo
    a_t = torch.kthvalue(values, lo + 1).values
    a = float(a_t)
    if t == 0 or lo + 1 >= n:
        return a, a, 0.0
    if int((values <= a_t).sum()) >= lo + 2:  # a repeats at rank lo + 1
        return a, a, t
    return a, float(values[values > a_t].min()), t


def quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> tuple[float, ...]:
    """Linear-interpolation quantiles of a 1-D tensor, as Python floats (float64 arithmetic).

    Matches ``numpy.quantile(values, qs)`` (method "linear"); O(N) per level and no size limit
    (torch.quantile refuses inputs above 2**24 elements, a size real rollout batches reach).
    """
    check_tensor("values", values, ndim=1, floating=True)
    if values.numel() == 0:
        raise TAInputError("cannot take quantiles of an empty set of values (no valid positions)")
    check_finite("values", values)
    for q in qs:
        if not (0.0 <= q <= 1.0):
            raise TAInputError(f"quantile level {q!r} is outside [0, 1]")
    return tuple(_lerp(*order_stats(values, q)) for q in qs)


def quantile_range(values: torch.Tensor, q_low: float = 0.05, q_high: float = 0.95) -> tuple[float, float]:
    """(Q_lo, Q_hi) of the valid values of the whole batch. values: (N,) valid positions only."""
    if not q_low < q_high:
        raise TAInputError(f"q_low={q_low!r} must be below q_high={q_high!r}")
    lo, hi = quantiles(values, (q_low, q_high))
    return lo, hi


def apply_range(z: torch.Tensor, lo: float, hi: float, eps: float = 1e-8) -> torch.Tensor:
    """clip((z - lo) / (hi - lo + eps), 0, 1) in float64 arithmetic, returned as float32. Any shape."""
    scale = hi - lo + eps
    return ((z.double() - lo) / scale).clamp_(0.0, 1.0).float()


def normalize_valid(z: torch.Tensor, valid: torch.Tensor, *, q_low: float = 0.05, q_high: float = 0.95,
                    eps: float = 1e-8, name: str = "z") -> tuple[torch.Tensor, float, float]:
    """Eq. 11 over the valid positions, the one implementation (``robust_normalize`` and
    ``ta_opd.select`` both call it). z, valid: same shape (e.g. (B, R)). Returns (float32 z̃ of
    that shape, 0 at invalid positions; Q_lo; Q_hi). Invalid positions never enter the
    quantiles; a non-finite value at a valid position is an error naming ``name``."""
    check_tensor(name, z, floating=True)
    valid = check_mask("valid", valid, z.shape)
    vals = z[valid]
    if vals.numel() == 0:
        raise TAInputError("empty batch: no valid positions to normalize over")
    check_finite(name, vals)
    lo, hi = quantile_range(vals, q_low, q_high)
    out = apply_range(z, lo, hi, eps)
    return torch.where(valid, out, torch.zeros_like(out)), lo, hi


def robust_normalize(
    z: torch.Tensor,
    valid: torch.Tensor,
    *,
    q_low: float = 0.05,
    q_high: float = 0.95,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Eq. 11 over the valid positions (:func:`normalize_valid` without the range). z, valid:
    same shape (e.g. (B, R)); returns float32 z̃ with the same shape, 0 at invalid positions."""
    return normalize_valid(z, valid, q_low=q_low, q_high=q_high, eps=eps)[0]


__all__ = ["quantiles", "quantile_range", "apply_range", "normalize_valid", "robust_normalize"]
