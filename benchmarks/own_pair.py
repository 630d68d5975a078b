"""Build an "own" teacher-student pair from config, as a new user's pair looks: a byte-level BPE
tokenizer trained here with the `tokenizers` library (no pad token, a ChatML chat template, EOS a
list in generation_config.json), Llama-architecture models saved as Hugging Face folders, and
GSM8K-style prompts in verl's parquet layout (``data_source = "openai/gsm8k"``, answers scored
by verl's ``#### <number>`` rule). Nothing is downloaded.

Used by the acceptance test (tiny sizes, a few SFT steps so greedy answers score) and by
``benchmarks/bench_own_pair.py`` (a ~100M-parameter student, a ~135M teacher, a 49,152-token
vocabulary: the shape of a SmolLM-135M pair).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

IM_START, IM_END, END_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n{% endfor %}"
    "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)
DATA_SOURCE = "openai/gsm8k"

# SmolLM-135M's shape (30 layers); the student keeps 20 of them (~2/3), as a pruned student would
SMOL_ARCH = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class OwnPair:
    student: Path
    teacher: Path
    train_file: Path
    val_file: Path


def problem(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"Tom has {a} apples and buys {b} more. How many apples does he have?", \
        f"He has {a} + {b} = {a + b} apples.\n#### {a + b}", str(a + b)


def build_tokenizer(vocab_size: int, corpus: list[str]):
    """Byte-level BPE trained on ``corpus``, padded with never-produced entries to ``vocab_size``
    (a real vocabulary's size, without training on a real corpus). No pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(vocab_size, 1000), special_tokens=[
        END_TEXT, IM_START, IM_END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    spec = json.loads(core.to_str())
    vocab = spec["model"]["vocab"]
    while len(vocab) < vocab_size:  # entries no merge reaches: never produced by encoding
        vocab[f"ĠunusedĠ{len(vocab)}"] = len(vocab)
    core = Tokenizer.from_str(json.dumps(spec))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=IM_END, bos_token=None, unk_token=None)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_pair(out: Path, *, vocab_size: int = 512, arch: dict = TINY_ARCH, teacher_layers: int = 3,
               student_layers: int = 2, n_train: int = 64, n_val: int = 16, sft_steps: int = 0, seed: int = 0,
               max_len: int = 512, val_from_train: bool = False) -> OwnPair:
    """Tokenizer, Llama teacher and student (saved with the tokenizer), train/val parquet. With
    ``sft_steps`` > 0 both models are fine-tuned on the solutions (so greedy answers can score)."""
    import pandas as pd
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from ta_opd.rollout import encode_prompt
    from ta_opd.tools.toy.models import SFTExample, sft

    rng = random.Random(seed)
    probs = [problem(rng) for _ in range(n_train + n_val)]
    tok = build_tokenizer(vocab_size, [q + "\n" + s for q, s, _ in probs] * 4)
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    # validation problems are seen in training when ``val_from_train`` (a pipeline test wants
    # answers that score), else held out
    val = probs[:n_val] if val_from_train else probs[n_train:]
    for name, part in (("train", probs[:n_train]), ("val", val)):
        rows = [{"data_source": DATA_SOURCE, "prompt": [{"role": "user", "content": q}], "ability": "math",
                 "reward_model": {"style": "rule", "ground_truth": gt}, "extra_info": {"split": name, "index": i}}
                for i, (q, _, gt) in enumerate(part)]
        pd.DataFrame(rows).to_parquet(out / "data" / f"{name}.parquet")
    eos = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(END_TEXT)]
    examples = [SFTExample(encode_prompt(tok, [{"role": "user", "content": q}]),
                           tok(s, add_special_tokens=False)["input_ids"] + [eos[0]]) for q, s, _ in probs[:n_train]]
    paths = {}
    for name, layers, s in (("teacher", teacher_layers, seed), ("student", student_layers, seed + 1)):
        torch.manual_seed(s)
        cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, max_position_embeddings=max_len,
                          tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos, pad_token_id=None, **arch)
        model = LlamaForCausalLM(cfg)
        if sft_steps:
            sft(model, examples, steps=sft_steps, batch_size=min(16, n_train), lr=3e-3, seed=s, pad_id=eos[0])
        model.generation_config = GenerationConfig(eos_token_id=eos, bos_token_id=None)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        paths[name] = out / name
    return OwnPair(paths["student"], paths["teacher"], out / "data" / "train.parquet", out / "data" / "val.parquet")
