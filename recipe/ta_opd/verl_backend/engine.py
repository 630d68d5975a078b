"""verl's FSDP LM-head engine with the update forward on the kept rows only (issue 23, item 3).

In the update, the loss reads the student's logits only at the kept rows (``response_mask``,
which the driver has ANDed with the TA mask; the row scoring response token t of a sequence with
prompt length P is P - 1 + t). :class:`KeptRowsEngine` plans the trimmed forward once per
micro-batch (``ta_opd.kept_rows.plan_kept_rows``: each sequence cut after its last kept row, a
sequence with nothing kept dropped), runs the ROOT module's forward (under FSDP the tied LM head
lives in the root unit) on the trimmed packed input with ``logits_to_keep`` = the kept rows, so
the LM head and log-softmax run at those n rows only, and hands verl's loss the model output in
verl's ORIGINAL nested layout:

- ``log_probs`` (sampled path, ``pg_opd``): (bsz, j1) nested; the computed values at the kept
  rows; at every other response row the detached old log-prob (ratio 1: nothing those rows could
  contribute to a masked metric changes, and no exp of a large log-ratio), 0 at prompt rows (no
  reader: ``no_padding_2_padding`` reads response rows only). No gradient off the kept rows, as
  on verl's path, where the masked loss gives those rows gradient 0.
- logits path (top-K losses): the logits processor gets the compact (1, n, V) logits and
  ``logit_rows`` = their rows in the original packed stream (``losses.token_loss_outputs``).

A micro-batch with nothing kept runs one forward on a single token (the first of the
micro-batch; FSDP's collectives need the same number of forwards and backwards on every rank)
and the loss is 0 with a gradient graph (``0 * logits.sum()``).

Only the update (non-tensor ``ta_opd_phase = "update"``, set by the actor's ``update_actor``,
not forward-only) takes this path; the statistics pass, validation, the reference model and any
other forward are verl's. Inside the update it falls back to verl's path, and says so once in
the log, when the kept-row forward cannot reproduce verl's: no remove-padding, Ulysses SP > 1,
fused kernels, static packed padding (``pad_to_length``), multi-modal or 3-D (mrope) position
ids, or entropy / Σπ² asked for every row.

Registered with verl's ``EngineRegistry`` under a (device, vendor) key (:func:`register_engine`),
which ``get_engine_cls`` tries before verl's device-only key; no verl file is edited.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name
from verl.utils.torch_functional import logprobs_from_logits
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import (
    FSDPEngineWithLMHead,
    _is_scalar_unit_temperature,
    _scale_logits_by_temperature,
)
from verl.workers.engine.utils import detach_tree
from verl.workers.utils.padding import no_padding_2_padding

from recipe.ta_opd.verl_backend import fields as F
from ta_opd.errors import TAConfigError
from ta_opd.kept_rows import KeptRowPlan, plan_kept_rows

logger = logging.getLogger(__name__)
MODEL_TYPE, BACKENDS = "language_model", ("fsdp", "fsdp2")
_SAID: set[str] = set()  # fallback reasons already logged in this process


def register_engine(device: str = "cuda", vendor: str = "nvidia") -> None:
    """Register :class:`KeptRowsEngine` for verl's FSDP backends under (device, vendor)
    (idempotent). ``get_engine_cls`` looks this key up before verl's device-only one."""
    registry = EngineRegistry._engines.setdefault(MODEL_TYPE, {})
    todo = []
    for backend in BACKENDS:
        have = registry.get(backend, {}).get((device, vendor))
        if have is None:
            todo.append(backend)
        elif have is not KeptRowsEngine:
            raise TAConfigError(f"verl's engine registry already holds {have.__name__} for {MODEL_TYPE}/{backend} "
                                f"on (device={device!r}, vendor={vendor!r}); TA-OPD's kept-rows engine cannot replace "
                                "it. Unregister that engine or run without it")
    if todo:
        EngineRegistry.register(model_type=MODEL_TYPE, backend=todo, device=device, vendor=vendor)(KeptRowsEngine)


def fallback_reason(engine, micro_batch) -> str | None:
    """Why the kept-row forward cannot stand in for verl's on this update micro-batch (None: it can)."""
    flag = lambda key, default=False: tu.get_non_tensor_data(data=micro_batch, key=key, default=default)  # noqa: E731
    if not flag("use_remove_padding", True):
        return "use_remove_padding is off (padded forward)"
    if getattr(engine, "use_ulysses_sp", False):
        return "Ulysses sequence parallelism > 1 (the sequence is sliced across ranks)"
    if flag("use_fused_kernels"):
        return "use_fused_kernels (the fused kernel computes log-probs at every row)"
    if getattr(engine, "pad_to_length", False):
        return "pad_to_length (static packed padding)"
    if flag("calculate_entropy") or flag("calculate_sum_pi_squared"):
        return "calculate_entropy / calculate_sum_pi_squared in the update (verl wants them at every row)"
    if micro_batch["position_ids"].dim() == 3 or "multi_modal_inputs" in micro_batch.keys():
        return "multi-modal inputs / 3-D position ids"
    return None


def old_log_prob_rows(micro_batch, nnz: int) -> torch.Tensor:
    """(nnz,) fp32: the detached old log-prob at every valid response row of the packed stream, 0
    at prompt rows (and everywhere when the micro-batch carries no old log-probs)."""
    out = torch.zeros(nnz, dtype=torch.float32, device=micro_batch["input_ids"].values().device)
    if "old_log_probs" not in micro_batch.keys():
        return out
    ramp = torch.arange(1, nnz + 1, device=out.device)  # +1: verl pads the (B, R) grid with 0
    grid = no_padding_2_padding(ramp, micro_batch) - 1  # (B, R) packed row of each response slot, -1 = none
    old = micro_batch["old_log_probs"]
    old = old.to_padded_tensor(0.0) if old.is_nested else old  # (B, R)
    valid = grid >= 0
    out[grid[valid]] = old[:, : grid.shape[1]][valid].float().to(out.device)
    return out


def forward_plan(micro_batch) -> KeptRowPlan:
    """The kept-row plan of an update micro-batch: need = the rows scoring kept response tokens."""
    cu = micro_batch["input_ids"].offsets().long()  # (B+1,)
    need = torch.zeros(int(cu[-1]), dtype=torch.bool, device=cu.device)  # (N,)
    need[F.response_rows(micro_batch).to(cu.device)] = True
    return plan_kept_rows(cu, need)


class KeptRowsEngine(FSDPEngineWithLMHead):
    """``FSDPEngineWithLMHead`` whose update forward runs the LM head at the kept rows only."""

    def forward_step(self, micro_batch, loss_function, forward_only):
        phase = tu.get_non_tensor_data(data=micro_batch, key=F.PHASE, default=None)
        if forward_only or phase != F.PHASE_UPDATE:
            return super().forward_step(micro_batch, loss_function, forward_only)
        why = fallback_reason(self, micro_batch)
        if why is not None:
            if why not in _SAID:
                _SAID.add(why)
                logger.warning("TA-OPD kept-rows update off, verl's full-logits forward instead: %s", why)
            return super().forward_step(micro_batch, loss_function, forward_only)
        return self.kept_rows_step(micro_batch.to(get_device_id()), loss_function)

    def kept_rows_step(self, micro_batch, loss_function):
        """One update micro-batch on the kept rows (module docstring); returns (loss, output) as
        verl's ``forward_step``."""
        input_ids = micro_batch["input_ids"]  # (bsz, j1) nested
        cu = input_ids.offsets()
        ids, pos = input_ids.values(), micro_batch["position_ids"].values()  # (N,) each
        nnz = ids.shape[0]
        plan = forward_plan(micro_batch)
        rows = plan.orig_rows  # (n,)
        empty = rows.numel() == 0
        # nothing kept: one token through the model (same collectives on every rank), loss 0
        token_index = plan.token_index if not empty else torch.zeros(1, dtype=torch.long, device=ids.device)
        keep = plan.logit_rows if not empty else torch.zeros(1, dtype=torch.long, device=ids.device)
        model_inputs = {"input_ids": ids[token_index].unsqueeze(0), "position_ids": pos[token_index].unsqueeze(0),
                        "attention_mask": None}  # (1, M) each: packed, as verl's varlen path
        if getattr(self, "pass_packed_cu_seqlens", False):
            trimmed_cu = plan.cu_seqlens if not empty else torch.tensor([0, 1], device=ids.device)
            model_inputs.update(cu_seqlens=trimmed_cu, cu_seqlens_cpu=trimmed_cu.cpu())
        temperature = micro_batch["temperature"]
        unit = _is_scalar_unit_temperature(temperature)
        if not isinstance(temperature, torch.Tensor):
            temperature = torch.tensor([temperature] * input_ids.shape[0], device=ids.device)
        temp_rows = torch.repeat_interleave(temperature.float().to(ids.device), cu.diff())[rows]  # (n,)

        dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        device_name = get_device_name()
        autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_name, dtype=dtype)
        with autocast:
            raw = self.module(**model_inputs, logits_to_keep=keep, use_cache=False)  # root forward: tied head
            logits = raw.logits[0]  # (n, V), or (1, V) when nothing is kept
            if hasattr(logits, "full_tensor"):  # a DTensor (vocab-sharded): gather, as verl does
                logits = logits.full_tensor()
            if not empty:
                logits = _scale_logits_by_temperature(logits, temp_rows.unsqueeze(-1), is_unit_temperature=unit)
            model_output = self.kept_rows_outputs(micro_batch, loss_function, logits, rows, nnz)
            loss, metrics = loss_function(model_output=model_output, data=micro_batch,
                                          dp_group=self.get_data_parallel_group())
            return loss, {"model_output": detach_tree(model_output), "loss": loss.detach().item(), "metrics": metrics}

    def kept_rows_outputs(self, micro_batch, loss_function, logits, rows, nnz: int) -> dict:
        """verl's model_output in its original nested layout from the kept-row logits: (n, V), or
        (1, V) of a stand-in token when nothing is kept (rows empty)."""
        cu = micro_batch["input_ids"].offsets()
        flag = lambda key: tu.get_non_tensor_data(data=micro_batch, key=key, default=False)  # noqa: E731
        nested = lambda v: torch.nested.nested_tensor_from_jagged(v, cu)  # noqa: E731
        model_output = {}
        if flag("distillation_use_topk"):  # the processor maps its rows with logit_rows (losses.logit_index)
            for k, v in loss_function(student_logits=logits.unsqueeze(0), data=micro_batch, logit_rows=rows).items():
                v = v.squeeze(0)
                assert v.shape == (nnz,), f"processor output {k}: {tuple(v.shape)}, expected ({nnz},)"
                model_output[k] = nested(v)
        if not flag("distillation_only"):
            base = old_log_prob_rows(micro_batch, nnz)  # (N,) no gradient off the kept rows
            if rows.numel():
                labels = micro_batch["input_ids"].values()[rows + 1]  # (n,) the token row r scores
                kept = logprobs_from_logits(logits, labels)  # (n,)
                log_probs = base.to(kept.dtype).index_put((rows,), kept)
            else:  # nothing kept: still a function of the logits (FSDP's backward collectives)
                log_probs = base + 0.0 * logits.sum()
            model_output["log_probs"] = nested(log_probs)
        return model_output

__all__ = ["KeptRowsEngine", "fallback_reason", "forward_plan", "old_log_prob_rows", "register_engine"]
