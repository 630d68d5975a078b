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
- ``ta_opd_topk_forward_kl`` / ``ta_opd_topk_reverse_kl``: KL on K + 1 bins, the teacher's top-K
  ids plus one rest bin, with the student's full-vocabulary probabilities
  (``ta_opd.losses.topk_kl_per_token``; docs/losses.md), computed in the logits processor of the
  update forward.

Metrics: every micro-batch returns the same keys (verl's ``Metric.aggregate_dp`` needs as many
values per key on every DP rank). Ours are ``SUM`` metrics of (local sum over kept tokens) ·
dp_size / (global kept tokens), so verl's aggregation (mean over ranks, sum over micro-batches)
gives the exact global token mean, and a micro-batch with no kept position reports exactly 0.

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
    get_distillation_loss_fn,
    register_distillation_loss,
)
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from recipe.ta_opd.verl_backend import fields as F
from ta_opd.config import TAConfig
from ta_opd.errors import TAInputError
from ta_opd.losses import pg_opd_token_loss, topk_kl_per_token, topk_logp_and_rest
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
TOPK_KL_OUTPUT = "ta_opd_topk_kl"  # per-token model outputs of the top-K losses' processor
TOPK_MASS_OUTPUT = "ta_opd_student_topk_mass"  # the student's mass on the teacher's top-K (no gradient)


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
    metrics = {
        "ta_opd/loss/clipfrac": _global_token_mean(clipped.float(), mask, data),
        "ta_opd/loss/sampled_kl": _global_token_mean(old - teacher, mask, data),
        "ta_opd/loss/ppo_kl": _global_token_mean(-log_ratio, mask, data),
    }
    return per_token, metrics


def _global_token_mean(x: torch.Tensor, mask: torch.Tensor, data) -> Metric:
    """This micro-batch's share of the global mean of x over kept tokens, as a SUM metric (see
    the module docstring): Σ_mask x · dp_size / (global kept tokens)."""
    dp_size = tu.get_non_tensor_data(data=data, key="dp_size", default=1)
    n_global = max(int(tu.get_non_tensor_data(data=data, key="batch_num_tokens", default=int(mask.sum()))), 1)
    local = torch.where(mask, x.detach().float(), torch.zeros((), device=x.device)).sum()  # where: NaN never leaks
    return Metric(AggregationType.SUM, local * dp_size / n_global)  # max(., 1): no kept token anywhere -> 0


def _topk_kl(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    per_token = no_padding_2_padding(model_output[TOPK_KL_OUTPUT], data)
    mass = no_padding_2_padding(model_output[TOPK_MASS_OUTPUT], data)
    mask = _padded(data["response_mask"], 0).bool()
    return per_token, {"ta_opd/loss/topk_kl": _global_token_mean(per_token, mask, data),
                       "ta_opd/loss/student_topk_mass": _global_token_mean(mass, mask, data)}


def empty_micro_batch_metrics(loss_metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a micro-batch with no kept position: the keys every other micro-batch
    returns, each with the identity of its aggregation. ``loss_metrics``: our registered loss's
    metrics on this micro-batch (SUM shares, exactly 0 here); plus what verl's
    ``distillation_ppo_loss`` adds (``distillation/loss_min``/``loss_max``: +inf/-inf, which the
    cross-rank min/max ignore; ``distillation/loss``: 0)."""
    return {**loss_metrics,
            "distillation/loss_min": Metric(AggregationType.MIN, float("inf")),
            "distillation/loss_max": Metric(AggregationType.MAX, float("-inf")),
            "distillation/loss": Metric(AggregationType.SUM, 0.0)}


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
            topk=cfg.topk, entropy=cfg.entropy, rows=rows, **cfg.stats_chunking())
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
        return {TOPK_KL_OUTPUT: out + 0.0 * student_logits.sum(), TOPK_MASS_OUTPUT: out.clone()}
    ids = t_ids[:, : cfg.topk].long().to(student_logits.device)
    t_lp = t_lp[:, : cfg.topk].to(student_logits.device)
    _check_teacher_rows(t_lp, rows)

    def chunk_kl(logits, r, i, t):  # recomputed in backward: no (N, V) fp32 copy is kept
        s_lp, s_rest = topk_logp_and_rest(logits[0, r, :vocab_size], i)  # (n, K), (n,)
        return torch.stack([topk_kl_per_token(s_lp, s_rest, t, reverse=reverse), -torch.expm1(s_rest.detach())])

    from torch.utils.checkpoint import checkpoint

    step = cfg.chunk_size
    kl, mass = torch.cat([checkpoint(chunk_kl, student_logits, rows[a:a + step], ids[a:a + step], t_lp[a:a + step],
                                     use_reentrant=False) for a in range(0, rows.numel(), step)], dim=1)
    at = (torch.zeros_like(rows), rows)
    return {TOPK_KL_OUTPUT: out.index_put(at, kl), TOPK_MASS_OUTPUT: out.index_put(at, mass.detach())}


def _check_teacher_rows(t_lp: torch.Tensor, rows: torch.Tensor) -> None:
    """NaN or +inf teacher log-probs at a kept row must not turn into a silent loss value."""
    bad = (torch.isnan(t_lp) | (t_lp == float("inf"))).any(-1)  # (n,)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise TAInputError(f"the teacher's top-K log-probs are {t_lp[i].tolist()[:8]}... at packed row {int(rows[i])} "
                           f"of this micro-batch (a kept response token; {int(bad.sum())} such rows): NaN or +inf "
                           "teacher outputs would make the top-K loss NaN; check the teacher at that position")


def update_flags(loss_mode: str) -> dict[str, bool]:
    """The engine flags of the update forward for a registered loss mode. verl derives them from its
    global distillation switch and the loss's top-K setting, which fits neither of our cases: the
    PG losses need the current log-probs (verl would skip them for a top-K loss without policy
    gradient) and no logits processor; the top-K losses need the processor and nothing else."""
    topk = loss_mode in (FORWARD_KL, REVERSE_KL)
    return {"distillation_use_topk": topk, "distillation_only": topk}


def ta_opd_actor_loss(*, inner, cfg: TAConfig, vocab_size: int, loss_mode: str, model_output=None, data=None,
                      dp_group=None, student_logits=None, data_format: str = "thd", actor_config=None,
                      distillation_config=None):
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
        # loss would fail here: its min/max metrics reduce an empty tensor.) Same metric keys as
        # every other micro-batch, or verl's cross-rank aggregation fails (empty_micro_batch_metrics).
        _, ours = get_distillation_loss_fn(loss_mode)(actor_config, distillation_config, model_output, data)
        return 0.0 * _any_tensor(model_output, grad=True).sum(), empty_micro_batch_metrics(ours)
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
                   loss_mode=distillation_config.distillation_loss.loss_mode, actor_config=actor_config,
                   distillation_config=distillation_config)
