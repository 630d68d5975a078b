"""A character-level ``transformers`` fast tokenizer built in code (no download).

Every printable ASCII character is a token (V ≈ 100 with the specials), so K = 8 is well below V
and most tokens are never used by the task: as in real vocabularies, a student's top-K at a
confident position holds a few plausible tokens and several near-zero ones.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, EOS, USER, ASSISTANT = "<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, USER, ASSISTANT, *chars])}
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
