"""What the teacher ships per response position (spec: "Exactness"), from its logits, chunked.

Used by the CPU backend's teacher and the verl FSDP teacher worker alike, so both backends
produce the same batch fields: top-K' ids (int32) and log-probs, the log-prob of the sampled
token, and the teacher entropy. Extra memory is O(chunk x V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ta_opd import support
from ta_opd._checks import check_ids, check_tensor, is_int
from ta_opd.errors import TAInputError


@dataclass(frozen=True)
class TeacherOutputs:
    topk_ids: torch.Tensor  # (..., K') int32, descending teacher probability
    topk_logp: torch.Tensor  # (..., K') full-vocabulary log-probs at those ids (dtype as asked)
    sampled_logp: torch.Tensor  # (...) fp32 log p_T(y_t)
    entropy: torch.Tensor  # (...) fp32 teacher entropy
    extra_logp: torch.Tensor | None = None  # (..., M) fp32 log-probs at requested ids


def teacher_outputs(logits: torch.Tensor, sampled_ids: torch.Tensor, *, teacher_topk: int,
                    extra_ids: torch.Tensor | None = None, chunk_size: int = 8,
                    logp_dtype: torch.dtype = torch.float32) -> TeacherOutputs:
    """logits: (..., V) teacher logits at response positions (already aligned: the logits that
    score token y_t). sampled_ids: (...) the sampled tokens. extra_ids: optional (..., M) ids
    whose teacher log-probs are also wanted (e.g. the student's top-K, for exact C)."""
    check_tensor("teacher logits", logits, floating=True)
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    check_tensor("sampled_ids", sampled_ids, floating=False)
    if sampled_ids.shape != lead:
        raise TAInputError(f"sampled_ids has shape {tuple(sampled_ids.shape)}, expected {tuple(lead)}")
    if not is_int(teacher_topk) or not (1 <= teacher_topk <= vocab):
        raise TAInputError(f"teacher_topk={teacher_topk!r} is not allowed; K' must be an integer in [1, V={vocab}]")
    check_ids("sampled_ids", sampled_ids, vocab)
    if extra_ids is not None:
        check_tensor("extra_ids", extra_ids, floating=False)
        if extra_ids.shape[:-1] != lead:
            raise TAInputError(f"extra_ids has shape {tuple(extra_ids.shape)}, expected {tuple(lead)} + (M,)")
        check_ids("extra_ids", extra_ids, vocab)
    x2 = logits.reshape(-1, vocab)
    n = x2.shape[0]
    y = sampled_ids.reshape(n, 1).long()
    ex = extra_ids.reshape(n, -1).long() if extra_ids is not None else None
    ids = torch.empty(n, teacher_topk, dtype=torch.int32, device=logits.device)
    lp = torch.empty(n, teacher_topk, dtype=torch.float32, device=logits.device)
    sampled = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n, dtype=torch.float32, device=logits.device)
    extra = torch.empty(n, ex.shape[1], dtype=torch.float32, device=logits.device) if ex is not None else None
    ws = support.Workspace(min(chunk_size, max(n, 1)), vocab, logits.device, n_buffers=3)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        x = support.as_fp32(x2[a:b], ws.get(0, b - a))
        logp = support.log_softmax_into(x, ws.get(1, b - a))  # (n, V)
        if bool(torch.isnan(logp[:, 0]).any()):
            raise TAInputError(f"teacher logits at flattened position {a + int(torch.isnan(logp[:, 0]).nonzero()[0, 0])} "
                               "contain NaN or +inf")
        v, i = logp.topk(teacher_topk, dim=-1)  # (n, K') each
        ids[a:b], lp[a:b] = i.int(), v
        sampled[a:b] = logp.gather(-1, y[a:b]).squeeze(-1)
        ent[a:b] = support.entropy_from_logp(logp, ws.get(2, b - a))
        if extra is not None:
            extra[a:b] = logp.gather(-1, ex[a:b])
    return TeacherOutputs(
        topk_ids=ids.reshape(*lead, teacher_topk), topk_logp=lp.to(logp_dtype).reshape(*lead, teacher_topk),
        sampled_logp=sampled.reshape(lead), entropy=ent.reshape(lead),
        extra_logp=None if extra is None else extra.reshape(*lead, -1))


def sampled_logp_from_topk(topk_ids: torch.Tensor, topk_logp: torch.Tensor, sampled_ids: torch.Tensor,
                           vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_T(y_t) when the teacher shipped only its top-K' (e.g. an inference server's
    ``prompt_logprobs``). topk_ids/topk_logp: (..., K'); sampled_ids: (...).

    Where y_t is among the K' ids the value is exact. Elsewhere it is the same documented point
    value the statistics use for a missing teacher probability: the remaining mass spread evenly
    over the V - K' ids outside the top-K', log(R / (V - K')) (if R rounds to <= 0, R is taken
    as the K'-th shipped probability). Returns (logp (...) fp32,
    known (...) bool) so callers can report how often the point value was used.
    """
    check_tensor("topk_logp", topk_logp, floating=True)
    check_tensor("sampled_ids", sampled_ids, floating=False)
    if topk_ids.shape != topk_logp.shape or topk_ids.shape[:-1] != sampled_ids.shape:
        raise TAInputError(f"topk_ids {tuple(topk_ids.shape)}, topk_logp {tuple(topk_logp.shape)} and sampled_ids "
                           f"{tuple(sampled_ids.shape)} must be (..., K'), (..., K') and (...)")
    k_prime = topk_ids.shape[-1]
    if not (1 <= k_prime < vocab_size):
        raise TAInputError(f"K'={k_prime} must be in [1, V) with V={vocab_size}")
    check_ids("topk_ids", topk_ids, vocab_size)
    check_ids("sampled_ids", sampled_ids, vocab_size)
    lp = topk_logp.float()
    match = topk_ids.long() == sampled_ids.long().unsqueeze(-1)  # (..., K')
    known = match.any(-1)
    exact = torch.where(match, lp, torch.zeros_like(lp)).sum(-1)
    tail = 1.0 - lp.exp().sum(-1)
    # Shipped mass that rounds to >= 1 (bf16 log-probs) leaves no measurable tail; the point value
    # then takes the tail as one more K'-th-sized probability (the interval's upper end per id).
    tail = torch.where(tail > 0, tail, lp.min(-1).values.exp())
    fill = (tail / (vocab_size - k_prime)).log()
    return torch.where(known, exact, fill), known
