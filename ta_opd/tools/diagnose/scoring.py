"""Per-position scoring of a context bank (paper Eq. 1, Appendix C–D).

For every response position of the frozen bank, with full-vocabulary log-softmax of θ0, θτ and
the teacher: the θ0 features (H, D, C, Ĉ for each K, teacher entropy, position) and support
proxies, the forward KLs KL(p_T ‖ p_θ0) and KL(p_T ‖ p_θτ), and the gain G = KL0 − KLτ (Eq. 1;
relative gain G / KL0 as an option column). Memory is bounded: logits are produced one batch of
sequences at a time and every V-wide computation is chunked over positions.
"""

from __future__ import annotations

import numpy as np
import torch

from ta_opd import support
from ta_opd.kl import forward_kl
from ta_opd.stats import dense_position_stats


def score_positions(theta0: torch.Tensor, theta_tau: torch.Tensor, teacher: torch.Tensor, *,
                    ks: tuple[int, ...] = (8, 16, 32), chunk_size: int = 8) -> dict[str, np.ndarray]:
    """All per-position columns for positions whose logits are given. Each input (N, V)."""
    if not (theta0.shape == theta_tau.shape == teacher.shape) or theta0.dim() != 2:
        raise ValueError(f"θ0 {tuple(theta0.shape)}, θτ {tuple(theta_tau.shape)} and teacher {tuple(teacher.shape)} "
                         "logits must all be (N, V) with the same vocabulary")
    kl0, bc = forward_kl(teacher, theta0, chunk_size=chunk_size)
    klt, _ = forward_kl(teacher, theta_tau, chunk_size=chunk_size)
    out = {"kl0": kl0.numpy(), "kl_tau": klt.numpy(), "gain": (kl0 - klt).numpy(),
           # relative gain (the authors' variant) is undefined where KL0 = 0: NaN there, never a floor
           "gain_rel": torch.where(kl0 > 0, (kl0 - klt) / kl0, torch.full_like(kl0, float("nan"))).numpy(),
           "bhattacharyya": bc.numpy()}
    for k in ks:
        st = dense_position_stats(theta0, teacher, topk=k, chunk_size=chunk_size)
        inter = support.union_slots(st.student_topk_ids, st.teacher_topk_ids).sum(-1).float()  # |S_S ∩ S_T|
        out.update({f"D_k{k}": st.D.numpy(), f"C_k{k}": st.C.numpy(), f"Chat_k{k}": st.C_hat.numpy(),
                    f"overlap_k{k}": (inter / k).numpy(), f"jaccard_k{k}": (inter / (2 * k - inter)).numpy(),
                    f"shared_teacher_mass_k{k}": st.C_hat.numpy()})
        out.setdefault("H", st.H.numpy())
        out.setdefault("teacher_H", st.teacher_H.numpy())
    return out


def _batch_rows(rows, pad_id: int, max_tokens: int):
    """[left-padded prompt | right-padded response] ids, attention mask, P, R, response lengths."""
    from ta_opd.rollout import left_pad

    prompts = [list(map(int, r["prompt_ids"])) for r in rows]
    resps = [list(map(int, r["response_ids"]))[:max_tokens] for r in rows]
    p_ids, p_mask = left_pad(prompts, pad_id)
    R = max(len(x) for x in resps)
    r_ids = torch.full((len(rows), R), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(rows), R), dtype=torch.long)
    for i, x in enumerate(resps):
        r_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        r_mask[i, :len(x)] = 1
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1], R, r_mask.bool()


@torch.no_grad()
def score_bank(bank, theta0, theta_tau, teacher, *, ks=(8, 16, 32), max_responses: int | None = None,
               max_tokens: int = 192, batch_size: int = 16, pad_id: int = 0, chunk_size: int = 8, device="cpu",
               vocab_size: int | None = None):
    """Per-position table of a context bank (a DataFrame with ta_opd.tools.diagnose.bank's schema).

    vocab_size: the tokenizers' shared vocabulary (``ta_opd.vocab.shared_vocab_size``, checked id
    by id); logits are sliced to it, so logit padding rows may differ between the models. None:
    the three models' logit widths must be equal and are taken as the vocabulary."""
    import pandas as pd

    from ta_opd.rollout import response_logits

    vocab = {name: m.config.vocab_size for name, m in (("θ0", theta0), ("θτ", theta_tau), ("teacher", teacher))}
    if vocab_size is None and len(set(vocab.values())) != 1:
        raise ValueError(f"models have different vocabularies (logit widths {vocab}); the diagnostic needs one")
    if vocab_size is not None and min(vocab.values()) < vocab_size:
        raise ValueError(f"logit widths {vocab} are below the shared tokenizer vocabulary {vocab_size}")
    V = vocab_size or next(iter(vocab.values()))
    rows = bank.to_dict("records")[: max_responses or None]
    top = max((max(map(int, r["prompt_ids"]), default=0), max(map(int, r["response_ids"]), default=0))
              for r in rows)
    if max(top) >= V:
        raise ValueError(f"bank holds token id {max(top)} but the models' vocabulary has {V} ids: "
                         "bank and models use different vocabularies")
    tables = []
    for a in range(0, len(rows), batch_size):
        chunk = rows[a:a + batch_size]
        ids, mask, P, R, valid = _batch_rows(chunk, pad_id, max_tokens)
        ids, mask = ids.to(device), mask.to(device)
        logits = [response_logits(m, ids, mask, P, R, V)[valid.to(device)].float().cpu()
                  for m in (theta0, theta_tau, teacher)]  # 3 x (N, V)
        cols = score_positions(*logits, ks=ks, chunk_size=chunk_size)
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        lengths = valid.sum(1)
        cols["prompt_id"] = np.array([str(chunk[int(b)]["prompt_id"]) for b in b_idx])
        cols["response_index"] = (b_idx + a).numpy()
        cols["position"] = t_idx.numpy()
        cols["position_norm"] = (t_idx.float() / lengths[b_idx].float()).numpy()
        cols["token_id"] = ids[:, P:][valid].cpu().numpy()
        tables.append(pd.DataFrame(cols))
    return pd.concat(tables, ignore_index=True)
