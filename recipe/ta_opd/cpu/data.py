"""Prompt datasets in verl's parquet layout, and a resumable, seeded prompt stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ta_opd.errors import TAConfigError, TAInputError

REQUIRED_COLUMNS = ("prompt", "data_source", "reward_model")


def load_rows(path: str | Path) -> list[dict]:
    import pandas as pd

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    df = pd.read_parquet(p)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise TAInputError(f"dataset {str(path)!r} lacks column(s) {missing}; verl's layout needs {list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise TAInputError(f"dataset {str(path)!r} is empty")
    rows = df.to_dict("records")
    for i, r in enumerate(rows):  # parquet gives numpy arrays of dicts; the chat template wants lists
        msgs = r["prompt"]
        if isinstance(msgs, str) or not hasattr(msgs, "__len__") or not all(isinstance(m, dict) for m in msgs):
            raise TAInputError(
                f"dataset {str(path)!r} row {i}: 'prompt' is {type(msgs).__name__} {str(msgs)[:60]!r}; verl's layout "
                "holds a list of chat messages, e.g. [{'role': 'user', 'content': '...'}] (rendered with the "
                "tokenizer's chat template)")
        r["prompt"] = [dict(m) for m in msgs]
        for key in ("reward_model", "extra_info"):
            if isinstance(r.get(key), dict):
                r[key] = dict(r[key])
    return rows


class PromptStream:
    """Batches of prompts, reshuffled each epoch from (seed, epoch); its state is two integers,
    so a resumed run continues with exactly the batch it would have drawn next."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int):
        if batch_size < 1 or batch_size > len(rows):
            raise TAConfigError(f"data.train_batch_size (prompts per step) = {batch_size} is not allowed; it must be in [1, {len(rows)}] (the dataset size)")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))

    def next_batch(self) -> list[dict]:
        if self.pos + self.batch_size > len(self.rows):  # drop the ragged tail, as verl's sampler does
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._order()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return [self.rows[i] for i in idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
