"""A character-level ``transformers`` fast tokenizer built in code (no download).

Every printable ASCII character is a token, plus 300 filler entries that text never maps to
(V = 399), so the paper's K = 16 is 4 % of V and, as in real vocabularies, most tokens are never
plausible: a student's top-K at a confident position holds a few plausible tokens and several
near-zero ones.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, EOS, USER, ASSISTANT = "<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>"
N_FILLERS = 300
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
    fillers = [f"<|unused_{i}|>" for i in range(N_FILLERS)]
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, USER, ASSISTANT, *chars, *fillers])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS,
                                  additional_special_tokens=[USER, ASSISTANT])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-template token ids of a prompt, ending with the assistant tag."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
