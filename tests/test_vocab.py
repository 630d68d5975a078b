"""Shared-vocabulary check: padding-only differences accepted, real mismatches named."""

import pytest

from ta_opd.errors import TAConfigError
from ta_opd.vocab import shared_vocab_size

VOCAB = {f"t{i}": i for i in range(10)}


def test_padding_only_difference_is_accepted():
    assert shared_vocab_size(VOCAB, dict(VOCAB), student_logits=10, teacher_logits=16) == 10
    # the real-world case: Qwen2.5-style 152,064 logits for a 151,936-token tokenizer
    big = {f"t{i}": i for i in range(151936)}
    assert shared_vocab_size(big, dict(big), student_logits=151936, teacher_logits=152064) == 151936


def test_real_mismatch_names_first_ids():
    other = dict(VOCAB)
    other["x7"] = other.pop("t7")
    with pytest.raises(TAConfigError, match=r"differ at 1 id\(s\); first: id 7: student 't7' vs teacher 'x7'"):
        shared_vocab_size(VOCAB, other, student_logits=10, teacher_logits=10)
    extra = {**VOCAB, "new": 10}
    with pytest.raises(TAConfigError, match="id 10: student None vs teacher 'new'"):
        shared_vocab_size(VOCAB, extra, student_logits=11, teacher_logits=11)
    with pytest.raises(TAConfigError, match="teacher has 9 logits, fewer than the tokenizer's 10 tokens"):
        shared_vocab_size(VOCAB, dict(VOCAB), student_logits=10, teacher_logits=9)


def test_explicitly_allowed_ids_may_differ_but_must_exist():
    other = dict(VOCAB)
    other["x7"] = other.pop("t7")
    assert shared_vocab_size(VOCAB, other, student_logits=10, teacher_logits=10, allowed_mismatch_ids={7}) == 10
    with pytest.raises(TAConfigError, match=r"vocab_mismatch_ok_ids lists id\(s\) \[12\] that are not in both tokenizers"):
        shared_vocab_size(VOCAB, other, student_logits=10, teacher_logits=10, allowed_mismatch_ids={7, 12})
