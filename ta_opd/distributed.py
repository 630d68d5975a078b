"""Normalization and selection over the WHOLE batch when each data-parallel rank holds a shard.

The verl driver holds the whole batch and calls ``select_positions`` once; code that instead
runs per rank uses these helpers (torch.distributed, any backend, e.g. gloo on CPU). Every rank
gets the same quantiles and the same global top-n, so the result equals single-process
selection on the concatenated batch (rank order = batch order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ta_opd.config import TAConfig
from ta_opd.select import Selection, select_positions
from ta_opd.stats import PositionStats


def _sizes(n: int, group) -> list[int]:
    mine = torch.tensor([n], dtype=torch.long)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def gather_rows(x: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's x along dim 0 (ragged first dims allowed; other dims equal).
    Returns the concatenation, identical on every rank, and the per-rank sizes."""
    sizes = _sizes(x.shape[0], group)
    m = max(sizes)
    padded = torch.zeros((m, *x.shape[1:]), dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sizes


def select_across_ranks(stats: PositionStats, valid: torch.Tensor, cfg: TAConfig, step: int,
                        group=None) -> tuple[torch.Tensor, Selection]:
    """Each rank passes its shard (B_r, T) (T equal across ranks: pad to a common width).
    Returns this rank's (B_r, T) mask and the global Selection (same on every rank)."""
    fields = {}
    for name in ("D", "C", "C_low", "C_high", "C_hat", "H", "D_spread", "missing"):
        fields[name], sizes = gather_rows(getattr(stats, name), group)
    ids = torch.zeros(*fields["D"].shape, 1, dtype=torch.long)  # ids are not used by selection
    whole = PositionStats(**fields, student_topk_ids=ids, teacher_topk_ids=ids)
    all_valid, _ = gather_rows(valid, group)
    sel = select_positions(whole, all_valid, cfg, step)
    start = sum(sizes[: dist.get_rank(group)])
    return sel.mask[start: start + valid.shape[0]], sel
