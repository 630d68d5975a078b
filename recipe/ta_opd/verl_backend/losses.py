"""What TA-OPD registers with verl, and the actor loss wrapper that emits the TA statistics.

Registered distillation losses (``distillation.distillation_loss.loss_mode``), all used with
``use_policy_gradient=false`` and ``use_task_rewards=false``, so verl's distillation machinery
aggregates our per-token loss with ``agg_loss`` over ``response_mask`` — which the driver has
ANDed with the TA mask, so ``token-mean`` is Eq. 7's mean over kept positions, with verl's
global (all micro-batches, all DP ranks) token count:

- ``ta_opd_pg``: sampled-token PG-OPD, the per-token PPO-clipped surrogate with advantage
  A_t = -(log π_old(y_t) - log π_T(y_t)) (``ta_opd.losses.pg_opd_token_loss``; plain clipping,
  no dual clip; verl's own PG path only allows its dual-clip "vanilla" loss). Registered as an
  estimator loss: the FSDP teacher ships log π_T(y_t) in ``ta_opd_teacher_logp``.
- ``ta_opd_pg_topk``: the same loss, registered as a top-K loss so that verl's native vLLM
  teacher is asked for ``prompt_logprobs = K'`` (``teacher_backend=vllm``).
- ``ta_opd_topk_forward_kl`` / ``ta_opd_topk_reverse_kl``: KL on the teacher's top-K support,
  both renormalized on it (``ta_opd.losses.topk_kl_per_token``), computed in the logits
  processor of the update forward.

The wrapper :func:`ta_opd_actor_loss` replaces the actor's loss function. verl calls it twice per
micro-batch: as logits processor (``student_logits`` given) and as the final loss. In the
statistics pass (non-tensor ``ta_opd_phase = "stats"``, the old-log-prob forward) the processor
returns the TA statistics as per-token scalars and the final loss is zero; otherwise it defers to
verl's ``distillation_ppo_loss``.
"""

from __future__ import annotations

from typing import Any

import torch

from verl.trainer.distillation.losses import (
    DistillationLossSettings,
    distillation_ppo_loss,
    register_distillation_loss,
)
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from recipe.ta_opd.verl_backend import fields as F
from ta_opd.config import TAConfig
from ta_opd.losses import pg_opd_token_loss, topk_kl_per_token
from ta_opd.stats import PositionStats, sparse_position_stats

PG = "ta_opd_pg"
PG_TOPK = "ta_opd_pg_topk"
FORWARD_KL = "ta_opd_topk_forward_kl"
REVERSE_KL = "ta_opd_topk_reverse_kl"
# ta_opd.loss -> the registered verl loss mode, per teacher backend
LOSS_MODES = {
    ("pg_opd", "fsdp"): PG, ("pg_opd", "vllm"): PG_TOPK,
    ("topk_forward_kl", "fsdp"): FORWARD_KL, ("topk_forward_kl", "vllm"): FORWARD_KL,
    ("topk_reverse_kl", "fsdp"): REVERSE_KL, ("topk_reverse_kl", "vllm"): REVERSE_KL,
}
TOPK_KL_OUTPUT = "ta_opd_topk_kl"  # per-token model output of the top-K losses' processor


def _padded(x: torch.Tensor, fill=0.0) -> torch.Tensor:
    return x.to_padded_tensor(fill) if x.is_nested else x


def _pg_opd(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    """(B, R) per-token PG-OPD surrogate; gradient through the current log-probs."""
    log_prob = no_padding_2_padding(model_output["log_probs"], data)  # (B, R)
    old = _padded(data["old_log_probs"]).to(log_prob.dtype)
    teacher = _padded(data[F.TEACHER_LOGP]).to(log_prob.dtype)
    mask = _padded(data["response_mask"], 0).bool()
    loss_cfg = distillation_config.distillation_loss
    per_token, clipped, log_ratio = pg_opd_token_loss(
        log_prob, old, -(old - teacher), mask, clip_low=loss_cfg.clip_ratio_low, clip_high=loss_cfg.clip_ratio_high)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    n = mask.sum().clamp_min(1)
    metrics = {
        "ta_opd/loss/clipfrac": Metric(AggregationType.MEAN, (clipped & mask).sum() / n),
        "ta_opd/loss/sampled_kl": Metric(AggregationType.MEAN, torch.where(mask, old - teacher, 0.0).sum() / n),
        "ta_opd/loss/ppo_kl": Metric(AggregationType.MEAN, torch.where(mask, -log_ratio, 0.0).detach().sum() / n),
    }
    return per_token, metrics


def _topk_kl(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    per_token = no_padding_2_padding(model_output[TOPK_KL_OUTPUT], data)
    mask = _padded(data["response_mask"], 0).bool()
    n = mask.sum().clamp_min(1)
    return per_token, {"ta_opd/loss/topk_kl": Metric(AggregationType.MEAN, torch.where(mask, per_token, 0.0).detach().sum() / n)}


def register_all() -> None:
    """Register TA-OPD's losses with verl (idempotent: every process imports this module, and
    the import registers before any DistillationConfig is built)."""
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY

    if PG in DISTILLATION_LOSS_REGISTRY:
        return
    register_distillation_loss(DistillationLossSettings(names=[PG], use_estimator=True))(_pg_opd)
    register_distillation_loss(DistillationLossSettings(names=[PG_TOPK], use_topk=True))(_pg_opd)
    register_distillation_loss(DistillationLossSettings(names=[FORWARD_KL, REVERSE_KL], use_topk=True))(_topk_kl)


register_all()


# ----------------------------------------------------------------------------- logits processor


def _rows_and_teacher(student_logits: torch.Tensor, data):
    """Rows of the packed logits that score valid response tokens, and the teacher's top-K' there."""
    rows = F.response_rows(data).to(student_logits.device)
    t_ids = data[F.TEACHER_IDS]
    t_lp = data[F.TEACHER_LOGPROBS]
    t_ids = (t_ids.values() if t_ids.is_nested else t_ids.reshape(-1, t_ids.shape[-1]))[rows]
    t_lp = (t_lp.values() if t_lp.is_nested else t_lp.reshape(-1, t_lp.shape[-1]))[rows]
    return rows, t_ids, t_lp


def statistics_outputs(student_logits: torch.Tensor, data, cfg: TAConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """The TA statistics of one micro-batch as per-token scalars, each (1, nnz) fp32: zeros on
    rows that score no valid response token. student_logits: (1, nnz, V_model) packed."""
    if student_logits.dim() != 3 or student_logits.shape[0] != 1:
        raise ValueError(f"expected packed (1, nnz, V) student logits, got {tuple(student_logits.shape)}")
    nnz = student_logits.shape[1]
    rows, t_ids, t_lp = _rows_and_teacher(student_logits, data)
    out = {F.stat_key(n): torch.zeros(1, nnz, dtype=torch.float32, device=student_logits.device)
           for n in PositionStats.SCALARS}
    if rows.numel() == 0:
        return out
    with torch.no_grad():
        stats = sparse_position_stats(
            student_logits[0, :, :vocab_size].detach(), t_ids.to(student_logits.device), t_lp.to(student_logits.device),
            topk=cfg.topk, entropy=cfg.entropy, chunk_size=cfg.chunk_size, rows=rows)
    for name, v in stats.scalars().items():
        out[F.stat_key(name)][0, rows] = v
    return out


def topk_kl_outputs(student_logits: torch.Tensor, data, cfg: TAConfig, vocab_size: int, *,
                    reverse: bool) -> dict[str, torch.Tensor]:
    """Per-token top-K KL (with gradient) on the teacher's top-K (its first K of K'), (1, nnz)."""
    nnz = student_logits.shape[1]
    rows, t_ids, t_lp = _rows_and_teacher(student_logits, data)
    out = torch.zeros(1, nnz, dtype=torch.float32, device=student_logits.device)
    if rows.numel() == 0:
        return {TOPK_KL_OUTPUT: out + 0.0 * student_logits.sum()}
    ids = t_ids[:, : cfg.topk].long().to(student_logits.device)
    t_lp = t_lp[:, : cfg.topk].to(student_logits.device)

    def chunk_kl(logits, r, i, t):  # recomputed in backward: no (N, V) fp32 copy is kept
        x = logits[0, r, :vocab_size].float()
        return topk_kl_per_token(x.gather(-1, i) - torch.logsumexp(x, dim=-1, keepdim=True), t, reverse=reverse)

    from torch.utils.checkpoint import checkpoint

    step = cfg.chunk_size
    kl = torch.cat([checkpoint(chunk_kl, student_logits, rows[a:a + step], ids[a:a + step], t_lp[a:a + step],
                               use_reentrant=False) for a in range(0, rows.numel(), step)])
    return {TOPK_KL_OUTPUT: out.index_put((torch.zeros_like(rows), rows), kl)}


def update_flags(loss_mode: str) -> dict[str, bool]:
    """The engine flags of the update forward for a registered loss mode. verl derives them from its
    global distillation switch and the loss's top-K setting, which fits neither of our cases: the
    PG losses need the current log-probs (verl would skip them for a top-K loss without policy
    gradient) and no logits processor; the top-K losses need the processor and nothing else."""
    topk = loss_mode in (FORWARD_KL, REVERSE_KL)
    return {"distillation_use_topk": topk, "distillation_only": topk}


def ta_opd_actor_loss(*, inner, cfg: TAConfig, vocab_size: int, loss_mode: str, model_output=None, data=None,
                      dp_group=None, student_logits=None, data_format: str = "thd"):
    """The actor's loss function (see module docstring); ``inner`` is verl's distillation loss."""
    phase = tu.get_non_tensor_data(data=data, key=F.PHASE, default=None)
    if student_logits is not None:  # called as logits processor
        if phase == F.PHASE_STATS:
            return statistics_outputs(student_logits, data, cfg, vocab_size)
        if loss_mode in (FORWARD_KL, REVERSE_KL):
            return topk_kl_outputs(student_logits, data, cfg, vocab_size, reverse=loss_mode == REVERSE_KL)
        return {}
    if phase == F.PHASE_STATS:
        return torch.zeros((), device=_any_tensor(model_output).device), {}
    if not bool(_padded(data["response_mask"], 0).any()):
        # No kept position in this micro-batch (small budgets): contribute exactly zero, but through
        # the graph so that every FSDP rank still runs the same backward collectives. (verl's own
        # loss would fail here: its min/max metrics reduce an empty tensor.)
        return 0.0 * _any_tensor(model_output, grad=True).sum(), {}
    return inner(model_output=model_output, data=data, dp_group=dp_group)


def _any_tensor(model_output: dict, grad: bool = False) -> torch.Tensor:
    for v in model_output.values():
        if isinstance(v, torch.Tensor) and (v.requires_grad or not grad):
            return v.values() if v.is_nested else v
    raise ValueError(f"model output holds no {'differentiable ' if grad else ''}tensor: {sorted(model_output)}")


def make_actor_loss(actor_config, distillation_config, cfg: TAConfig, vocab_size: int):
    """verl's distillation PPO loss for this actor, wrapped (see :func:`ta_opd_actor_loss`)."""
    from functools import partial

    inner = partial(distillation_ppo_loss, config=actor_config, distillation_config=distillation_config)
    return partial(ta_opd_actor_loss, inner=inner, cfg=cfg, vocab_size=vocab_size,
                   loss_mode=distillation_config.distillation_loss.loss_mode)
