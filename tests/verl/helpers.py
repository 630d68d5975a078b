"""Tiny models and rollout-shaped batches for the verl-adapter tests (no hub, no GPU)."""

from __future__ import annotations

import torch

VOCAB = 96  # tokenizer vocabulary; the models get padding rows beyond it


def tiny_qwen3(path, *, seed: int, vocab_rows: int = 104, hidden: int = 32, layers: int = 2):
    """A random Qwen3 causal LM saved to ``path`` (logit rows >= VOCAB are padding rows)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=128, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def rollout_batch(*, B: int = 6, P: int = 5, R: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """verl's left/right-padded rollout layout: [left-padded prompt P | right-padded response R]."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, P + 1, (B,), generator=g)
    resp_lens = torch.randint(1, R + 1, (B,), generator=g)
    prompts = torch.randint(0, VOCAB, (B, P), generator=g)
    responses = torch.randint(0, VOCAB, (B, R), generator=g)
    pm = torch.arange(P).unsqueeze(0) >= (P - prompt_lens).unsqueeze(1)
    rm = torch.arange(R).unsqueeze(0) < resp_lens.unsqueeze(1)
    prompts = torch.where(pm, prompts, torch.zeros_like(prompts))
    responses = torch.where(rm, responses, torch.zeros_like(responses))
    attention_mask = torch.cat([pm, rm], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": rm.long(),
    }
