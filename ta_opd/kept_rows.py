"""Which rows a forward must run, and where its logits are needed: the kept-rows plan, written once.

The update's loss reads the student's logits only at the kept positions (Eq. 7: a masked mean
over the kept positions). A causal LM's logits at row r depend only on the tokens <= r of its
own sequence, so a forward that only needs the logits at some rows can cut each sequence after
its last needed row and drop a sequence with no needed row altogether, and then apply the LM
head and log-softmax at the needed rows only.

Shape vocabulary: B packed sequences, N packed rows (N = cu_seqlens[-1]), B' kept sequences,
M rows of the trimmed stream (M = Σ lengths), n needed rows. Row r's logits score token r + 1
of its sequence, so the caller marks in ``need`` the rows whose logits the loss reads.

Used by both backends: verl's packed (varlen) batches directly, and the CPU backend's padded
``[left-padded prompt | response]`` batch as B sequences of equal width (``ta_opd.rollout``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ta_opd.errors import TAInputError


@dataclass(frozen=True)
class KeptRowPlan:
    lengths: torch.Tensor  # (B,) long: tokens of each sequence the trimmed forward needs (0 = sequence dropped)
    token_index: torch.Tensor  # (M,) long: positions in the original packed stream fed to the trimmed forward
    cu_seqlens: torch.Tensor  # (B'+1,) long: offsets of the B' kept sequences in the trimmed stream
    logit_rows: torch.Tensor  # (n,) long: rows of the trimmed stream whose logits are needed
    orig_rows: torch.Tensor  # (n,) long: the same rows in the original packed stream (sorted ascending)

    @property
    def kept_sequences(self) -> torch.Tensor:
        """(B',) long: indices of the sequences the trimmed forward keeps, ascending."""
        return (self.lengths > 0).nonzero().squeeze(-1)


def _check(cu_seqlens: object, need: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        got = f"{type(cu_seqlens).__name__} {getattr(cu_seqlens, 'dtype', '')} {tuple(getattr(cu_seqlens, 'shape', ()))}"
        raise TAInputError(f"cu_seqlens must be a 1-D integer tensor (B + 1,) of sequence offsets, got {got}")
    cu = cu_seqlens.long()
    if int(cu[0]) != 0:
        raise TAInputError(f"cu_seqlens must start at 0, got cu_seqlens[0]={int(cu[0])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        b = int((steps < 0).nonzero()[0, 0])
        raise TAInputError(f"cu_seqlens must be non-decreasing; cu_seqlens[{b + 1}]={int(cu[b + 1])} < "
                           f"cu_seqlens[{b}]={int(cu[b])}")
    if not isinstance(need, torch.Tensor) or need.dtype != torch.bool or need.dim() != 1:
        got = f"{type(need).__name__} {getattr(need, 'dtype', '')} {tuple(getattr(need, 'shape', ()))}"
        raise TAInputError(f"need must be a 1-D bool tensor (N,) over the packed rows, got {got}")
    if need.numel() != int(cu[-1]):
        raise TAInputError(f"need has {need.numel()} rows but cu_seqlens[-1]={int(cu[-1])}; they must be equal "
                           "(one flag per packed row)")
    return cu, need


def plan_kept_rows(cu_seqlens: torch.Tensor, need: torch.Tensor) -> KeptRowPlan:
    """The trimmed forward for packed sequences ``cu_seqlens`` (B+1,) when only the logits at the
    rows ``need`` (N,) bool are read: each sequence cut after its last needed row, a sequence
    with no needed row dropped. Vectorized (no loop over rows or sequences)."""
    cu, need = _check(cu_seqlens, need)
    dev = cu.device
    n_seq, n_rows = cu.numel() - 1, need.numel()
    start = cu[:-1]  # (B,)
    seq = torch.repeat_interleave(torch.arange(n_seq, device=dev), cu[1:] - start)  # (N,) sequence of each row
    rows = torch.arange(n_rows, device=dev)  # (N,)
    last = torch.full((n_seq,), -1, dtype=torch.long, device=dev)  # (B,) last needed row, -1 if none
    last.scatter_reduce_(0, seq, torch.where(need, rows, -1), reduce="amax")
    lengths = torch.where(last >= 0, last - start + 1, 0)  # (B,)
    fed = rows - start[seq] < lengths[seq]  # (N,) the row is at or before its sequence's cut
    token_index = fed.nonzero().squeeze(-1)  # (M,)
    orig_rows = need.nonzero().squeeze(-1)  # (n,) need ⊆ fed
    logit_rows = fed.long().cumsum(0)[orig_rows] - 1  # (n,) position of each needed row in the trimmed stream
    kept_lengths = lengths[lengths > 0]  # (B',)
    new_cu = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), kept_lengths.cumsum(0)])  # (B'+1,)
    return KeptRowPlan(lengths=lengths, token_index=token_index, cu_seqlens=new_cu, logit_rows=logit_rows,
                       orig_rows=orig_rows)


__all__ = ["KeptRowPlan", "plan_kept_rows"]
