"""Evaluation on held-out prompts: task accuracy (graded by data_source) and the held-out
teacher–student KL, the task-agnostic quality metric every run reports.

Held-out KL, on FIXED prompts and FIXED samples: before training, the initial student samples one
response per held-out prompt (the rollout temperature, a generator seeded by the run seed; training's
sampler is never touched) — :func:`sample_heldout`. Those token sequences are kept with the run
(in every checkpoint, so a resume scores the same ones) and every evaluation scores the SAME tokens,
so a change between evaluations is the models' change, not a change of samples. On them

- ``ta_opd/heldout/kl``: mean per-token KL(p_T ‖ p_θ) over the full vocabulary (what OPD drives
  down; ``ta_opd.kl.forward_kl``, chunked over positions);
- ``ta_opd/heldout/kl_sampled``: mean of log p_θ(y_t) − log p_T(y_t) at the sampled tokens, the
  sampled-token estimate of KL(p_θ ‖ p_T) (the quantity PG-OPD's advantage estimates). After
  training the tokens are no longer the student's own samples, so this is the sampled-token
  estimate on the initial student's samples (the full-vocabulary KL needs no samples of its own);
- ``..._lo`` / ``..._hi``: a 95 % percentile bootstrap interval over prompts
  (``ta_opd.kl.prompt_bootstrap``, seeded by the run seed).

p_θ is the student at the rollout temperature (softmax(logits / T), the distribution training
samples from and matches to the teacher, as in the training step); p_T the teacher at 1. At the
default T = 1 both are the models' own distributions.
"""

from __future__ import annotations

import torch

from ta_opd.kl import forward_kl, prompt_bootstrap
from ta_opd.rollout import Rollout, SpecialIds, generate, left_pad, rollout_logits, token_logp

KL_KEYS = ("ta_opd/heldout/kl", "ta_opd/heldout/kl_sampled")
# fewer held-out prompts than this get a warning: on the toy (docs/own_pair.md#held-out-kl) the
# bootstrap interval matched the spread across prompt subsets from 64 prompts on, and understated
# it ~7x at 8
MIN_STABLE_PROMPTS = 64


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
def sample_heldout(student, prompts: list[list[int]], special: SpecialIds, *, max_new_tokens: int,
                   temperature: float, seed: int, batch_size: int) -> dict:
    """One student sample per prompt, drawn once: ``{"prompts": [[id]], "responses": [[id]]}`` (each
    response up to and including EOS), JSON-ready so checkpoints carry it."""
    gen = torch.Generator().manual_seed(seed)
    responses: list[list[int]] = []
    for a in range(0, len(prompts), batch_size):
        ro = generate(student, prompts[a:a + batch_size], max_new_tokens=max_new_tokens, eos_id=special.eos_ids,
                      pad_id=special.pad_id, temperature=temperature, generator=gen)
        responses += [r[m].tolist() for r, m in zip(ro.responses, ro.response_mask)]
    return {"prompts": [list(p) for p in prompts], "responses": responses}


def as_rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Rollout:
    """Stored (prompt, response) id lists as a :class:`Rollout` (prompts left-padded, responses right-padded)."""
    ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(len(r) for r in responses)
    resp = torch.full((len(responses), width), pad_id, dtype=torch.long)  # (B, R)
    mask = torch.zeros((len(responses), width), dtype=torch.bool)  # (B, R)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return Rollout(input_ids=torch.cat([ids, resp], 1), attention_mask=torch.cat([prompt_mask, mask.long()], 1),
                   prompt_len=ids.shape[1], responses=resp, response_mask=mask)


@torch.no_grad()
def heldout_sums(student, teacher, samples: dict, pad_id: int, *, temperature: float, vocab_size: int,
                 batch_size: int, chunk_size: int = 8) -> dict[str, list[float]]:
    """Per prompt, on the stored samples: the summed per-token KLs and the token count
    (``{"kl": [..], "kl_sampled": [..], "tokens": [..]}``)."""
    out: dict[str, list[float]] = {"kl": [], "kl_sampled": [], "tokens": []}
    keep = [i for i, r in enumerate(samples["responses"]) if r]  # an empty response scores nothing
    for a in range(0, len(keep), batch_size):
        rows = keep[a:a + batch_size]
        ro = as_rollout([samples["prompts"][i] for i in rows], [samples["responses"][i] for i in rows], pad_id)
        valid = ro.response_mask  # (B, R)
        s = rollout_logits(student, ro, vocab_size, temperature)  # (B, R, V) at the rollout temperature
        t = rollout_logits(teacher, ro, vocab_size)  # (B, R, V)
        kl, _ = forward_kl(t[valid], s[valid], chunk_size=chunk_size)  # (N,) KL(p_T || p_θ), full vocabulary
        sampled = token_logp(s[valid], ro.responses[valid]) - token_logp(t[valid], ro.responses[valid])  # (N,)
        row = torch.arange(len(rows)).unsqueeze(-1).expand_as(valid)[valid]  # (N,) which prompt
        for name, x in (("kl", kl), ("kl_sampled", sampled)):
            out[name] += torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row, x.double()).tolist()
        out["tokens"] += valid.sum(-1).double().tolist()
    return out


def heldout_metrics(sums: dict[str, list[float]], seed: int) -> dict[str, float]:
    """Token-weighted means of :func:`heldout_sums` and their bootstrap intervals over prompts."""
    n = sum(sums["tokens"])
    m = {"ta_opd/heldout/tokens": float(n)}
    for key in KL_KEYS:
        values = sums[key.rsplit("/", 1)[1]]
        m[key] = sum(values) / n
        m[f"{key}_lo"], m[f"{key}_hi"] = prompt_bootstrap(values, sums["tokens"], seed=seed)
    return m


def heldout_change(before: dict[str, list[float]], after: dict[str, list[float]], seed: int) -> dict[str, float]:
    """After − before of the full-vocabulary held-out KL on the same tokens, with a PAIRED bootstrap
    interval (each resampled prompt contributes its before and its after)."""
    if before["tokens"] != after["tokens"]:
        raise ValueError("before and after were not scored on the same held-out tokens")
    diff = [b - a for a, b in zip(before["kl"], after["kl"])]
    lo, hi = prompt_bootstrap(diff, before["tokens"], seed=seed)
    return {"heldout_kl_change": sum(diff) / sum(before["tokens"]), "heldout_kl_change_lo": lo,
            "heldout_kl_change_hi": hi}


def heldout_kl(student, teacher, prompts: list[list[int]], special: SpecialIds, *, max_new_tokens: int,
               temperature: float, seed: int, vocab_size: int, batch_size: int, chunk_size: int = 8) -> dict[str, float]:
    """Sample once (:func:`sample_heldout`) and score (:func:`heldout_sums`): the held-out KLs of
    ``student`` on its own samples of ``prompts``, with their intervals."""
    samples = sample_heldout(student, prompts, special, max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed, batch_size=batch_size)
    sums = heldout_sums(student, teacher, samples, special.pad_id, temperature=temperature, vocab_size=vocab_size,
                        batch_size=batch_size, chunk_size=chunk_size)
    return heldout_metrics(sums, seed)
