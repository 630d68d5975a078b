"""The toy pair as verl's agent loop can read it.

verl 0.9.1's agent loop picks a "continuous token" builder from ``config.json``'s
``model_type``; for ``qwen3`` it is ``QwenContinuousTokenBuilder``
(``verl/utils/tokenizer/continuous_token.py``, ``__init__``), which requires that ``"\\n"``
encodes to ONE token and that ``<|im_end|>`` is a token. The toy character tokenizer has
neither (it drops ``\\n`` and has no ChatML tokens), so the first rollout fails with
``WordLevel error: Missing [UNK] token from the vocabulary`` — on a GPU as well (the smoke pair
of ``launch/make_smoke_pair.py`` shares the toy tokenizer). Until the toy tokenizer defines
them, this copy renames its last two filler entries (ids no text maps to) to ``\\n`` and
``<|im_end|>``: same V, same ids for every other token, models untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

NEEDED = ("\n", "<|im_end|>")


def _has_needed(tok) -> bool:
    try:
        newline = tok.encode("\n", add_special_tokens=False)
    except Exception:  # noqa: BLE001 - the tokenizers library raises a bare Exception for unknown text
        return False
    return len(newline) == 1 and tok.convert_tokens_to_ids("<|im_end|>") is not None


def verl_ready_copy(model_dir: str | Path, out_dir: str | Path) -> str:
    """A copy of ``model_dir`` whose tokenizer defines ``\\n`` and ``<|im_end|>`` (a plain copy when
    it already does)."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    if _has_needed(AutoTokenizer.from_pretrained(out)):
        return str(out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    fillers = sorted((i, t) for t, i in vocab.items() if t.startswith("<|unused_"))
    if len(fillers) < len(NEEDED) or any(t in vocab for t in NEEDED):
        raise ValueError(f"{model_dir}: cannot rename fillers to {NEEDED!r}")
    for (i, old), new in zip(fillers[-len(NEEDED):], NEEDED):
        del vocab[old]
        vocab[new] = i
    (out / "tokenizer.json").write_text(json.dumps(spec))
    if not _has_needed(AutoTokenizer.from_pretrained(out)):
        raise ValueError(f"{out}: the renamed tokenizer still lacks {NEEDED!r}")
    return str(out)
