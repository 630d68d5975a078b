"""Batched sampling from a Hugging Face causal LM with a KV cache (CPU backend rollout and the
toy's greedy evaluation). Prompts are left-padded; sampling is plain softmax sampling at the
given temperature (no top-k / top-p filtering), greedy when ``temperature == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rollout:
    input_ids: torch.Tensor  # (B, P + R) left-padded prompt followed by the response
    attention_mask: torch.Tensor  # (B, P + R) 1 on prompt and response tokens (EOS included)
    prompt_len: int  # P, width of the left-padded prompt block
    responses: torch.Tensor  # (B, R) response tokens, pad after EOS
    response_mask: torch.Tensor  # (B, R) bool, tokens up to and including EOS


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token. (B, L) -> (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    response_len: int) -> torch.Tensor:
    """(B, R, V) logits scoring each response token of [left-padded prompt (P) | response (R)] rows:
    the logits at position P - 1 + t score response token t."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits[:, prompt_len - 1: prompt_len - 1 + response_len]


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
    """Sample responses for token-id prompts; stops a row at EOS or after max_new_tokens."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    model.eval()
    ids, prompt_mask = left_pad(prompts, pad_id)
    B, P = ids.shape
    mask = prompt_mask
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = mask.sum(-1, keepdim=True)  # (B, 1) position of the next token
    done = torch.zeros(B, dtype=torch.bool)
    tokens, alive = [], []
    for _ in range(max_new_tokens):
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        live = ~done  # rows still generating: this token is real
        tok = torch.where(live, tok, torch.full_like(tok, pad_id))
        tokens.append(tok)
        alive.append(live)
        done = done | (live & (tok == eos_id))
        if bool(done.all()):
            break
        mask = torch.cat([mask, live.long().unsqueeze(-1)], dim=-1)
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=mask, position_ids=next_pos,
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    responses = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = torch.stack(alive, dim=1)  # (B, R): tokens up to and including EOS
    return Rollout(input_ids=torch.cat([ids, responses], dim=1),
                   attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
                   prompt_len=P, responses=responses, response_mask=response_mask)
