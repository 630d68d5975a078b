"""The embedded toy teacher–student pair: written-out addition, a code-built tokenizer and tiny
Qwen3 models trained on CPU, so the whole TA-OPD pipeline runs with nothing downloaded."""
