"""Build the tiny teacher/student pair and data of the 1-GPU smoke run (seconds, CPU, no download).

    python launch/make_smoke_pair.py OUT_DIR

Writes OUT_DIR/{student,teacher} (random-init Qwen3 models built from config, sharing the toy
character tokenizer; the student has exactly the tokenizer's 399 logit rows, so its rollout never
samples an id outside the tokenizer; the teacher has 17 padding rows beyond them, so the run
exercises the vocabulary slicing) and OUT_DIR/data/{train,val}.parquet (the toy addition task, verl's RL
layout). Head dim 64 keeps vLLM's attention kernels on a supported size. The models are untrained:
the smoke run checks the pipeline (rollout, teacher, statistics, selection, update, checkpoint),
not learning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ARCH = {
    "student": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=64),
    "teacher": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64),
}
LOGIT_ROWS = {"student": 399, "teacher": 416}  # the tokenizer's 399 tokens; the teacher + 17 padding rows


def build(out: Path, n_train: int = 512, n_val: int = 64, seed: int = 0) -> dict[str, str]:
    import pandas as pd
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ta_opd.tools.toy import task
    from ta_opd.tools.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    assert len(tok) == LOGIT_ROWS["student"], f"toy tokenizer has {len(tok)} tokens, the smoke student {LOGIT_ROWS}"
    paths = {}
    for i, (role, arch) in enumerate(ARCH.items()):
        torch.manual_seed(seed + i)
        cfg = Qwen3Config(vocab_size=LOGIT_ROWS[role], max_position_embeddings=512, tie_word_embeddings=False,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          **arch)
        path = out / role
        Qwen3ForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths[role] = str(path)
    (out / "data").mkdir(parents=True, exist_ok=True)
    train = task.make_split(n_train, seed, min_digits=2, max_digits=2)
    val = task.make_split(n_val, seed + 1, exclude={p.prompt for p in train}, min_digits=2, max_digits=2)
    for name, probs in (("train", train), ("val", val)):
        pd.DataFrame(task.to_rows(probs, name)).to_parquet(out / "data" / f"{name}.parquet")
        paths[name] = str(out / "data" / f"{name}.parquet")
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    for k, v in build(args.out).items():
        print(f"{k}={v}")


if __name__ == "__main__":
    main()
