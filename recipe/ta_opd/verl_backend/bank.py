"""The verl backend's rollouts as a context bank for ``python -m ta_opd.tools.diagnose`` (schema in
``ta_opd/tools/diagnose/bank.py``), written per step next to verl's own JSONL dump when
``trainer.rollout_data_dir`` is set — the same files the CPU backend writes."""

from __future__ import annotations

from typing import Callable

from verl import DataProto

from ta_opd.tools.diagnose import bank


def bank_records(batch: DataProto, decode: Callable[[list[int]], str], step: int) -> list[dict]:
    """One record per response: unpadded prompt and response ids, the rollout log-probs
    (``old_log_probs``: the policy that sampled them), prompt id and label from the row."""
    b, nt = batch.batch, batch.non_tensor_batch
    P = b["prompts"].shape[1]
    prompt_mask = b["attention_mask"][:, :P].bool()
    valid = b["response_mask"].bool()
    recs = []
    for j in range(len(batch)):
        row = {k: nt[k][j] for k in ("extra_info", "reward_model") if k in nt}
        prompt_ids = b["prompts"][j][prompt_mask[j]].tolist()
        n = int(valid[j].sum())
        response_ids = b["responses"][j, :n].tolist()
        recs.append(bank.record(row, j, prompt_ids, response_ids, decode(response_ids),
                                b["old_log_probs"][j, :n].float().tolist(), step))
    return recs
