"""Batch field names shared by the driver, the teacher worker group and the actor, and where a
micro-batch's response rows sit in verl's packed (no-padding) layout."""

from __future__ import annotations

import torch

# verl's own top-K teacher fields (full-sequence layout, (B, S, K'); verl nests them per token)
TEACHER_IDS = "teacher_ids"
TEACHER_LOGPROBS = "teacher_logprobs"
# ours, response grid (B, R) fp32
TEACHER_LOGP = "ta_opd_teacher_logp"  # log π_T(y_t)
TEACHER_ENTROPY = "ta_opd_teacher_entropy"
# what the teacher worker reads from the rollout batch
TEACHER_INPUTS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask")
# statistics emitted by the actor's logits processor, one (B, R) field each
STAT_PREFIX = "ta_opd_stat_"
# non-tensor flag: the actor forward is the statistics pass (old log-probs + TA statistics)
PHASE = "ta_opd_phase"
PHASE_STATS = "stats"
PHASE_UPDATE = "update"  # the actor update (engine.KeptRowsEngine: LM head at the kept rows only)


def stat_key(name: str) -> str:
    return STAT_PREFIX + name


def response_rows(data) -> torch.Tensor:
    """(N,) indices, into the no-padding token axis of a micro-batch, of the rows whose logits
    score the valid response tokens, in row-major (sequence, position) order of
    ``response_mask``. Uses verl's own ``no_padding_2_padding`` on an index ramp, so the mapping
    is verl's by construction. (The engine may right-pad the packed logits; those rows are never
    response rows.)"""
    from verl.workers.utils.padding import no_padding_2_padding

    nnz = data["input_ids"].values().shape[0]
    ramp = torch.arange(nnz, device=data["response_mask"].device)
    grid = no_padding_2_padding(ramp, data)  # (B, R)
    mask = data["response_mask"]
    mask = mask.to_padded_tensor(0) if mask.is_nested else mask
    return grid[mask.bool()]
