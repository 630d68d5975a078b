"""Evaluation on held-out prompts: task accuracy (graded by data_source) and the held-out
teacher–student KL, the task-agnostic quality metric every run reports.

Held-out KL: the student samples one response per validation prompt (the rollout temperature, a
generator seeded by the run seed afresh at every evaluation, so before/after see the same random
stream and training's sampler is never touched); on those contexts

- ``ta_opd/heldout/kl``: mean per-token KL(p_T ‖ p_θ) over the full vocabulary (what OPD drives
  down; ``ta_opd.kl.forward_kl``, chunked over positions);
- ``ta_opd/heldout/kl_sampled``: mean of log p_θ(y_t) − log p_T(y_t) at the sampled tokens, the
  sampled-token estimate of KL(p_θ ‖ p_T) (the quantity PG-OPD's advantage estimates).

p_θ is the student at the rollout temperature (softmax(logits / T), the distribution training
samples from and matches to the teacher, as in the training step); p_T the teacher at 1. At the
default T = 1 both are the models' own distributions.
"""

from __future__ import annotations

import torch

from ta_opd.kl import forward_kl
from ta_opd.rollout import SpecialIds, generate, rollout_logits, token_logp


@torch.no_grad()
def greedy_texts(model, tokenizer, prompts: list[list[int]], special: SpecialIds, *, max_new_tokens: int,
                 batch_size: int) -> list[str]:
    """Greedy responses (decoded, special tokens skipped) for token-id prompts."""
    out: list[str] = []
    for a in range(0, len(prompts), batch_size):
        ro = generate(model, prompts[a:a + batch_size], max_new_tokens=max_new_tokens, eos_id=special.eos_ids,
                      pad_id=special.pad_id, temperature=0.0)
        out += tokenizer.batch_decode(ro.responses, skip_special_tokens=True)
    return out


@torch.no_grad()
def heldout_kl(student, teacher, prompts: list[list[int]], special: SpecialIds, *, max_new_tokens: int,
               temperature: float, seed: int, vocab_size: int, batch_size: int,
               chunk_size: int = 8) -> dict[str, float]:
    """Mean per-token held-out KLs on student samples of ``prompts`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    kl_sum, sampled_sum, n = 0.0, 0.0, 0
    for a in range(0, len(prompts), batch_size):
        ro = generate(student, prompts[a:a + batch_size], max_new_tokens=max_new_tokens, eos_id=special.eos_ids,
                      pad_id=special.pad_id, temperature=temperature, generator=gen)
        valid = ro.response_mask
        y = ro.responses[valid]  # (N,)
        s = rollout_logits(student, ro, vocab_size, temperature)[valid]  # (N, V) at the rollout temperature
        t = rollout_logits(teacher, ro, vocab_size)[valid]  # (N, V)
        kl, _ = forward_kl(t, s, chunk_size=chunk_size)  # (N,) KL(p_T || p_θ), full vocabulary
        kl_sum += float(kl.double().sum())
        sampled_sum += float((token_logp(s, y) - token_logp(t, y)).double().sum())
        n += int(y.numel())
    return {"ta_opd/heldout/kl": kl_sum / n, "ta_opd/heldout/kl_sampled": sampled_sum / n,
            "ta_opd/heldout/tokens": float(n)}
