"""Teacher and student must share one vocabulary (spec: D, C and ℓ compare the same token ids).

Differences confined to logit padding rows are fine (e.g. 152,064 logits for a 151,936-token
tokenizer): logits are sliced to the tokenizer's vocabulary. Anything else is an error that names
the first mismatching ids.
"""

from __future__ import annotations

from ta_opd.errors import TAConfigError


def shared_vocab_size(student_vocab: dict[str, int], teacher_vocab: dict[str, int], *,
                      student_logits: int, teacher_logits: int, show: int = 3,
                      allowed_mismatch_ids: frozenset[int] | set[int] = frozenset()) -> int:
    """The vocabulary size V to slice both models' logits to. Raises TAConfigError on a mismatch.

    allowed_mismatch_ids: ids the user has explicitly accepted as differing in their token string
    (e.g. renamed special tokens); they must still exist on both sides.
    """
    s_inv = {i: t for t, i in student_vocab.items()}
    t_inv = {i: t for t, i in teacher_vocab.items()}
    missing = sorted(i for i in allowed_mismatch_ids if i not in s_inv or i not in t_inv)
    if missing:
        raise TAConfigError(f"vocab_mismatch_ok_ids lists id(s) {missing[:show]} that are not in both tokenizers")
    bad = sorted(i for i in set(s_inv) | set(t_inv) if s_inv.get(i) != t_inv.get(i) and i not in allowed_mismatch_ids)
    if bad:
        first = ", ".join(f"id {i}: student {s_inv.get(i)!r} vs teacher {t_inv.get(i)!r}" for i in bad[:show])
        raise TAConfigError(f"teacher and student tokenizers differ at {len(bad)} id(s); first: {first}")
    vocab = len(s_inv)
    if sorted(s_inv) != list(range(vocab)):
        raise TAConfigError(f"tokenizer ids are not contiguous 0..{vocab - 1}; cannot align logits")
    for name, width in (("student", student_logits), ("teacher", teacher_logits)):
        if width < vocab:
            raise TAConfigError(f"{name} has {width} logits, fewer than the tokenizer's {vocab} tokens")
    return vocab
