"""Task accuracy of a model on problems of ``ta_opd.tools.real_pair.task``: greedy, or one sample
per problem at a temperature, through the same sampler as the CPU backend (``ta_opd.rollout``)."""

from __future__ import annotations

import time

import torch

from ta_opd.tools.real_pair import task


@torch.no_grad()
def evaluate(model, tok, problems: list[task.Problem], *, temperature: float, seed: int, batch_size: int,
             max_new_tokens: int) -> dict:
    """Share of ``problems`` answered right: greedy (temperature 0) or one sample each at ``temperature``."""
    from ta_opd.rollout import encode_prompt, generate, special_ids

    ids = special_ids(tok, model.generation_config)
    gen, correct, samples, t0 = torch.Generator().manual_seed(seed), 0, [], time.time()
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [encode_prompt(tok, [{"role": "user", "content": p.prompt}]) for p in chunk]
        ro = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=ids.eos_ids, pad_id=ids.pad_id,
                      temperature=temperature, generator=gen)
        texts = tok.batch_decode(ro.responses, skip_special_tokens=True)
        correct += sum(task.is_correct(t, p.answer) for t, p in zip(texts, chunk))
        samples += [{"prompt": p.prompt, "response": t, "answer": p.answer} for t, p in zip(texts, chunk)][:3 - len(samples)]
    return {"accuracy": correct / len(problems), "correct": correct, "n": len(problems), "temperature": temperature,
            "max_new_tokens": max_new_tokens, "seconds": time.time() - t0, "samples": samples}
