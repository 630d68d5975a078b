"""Small kernels on top-K supports, shared by the dense and the sparse statistics paths.

Shape vocabulary: n positions in a chunk, V vocabulary, K support size, M = 2K union slots,
P = K' (+ extra) teacher ids shipped per position.
"""

from __future__ import annotations

import torch


def student_pass(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cache-friendly pass over a chunk of student logits (or log-probs).

    x: (n, V) fp32. Returns log Z (n,), full-vocabulary entropy H (n,), and the top-K logits
    and ids (n, K) each. Uses H = log Z' - sum_v e_v d_v / Z' with d = x - max(x), e = exp(d),
    Z' = sum e, so no (n, V) log-prob tensor is written and no cancellation against large logits.
    """
    top_val, top_ids = x.topk(k, dim=-1)  # (n, K) each
    d = x - top_val[:, :1]  # (n, V), <= 0
    e = d.exp()  # (n, V)
    z = e.sum(-1)  # (n,)
    ed = torch.linalg.vecdot(e, d)  # (n,)  sum_v e_v d_v
    bad = torch.isnan(ed)
    if bool(bad.any()):
        # 0 * (-inf) from masked (-inf) logits; recompute those rows with the guarded form.
        ed[bad] = torch.where(e[bad] > 0, e[bad] * d[bad], torch.zeros_like(d[bad])).sum(-1)
    log_z = z.log() + top_val[:, 0]
    entropy = z.log() - ed / z
    return log_z, entropy, top_val, top_ids


def topk_entropy(top_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the renormalized top-K distribution divided by log K (the authors' variant). (n,K) -> (n,)"""
    k = top_logits.shape[-1]
    logq = torch.log_softmax(top_logits, dim=-1)
    return -(logq.exp() * logq).sum(-1) / torch.log(torch.tensor(float(k)))


def full_entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dim, with 0 log 0 = 0. (n, V) -> (n,)"""
    return torch.special.entr(logp.exp()).sum(-1)


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
