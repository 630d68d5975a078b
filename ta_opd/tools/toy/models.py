"""Tiny Qwen3 teacher and student built from config, supervised fine-tuning, answer accuracy."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ta_opd.rollout import encode_prompt, generate, left_pad, position_ids
from ta_opd.tools.toy.task import Problem, is_correct

# teacher larger than student (~0.35M vs ~0.12M parameters)
TEACHER_ARCH = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24)
STUDENT_ARCH = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
MAX_LEN = 64  # prompt + response tokens; the longest toy sequence is ~45


def build_model(tokenizer, arch: dict, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=MAX_LEN, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=None, **arch)
    return Qwen3ForCausalLM(cfg)


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]
    response_ids: list[int]  # EOS included


def sft_examples(tokenizer, problems: list[Problem], render) -> list[SFTExample]:
    """render(problem) -> response text; the EOS token is appended."""
    out = []
    for p in problems:
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": p.prompt}])
        resp = tokenizer(render(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(SFTExample(prompt, resp))
    return out


def _batch(examples: list[SFTExample], pad_id: int):
    ids, mask = left_pad([e.prompt_ids + e.response_ids for e in examples], pad_id)
    labels = torch.full_like(ids, -100)
    width = ids.shape[1]
    for i, e in enumerate(examples):
        r = len(e.response_ids)
        labels[i, width - r:] = ids[i, width - r:]
    return ids, mask, labels


def sft(model, examples: list[SFTExample], *, steps: int, batch_size: int, lr: float, seed: int,
        pad_id: int, log=None) -> list[float]:
    """Next-token cross-entropy on response tokens, AdamW with cosine decay. Returns losses."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for step in range(steps):
        ids, mask, labels = _batch(rng.sample(examples, batch_size), pad_id)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 200 == 0:
            log(f"  sft step {step + 1}/{steps} loss {sum(losses[-200:]) / 200:.4f}")
    model.eval()
    return losses


@torch.no_grad()
def answer_accuracy(model, tokenizer, prompts: list[list[dict]], answers: list, *, batch_size: int = 256,
                    max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0) -> float:
    """Share of chat prompts whose response has the right final answer: greedy by default, else
    one sample per prompt at ``temperature`` (generator seeded with ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, m) for m in prompts[i:i + batch_size]]
        ro = generate(model, ids, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, temperature=temperature, generator=gen)
        texts = tokenizer.batch_decode(ro.responses, skip_special_tokens=True)
        correct += sum(is_correct(t, a) for t, a in zip(texts, answers[i:i + batch_size]))
    return correct / len(prompts)
