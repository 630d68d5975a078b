"""Small kernels on top-K supports, shared by the dense and the sparse statistics paths.

Shape vocabulary: n positions in a chunk, V vocabulary, K support size, M = 2K union slots,
P = K' (+ extra) teacher ids shipped per position.
"""

from __future__ import annotations

import torch


class Workspace:
    """Chunk-sized fp32 buffers reused across chunks.

    Allocating a few-MB temporary per chunk makes the allocator alternate between its heap and
    fresh pages, and every fresh page costs a fault: measured here, the same pass ran 1x or 3x
    slower from one call to the next. Writing into these buffers with ``out=`` avoids that.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device, n_buffers: int = 3):
        self.bufs = [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(n_buffers)]

    def get(self, i: int, rows: int) -> torch.Tensor:
        return self.bufs[i][:rows]  # leading-dim slice: contiguous


def as_fp32(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """x as fp32: x itself when already fp32, else copied into buf."""
    if x.dtype == torch.float32:
        return x
    return buf.copy_(x)


def rows_as_fp32(x: torch.Tensor, rows: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """x[rows] as fp32 in buf: one gather straight into the buffer when x is fp32."""
    if x.dtype == torch.float32:
        return torch.index_select(x, 0, rows, out=buf)
    return buf.copy_(x.index_select(0, rows))


def _xlogy_dot(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_v e_v d_v per row, with 0 * (-inf) = 0 (masked logits). (n, V), (n, V) -> (n,)"""
    ed = torch.linalg.vecdot(e, d)  # (n,)
    bad = torch.isnan(ed)
    if bool(bad.any()):
        ed[bad] = torch.where(e[bad] > 0, e[bad] * d[bad], torch.zeros_like(d[bad])).sum(-1)
    return ed


def student_pass(x: torch.Tensor, k: int, ws_d: torch.Tensor, ws_e: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cache-friendly pass over a chunk of student logits (or log-probs).

    x: (n, V) fp32; ws_d, ws_e: (n, V) fp32 scratch. Returns log Z (n,), full-vocabulary
    entropy H (n,), and the top-K logits and ids (n, K) each. Uses
    H = log Z' - sum_v e_v d_v / Z' with d = x - max(x), e = exp(d), Z' = sum e: no (n, V)
    log-prob tensor is kept and there is no cancellation against large logits.
    """
    top_val, top_ids = x.topk(k, dim=-1)  # (n, K) each
    d = torch.sub(x, top_val[:, :1], out=ws_d)  # (n, V), <= 0
    e = torch.exp(d, out=ws_e)  # (n, V)
    z = e.sum(-1)  # (n,)
    ed = _xlogy_dot(e, d)
    log_z = z.log() + top_val[:, 0]
    entropy = z.log() - ed / z
    return log_z, entropy, top_val, top_ids


def log_softmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim written into out (n, V) fp32."""
    return torch.log_softmax(x, dim=-1, out=out)


def entropy_from_logp(logp: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row with 0 log 0 = 0; ws: (n, V) scratch. (n, V) -> (n,)"""
    return -_xlogy_dot(torch.exp(logp, out=ws), logp)


def topk_entropy(top_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the renormalized top-K distribution divided by log K (the authors' variant). (n,K) -> (n,)"""
    k = top_logits.shape[-1]
    logq = torch.log_softmax(top_logits, dim=-1)
    return -(logq.exp() * logq).sum(-1) / torch.log(torch.tensor(float(k)))


def union_slots(s_ids: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """Which teacher top-K ids are also student top-K ids. (n,K),(n,K) -> (n,K) bool.

    The union U = S_S ∪ S_T is laid out as 2K slots [S_S, S_T]; a teacher slot whose id is
    already in S_S is a duplicate and is excluded from U.
    """
    return (t_ids.unsqueeze(-1) == s_ids.unsqueeze(-2)).any(-1)


def renormalized_kl(t_logp: torch.Tensor, s_logp: torch.Tensor, in_u: torch.Tensor) -> torch.Tensor:
    """KL(p̄_T^U || p̄_S^U) (Eq. 9) on the slots marked ``in_u``. All (n, M) -> (n,).

    Inputs are log-probabilities of the FULL distributions at the slot ids; both sides are
    renormalized on U here. Teacher zeros contribute 0; a student zero under teacher mass gives +inf.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=t_logp.dtype, device=t_logp.device)
    t = torch.where(in_u, t_logp, neg_inf)
    s = torch.where(in_u, s_logp, neg_inf)
    t_bar = t - torch.logsumexp(t, dim=-1, keepdim=True)
    s_bar = s - torch.logsumexp(s, dim=-1, keepdim=True)
    p = t_bar.exp()
    terms = torch.where(p > 0, p * (t_bar - s_bar), torch.zeros_like(p))
    return terms.sum(-1)


def lookup(ids: torch.Tensor, pool_ids: torch.Tensor, pool_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Look ``ids`` (n, K) up in a per-position pool of teacher ids/log-probs (n, P).

    Returns (logp (n, K), known (n, K) bool); logp is meaningless where known is False.
    """
    match = ids.unsqueeze(-1) == pool_ids.unsqueeze(-2)  # (n, K, P)
    known = match.any(-1)
    first = match.to(torch.uint8).argmax(-1)  # (n, K), first matching pool slot
    return pool_logp.gather(-1, first), known
