"""The context bank: frozen student-generated contexts (paper Appendix C), stored as parquet.

Schema, one row per response:
    prompt_id      str        the prompt (clustering unit of the bootstrap)
    prompt_ids     list[int]  chat-templated prompt tokens
    prompt_len     int        len(prompt_ids)
    response_ids   list[int]  sampled response tokens (EOS included when emitted), capped
    response       str        decoded response
    label          str        ground truth (may be empty)
    sampled_logp   list[float] the sampling student's log-prob of each response token
"""

from __future__ import annotations

from pathlib import Path

import torch

COLUMNS = ("prompt_id", "prompt_ids", "prompt_len", "response_ids", "response", "label", "sampled_logp")


def record(row: dict, fallback: int, prompt_ids: list[int], response_ids: list[int], response: str,
           sampled_logp: list[float], step: int) -> dict:
    """One bank row (the schema above, plus the training step) for one response of ``row``'s prompt;
    ``fallback`` names the prompt when the row carries no id. Both backends build rows here."""
    return {"prompt_id": prompt_key(row, fallback), "prompt_ids": list(prompt_ids), "prompt_len": len(prompt_ids),
            "response_ids": list(response_ids), "response": response, "label": ground_truth(row),
            "sampled_logp": list(sampled_logp), "step": step}


def write_step(out_dir: str | Path, step: int, records: list[dict]) -> Path:
    """One training step's rollouts as ``step_<step>.parquet`` in ``out_dir`` (atomic rename), the
    layout :func:`load` reads back in step order. Both backends write through this."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".step_{step:06d}.parquet.tmp"
    pd.DataFrame(records).to_parquet(tmp)
    final = out / f"step_{step:06d}.parquet"
    tmp.replace(final)
    return final


def validate(df, source: str = "bank") -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source} lacks column(s) {missing}; a context bank needs {list(COLUMNS)}")
    if len(df) == 0:
        raise ValueError(f"{source} is empty: no responses to score")


def load(path: str | Path):
    """A bank file, or a folder of them (e.g. a training run's ``trainer.rollout_data_dir``:
    one parquet per step, read in step order)."""
    import pandas as pd

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"context bank {str(path)!r} does not exist")
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"context bank folder {str(path)!r} holds no .parquet files")
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    validate(df, str(path))
    return df


def prompt_key(row: dict, fallback: int) -> str:
    """The prompt id of a verl-layout row: extra_info.index when present, else ``fallback``."""
    info = row.get("extra_info")
    return str(info["index"]) if isinstance(info, dict) and "index" in info else str(fallback)


def ground_truth(row: dict) -> str:
    rm = row.get("reward_model")
    return str(rm.get("ground_truth", "")) if isinstance(rm, dict) else ""


@torch.no_grad()
def sample_bank(model, tokenizer, rows: list[dict], *, responses_per_prompt: int = 1, max_response_tokens: int = 192,
                seed: int = 0, batch_size: int = 64):
    """Sample responses from ``model`` (temperature 1.0) for verl-layout prompt rows."""
    import pandas as pd

    from ta_opd.rollout import encode_prompt, generate, rollout_logits, special_ids, token_logp

    special = special_ids(tokenizer, getattr(model, "generation_config", None))
    gen = torch.Generator().manual_seed(seed)
    out = []
    items = [(i, r) for i, r in enumerate(rows) for _ in range(responses_per_prompt)]
    for a in range(0, len(items), batch_size):
        chunk = items[a:a + batch_size]
        prompts = [encode_prompt(tokenizer, r["prompt"], where=f"--prompts row {i}") for i, r in chunk]
        ro = generate(model, prompts, max_new_tokens=max_response_tokens, eos_id=special.eos_ids,
                      pad_id=special.pad_id, temperature=1.0, generator=gen)
        logp = token_logp(rollout_logits(model, ro), ro.responses)  # (B, R)
        for j, ((i, r), p) in enumerate(zip(chunk, prompts)):
            n = int(ro.response_mask[j].sum())
            ids = ro.responses[j, :n].tolist()
            out.append({"prompt_id": prompt_key(r, i), "prompt_ids": p, "prompt_len": len(p), "response_ids": ids,
                        "response": tokenizer.decode(ids, skip_special_tokens=True), "label": ground_truth(r),
                        "sampled_logp": logp[j, :n].tolist()})
    return pd.DataFrame(out)
