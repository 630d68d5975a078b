"""A character-level ``transformers`` fast tokenizer built in code (no download).

Every printable ASCII character is a token, plus 300 filler entries that the toy's text never
maps to (V = 399), so the paper's K = 16 is 4 % of V and, as in real vocabularies, most tokens are
never plausible: a student's top-K at a confident position holds a few plausible tokens and
several near-zero ones.

The last two fillers are ``"\n"`` and ``<|im_end|>``: verl's agent loop (``model_type`` qwen3,
``verl/utils/tokenizer/continuous_token.py``) requires that a newline encodes to one token and
that ``<|im_end|>`` exists. The toy task never writes either, so the toy pair is unchanged by them.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, EOS, USER, ASSISTANT = "<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>"
N_FILLERS = 300
VERL_TOKENS = ("\n", "<|im_end|>")  # take the places of the last fillers (same V, same ids otherwise)
VERSION = 2  # hashed into the toy cache key: 2 = VERL_TOKENS added
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
    fillers = [f"<|unused_{i}|>" for i in range(N_FILLERS - len(VERL_TOKENS))] + list(VERL_TOKENS)
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, USER, ASSISTANT, *chars, *fillers])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS,
                                  additional_special_tokens=[USER, ASSISTANT])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok
