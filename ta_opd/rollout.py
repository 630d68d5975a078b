"""Sampling from a Hugging Face causal LM and the logits <-> tokens alignment, written once.

Used by the CPU backend (rollouts, evaluation), the toy build (SFT batches, greedy accuracy), the
fixed-context diagnostic (bank sampling and re-scoring) and the verl adapter (response rows of
verl's full-sequence fields).

Layout and alignment. A batch row is ``[left-padded prompt (P) | response (R)]``: the prompt
block is left-padded to the width P of the longest prompt, the response block is right-padded
after the end-of-sequence token. The logits at position ``P - 1 + t`` score response token ``t``
(a causal LM's logits at position i predict token i + 1), so the response logits of a
full-sequence tensor are ``x[:, P - 1 : P - 1 + R]`` (:func:`response_slice`). Position ids skip
the left padding (:func:`position_ids`), so a left-padded row gets the same logits as the
unpadded sequence (tested against an unbatched forward).

Logits at some positions only (:func:`rollout_logits_at`, the update on the kept positions):
rows with no needed position are dropped, the batch is cut after the last needed column, and
the output embedding runs on the needed hidden states only (``ta_opd.kept_rows``).

Sampling is plain softmax sampling at the given temperature (no top-k / top-p filtering, the
paper's setting), greedy when ``temperature == 0``, with a KV cache; a row stops at any of the
end-of-sequence ids (a model's ``generation_config.eos_token_id`` may be a list) or after
``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ta_opd.errors import TAConfigError, TAInputError
from ta_opd.kept_rows import plan_kept_rows


@dataclass(frozen=True)
class Rollout:
    input_ids: torch.Tensor  # (B, P + R) left-padded prompt followed by the response
    attention_mask: torch.Tensor  # (B, P + R) 1 on prompt and response tokens (EOS included)
    prompt_len: int  # P, width of the left-padded prompt block
    responses: torch.Tensor  # (B, R) response tokens, pad after EOS
    response_mask: torch.Tensor  # (B, R) bool, tokens up to and including EOS


@dataclass(frozen=True)
class SpecialIds:
    """What generation needs from a tokenizer and a model's generation config."""

    pad_id: int  # fills left padding and finished rows (masked out everywhere)
    eos_ids: tuple[int, ...]  # a row stops at any of these
    pad_is_eos: bool  # the tokenizer has no pad token: the first EOS id pads


def special_ids(tokenizer, generation_config=None, *, name: str = "model") -> SpecialIds:
    """EOS ids = the generation config's ``eos_token_id`` (an int or a list) plus the tokenizer's
    EOS; pad = the tokenizer's pad token, else the first EOS id. Neither EOS: TAConfigError."""
    eos: list[int] = []
    gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for x in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [tokenizer.eos_token_id]:
        if x is not None and int(x) not in eos:
            eos.append(int(x))
    if not eos:
        raise TAConfigError(f"{name}: neither the tokenizer nor generation_config.json defines an end-of-sequence "
                            "token (eos_token_id); set eos_token in the tokenizer or eos_token_id in "
                            "generation_config.json")
    pad = tokenizer.pad_token_id
    return SpecialIds(pad_id=int(pad) if pad is not None else eos[0], eos_ids=tuple(eos), pad_is_eos=pad is None)


def encode_prompt(tokenizer, messages, *, where: str = "prompt", chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a chat-message prompt through the tokenizer's chat template, ending with the
    assistant's generation prompt (verl's convention for chat-list prompts). ``where`` names the
    row in errors."""
    if isinstance(messages, str) or not isinstance(messages, Sequence) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise TAInputError(f"{where}: the prompt must be a list of chat messages "
                           f"[{{'role': 'user', 'content': ...}}, ...] (verl's layout), got {str(messages)[:80]!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise TAConfigError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                            "chat-message prompts need one (tokenizer_config.json: chat_template)")
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                        **(chat_template_kwargs or {}))
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, both (B, P) with P the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token. (B, S) -> (B, S)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def response_slice(prompt_len: int, response_len: int) -> slice:
    """Columns of a full-sequence (B, P + R, ...) tensor of per-position model outputs (logits,
    top-K ids, log-probs) that score the R response tokens: P - 1 ... P + R - 2."""
    if prompt_len < 1:
        raise TAInputError(f"prompt_len={prompt_len}: a response needs at least one prompt token before it")
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    response_len: int, vocab_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """(B, R, V) logits scoring each response token of ``[left-padded prompt (P) | response (R)]``
    rows, sliced to the tokenizer's ``vocab_size`` when given (models may carry logit padding rows),
    divided by ``temperature`` (> 0): the logits of the distribution sampled at that temperature,
    as verl's actor scores its rollouts."""
    if not temperature > 0:
        raise TAConfigError(f"temperature={temperature} is not allowed for scoring; it must be > 0 (a model's "
                            "distribution at temperature 0 is not defined)")
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return _as_scored(out.logits[:, response_slice(prompt_len, response_len)], vocab_size, temperature)


# Config attributes by which a model's LM head post-processes its logits (Gemma's soft-capping,
# Cohere's scale, Granite's divisor): its decoder + output embedding alone would not give its logits.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def kept_rows_supported(model) -> bool:
    """True when ``model``'s logits are its output embedding applied to its decoder's last hidden
    state (Llama, Qwen2/3, Mistral, SmolLM...), so :func:`rollout_logits_at` reproduces them."""
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESSING):
        return False
    return callable(getattr(model, "get_decoder", None)) and callable(getattr(model, "get_output_embeddings", None)) \
        and model.get_output_embeddings() is not None and model.get_decoder() is not model


def rollout_logits_at(model, ro: Rollout, rows: torch.Tensor, vocab_size: int | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """(n, V) logits at the response positions ``rows`` ((B, R) bool, n = rows.sum(), row-major
    order), equal to ``rollout_logits(...)[rows]`` at a fraction of the cost: the rows of the
    batch with no position in ``rows`` are dropped, the rest cut after the last column any of them
    needs (the kept-rows plan, ``ta_opd.kept_rows``, on the padded batch as B sequences of width
    P + R), and the output embedding runs on the n needed hidden states only. Needs
    :func:`kept_rows_supported`. With n = 0 no forward runs and a (0, V) tensor is returned."""
    if not temperature > 0:
        raise TAConfigError(f"temperature={temperature} is not allowed for scoring; it must be > 0 (a model's "
                            "distribution at temperature 0 is not defined)")
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or rows.shape != ro.responses.shape:
        raise TAInputError(f"rows must be a (B, R) = {tuple(ro.responses.shape)} bool tensor of response positions, "
                           f"got {getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
    if not kept_rows_supported(model):
        raise TAInputError(f"{type(model).__name__} post-processes its logits or has no separate decoder and output "
                           "embedding; score it with rollout_logits")
    n_seq, width = ro.input_ids.shape
    head = model.get_output_embeddings()
    out_dim = head.weight.shape[0] if vocab_size is None else vocab_size
    if not bool(rows.any()):
        return head.weight.new_zeros((0, out_dim))
    need = torch.zeros(n_seq, width, dtype=torch.bool, device=rows.device)  # (B, P + R) rows whose logits are read
    need[:, response_slice(ro.prompt_len, ro.responses.shape[1])] = rows
    plan = plan_kept_rows(torch.arange(n_seq + 1, device=rows.device) * width, need.flatten())
    seqs, cut = plan.kept_sequences, int(plan.lengths.max())  # (B',), the widest cut
    ids, mask = ro.input_ids[seqs, :cut], ro.attention_mask[seqs, :cut]  # (B', L): causal, so the cut is exact
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                 use_cache=False).last_hidden_state  # (B', L, H)
    rank = (plan.lengths > 0).long().cumsum(0) - 1  # (B,) row of each kept sequence in the trimmed batch
    h = hidden[rank[plan.orig_rows // width], plan.orig_rows % width]  # (n, H)
    return _as_scored(head(h), vocab_size, temperature)


def _as_scored(logits: torch.Tensor, vocab_size: int | None, temperature: float) -> torch.Tensor:
    """Logits sliced to the tokenizer's ``vocab_size`` (when given), divided by ``temperature``."""
    logits = logits if vocab_size is None else logits[..., :vocab_size]
    return logits if temperature == 1 else logits / temperature


def rollout_logits(model, ro: Rollout, vocab_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """(B, R, V) response logits of a :class:`Rollout` at ``temperature`` (see :func:`response_logits`)."""
    return response_logits(model, ro.input_ids, ro.attention_mask, ro.prompt_len, ro.responses.shape[1], vocab_size,
                           temperature)


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position in fp32, without a (..., V) log-prob tensor.
    logits (..., V), tokens (...) -> (...)."""
    lf = logits.float()
    return lf.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lf, dim=-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
    """Sample responses for token-id prompts; a row stops at any id in ``eos_id`` or after
    ``max_new_tokens``. Only ``generator`` is consumed (never torch's global RNG)."""
    if temperature < 0:
        raise TAConfigError(f"temperature={temperature} is not allowed; it must be >= 0 (0 = greedy)")
    if max_new_tokens < 1:
        raise TAConfigError(f"max_new_tokens={max_new_tokens} is not allowed; it must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TAInputError("generate needs at least one prompt, and every prompt at least one token")
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long)
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
        done = done | (live & torch.isin(tok, eos))
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


__all__ = ["Rollout", "SpecialIds", "special_ids", "encode_prompt", "left_pad", "position_ids", "response_slice",
           "response_logits", "rollout_logits", "kept_rows_supported", "rollout_logits_at", "token_logp",
           "generate"]
