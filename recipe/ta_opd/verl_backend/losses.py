"""What TA-OPD registers with verl, and the actor loss wrapper that emits the TA statistics.

The verl loss modes are derived from the loss registry (``ta_opd.losses``), not listed here: every
loss registered per token (``register_loss(..., per_token=True)``, a :class:`TokenLoss`
function) runs on verl as ``distillation.distillation_loss.loss_mode`` = :func:`verl_loss_mode`,
with ``use_policy_gradient=false`` and ``use_task_rewards=false``, so verl's distillation
machinery aggregates our per-token loss with ``agg_loss`` over ``response_mask`` — which the
driver has ANDed with the TA mask, so ``token-mean`` is Eq. 7's mean over kept positions, with
verl's global (all micro-batches, all DP ranks) token count. A loss registered aggregated only
is refused by name at startup (``validate.plan`` calls :func:`verl_loss_mode`).

Where the LossInputs a loss declares (``loss_needs``) are computed:

- sampled path, needs within log π_θ(y_t), log π_old(y_t), log π_T(y_t) (``pg_opd``): in verl's
  final loss, from verl's own ``log_probs``, ``old_log_probs`` and the teacher's
  ``ta_opd_teacher_logp``. Mode ``ta_opd_<loss>`` (an estimator loss: the FSDP teacher ships
  log π_T(y_t)), or ``ta_opd_<loss>_topk`` with the vLLM teacher (a top-K loss, so that verl's
  native vLLM teacher is asked for ``prompt_logprobs = K'``).
- logits path, any top-K field (``topk_forward_kl``, ``topk_reverse_kl``): in the logits processor
  of the update forward, at the kept rows, in chunks under activation checkpointing (no (N, V)
  fp32 copy is kept): the student's full-vocabulary log-probs at the teacher's top-K ids and its
  rest mass (``topk_logp_and_rest``), the teacher's top-K log-probs, and any sampled-token field
  (log π_θ(y_t) from the same logits). Mode ``ta_opd_<loss>`` (a top-K loss) on both backends.

Metrics: ``ta_opd/loss/<loss>`` and the loss's own per-token metrics, each the global mean over kept
tokens. Every micro-batch returns the same keys (verl's ``Metric.aggregate_dp`` needs as many
values per key on every DP rank). They are ``SUM`` metrics of (local sum over kept tokens) ·
dp_size / (global kept tokens), so verl's aggregation (mean over ranks, sum over micro-batches)
gives the exact global token mean, and a micro-batch with no kept position reports exactly 0.

The wrapper :func:`ta_opd_actor_loss` replaces the actor's loss function. verl calls it twice per
micro-batch: as logits processor (``student_logits`` given) and as the final loss. In the
statistics pass (non-tensor ``ta_opd_phase = "stats"``, the old-log-prob forward) the processor
returns the TA statistics as per-token scalars and the final loss is zero; otherwise it defers to
verl's ``distillation_ppo_loss``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from verl.trainer.distillation.losses import (
    DISTILLATION_LOSS_REGISTRY,
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
from ta_opd.errors import TAConfigError, TAInputError
from ta_opd.losses import LossInputs, get_token_loss, loss_needs, per_token_losses, topk_logp_and_rest
from ta_opd.stats import PositionStats, sparse_position_stats

# LossInputs fields the final loss can build from verl's batch; any other field needs the logits
SAMPLED_FIELDS = ("log_prob", "old_log_prob", "teacher_log_prob")
TOKEN_LOSS_OUTPUT = "ta_opd_token_loss"  # the logits path's per-token loss (processor output)
TOKEN_METRIC_PREFIX = "ta_opd_token_metric:"  # + metric name: its per-token values (no gradient)
# registered verl loss mode -> (the ta_opd loss it runs, whether it runs on the logits path)
_MODES: dict[str, tuple[str, bool]] = {}


def on_logits_path(loss: str) -> bool:
    """Whether registered loss ``loss`` reads a field only the update forward's logits give."""
    return not set(loss_needs(loss)) <= set(SAMPLED_FIELDS)


def verl_loss_mode(loss: str, teacher_backend: str) -> str:
    """The verl distillation loss mode that runs registered ta_opd loss ``loss`` with this teacher
    backend (``fsdp`` | ``vllm``), registered with verl on first use (idempotent). Raises
    ``TAConfigError`` naming the loss when it has no per-token form."""
    if get_token_loss(loss) is None:
        raise TAConfigError(
            f"ta_opd.loss={loss!r} is registered without a per-token form, so only the CPU backend can run it: verl "
            f"aggregates per-token losses itself. Register it with register_loss({loss!r}, needs=..., per_token=True) "
            f"returning a ta_opd.losses.TokenLoss; losses the verl backend runs: {', '.join(per_token_losses())}")
    logits = on_logits_path(loss)
    use_topk = logits or teacher_backend == "vllm"  # vLLM teacher: verl asks it for prompt_logprobs = K'
    mode = f"ta_opd_{loss}" + ("_topk" if use_topk and not logits else "")
    if _MODES.get(mode) == (loss, logits):
        return mode
    if mode in DISTILLATION_LOSS_REGISTRY:
        raise TAConfigError(f"ta_opd.loss={loss!r} maps to verl loss mode {mode!r}, which another loss has registered "
                            "with verl already; rename the loss")
    fn = partial(_logits_loss if logits else _sampled_loss, loss=loss)
    register_distillation_loss(DistillationLossSettings(names=[mode], use_topk=use_topk,
                                                        use_estimator=not use_topk))(fn)
    _MODES[mode] = (loss, logits)
    return mode


def register_losses() -> None:
    """Register every per-token ta_opd loss with verl, for both teacher backends (idempotent:
    every process imports this module, and the import registers before any DistillationConfig is
    built)."""
    for loss in per_token_losses():
        for backend in ("fsdp", "vllm"):
            verl_loss_mode(loss, backend)


def register_all() -> None:
    """The Ray worker setup hook (and the actor worker's constructor): :func:`register_losses`,
    and the kept-rows update engine with verl's engine registry (``engine.register_engine``: CUDA,
    vendor nvidia). The engine is imported here, not at this module's import: importing verl's
    FSDP engine resolves verl's platform, which a process must be able to choose first."""
    from recipe.ta_opd.verl_backend.engine import register_engine

    register_losses()
    register_engine()


def _padded(x: torch.Tensor, fill=0.0) -> torch.Tensor:
    return x.to_padded_tensor(fill) if x.is_nested else x


def _sampled_loss(config, distillation_config, model_output: dict, data, *, loss: str) -> tuple[torch.Tensor, dict]:
    """(B, R) per-token loss of a sampled-path loss; gradient through verl's current log-probs."""
    needs = loss_needs(loss)
    mask = _padded(data["response_mask"], 0).bool()  # (B, R) kept positions
    fields: dict[str, torch.Tensor] = {}
    if "log_prob" in needs:
        fields["log_prob"] = no_padding_2_padding(model_output["log_probs"], data)  # (B, R)
    dtype = fields["log_prob"].dtype if fields else torch.float32
    if "old_log_prob" in needs:
        fields["old_log_prob"] = _padded(data["old_log_probs"]).to(dtype)  # (B, R)
    if "teacher_log_prob" in needs:
        fields["teacher_log_prob"] = _padded(data[F.TEACHER_LOGP]).to(dtype)  # (B, R)
    cfg = distillation_config.distillation_loss
    out = get_token_loss(loss)(LossInputs(mask=mask, **fields), clip_low=cfg.clip_ratio_low,
                               clip_high=cfg.clip_ratio_high)
    return out.loss, _token_metrics(loss, out.loss, out.metrics, mask, data)


def _logits_loss(config, distillation_config, model_output: dict, data, *, loss: str) -> tuple[torch.Tensor, dict]:
    """(B, R) per-token loss of a logits-path loss, computed by the processor (token_loss_outputs)."""
    per_token = no_padding_2_padding(model_output[TOKEN_LOSS_OUTPUT], data)  # (B, R)
    metrics = {k[len(TOKEN_METRIC_PREFIX):]: no_padding_2_padding(v, data)
               for k, v in model_output.items() if k.startswith(TOKEN_METRIC_PREFIX)}
    mask = _padded(data["response_mask"], 0).bool()
    return per_token, _token_metrics(loss, per_token, metrics, mask, data)


def _token_metrics(loss: str, per_token: torch.Tensor, metrics: dict[str, torch.Tensor], mask: torch.Tensor,
                   data) -> dict[str, Metric]:
    """``ta_opd/loss/<loss>`` and the loss's per-token metrics, each a global mean over kept tokens."""
    return {f"ta_opd/loss/{loss}": _global_token_mean(per_token, mask, data),
            **{k: _global_token_mean(v, mask, data) for k, v in sorted(metrics.items())}}


def _global_token_mean(x: torch.Tensor, mask: torch.Tensor, data) -> Metric:
    """This micro-batch's share of the global mean of x over kept tokens, as a SUM metric (see
    the module docstring): Σ_mask x · dp_size / (global kept tokens)."""
    dp_size = tu.get_non_tensor_data(data=data, key="dp_size", default=1)
    n_global = max(int(tu.get_non_tensor_data(data=data, key="batch_num_tokens", default=int(mask.sum()))), 1)
    local = torch.where(mask, x.detach().float(), torch.zeros((), device=x.device)).sum()  # where: NaN never leaks
    return Metric(AggregationType.SUM, local * dp_size / n_global)  # max(., 1): no kept token anywhere -> 0


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


register_losses()


# ----------------------------------------------------------------------------- logits processor


def _rows_and_teacher(student_logits: torch.Tensor, data):
    """Rows of the packed logits that score valid response tokens, and the teacher's top-K' there."""
    rows = F.response_rows(data).to(student_logits.device)
    t_ids = data[F.TEACHER_IDS]
    t_lp = data[F.TEACHER_LOGPROBS]
    t_ids = (t_ids.values() if t_ids.is_nested else t_ids.reshape(-1, t_ids.shape[-1]))[rows]
    t_lp = (t_lp.values() if t_lp.is_nested else t_lp.reshape(-1, t_lp.shape[-1]))[rows]
    return rows, t_ids, t_lp


STATS_ENTROPY = "entropy"  # verl's own model_output key, emitted by the statistics hook (one sweep)


def entropy_from_hook(cfg: TAConfig) -> bool:
    """Whether the statistics pass takes verl's ``entropy`` (the ``actor/entropy`` metric) from
    our hook's H instead of asking verl for a second sweep over the logits (issue 23, item 2):
    only when H is the full-vocabulary entropy (``ta_opd.entropy=full``); H in mode ``topk`` is
    another quantity, and then verl computes its own."""
    return cfg.entropy == "full"


def statistics_outputs(student_logits: torch.Tensor, data, cfg: TAConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """The TA statistics of one micro-batch as per-token scalars, each (1, nnz) fp32: zeros on
    rows that score no valid response token. student_logits: (1, nnz, V_model) packed. When verl
    was told not to compute its entropy (``calculate_entropy`` off, :func:`entropy_from_hook`),
    also ``entropy`` = H from the same sweep: the full-vocabulary entropy over the shared
    vocabulary (equal to verl's when the LM head has no padding rows; with padding rows it leaves
    out their mass) at the valid response rows, 0 at rows verl's driver never reads."""
    if student_logits.dim() != 3 or student_logits.shape[0] != 1:
        raise ValueError(f"expected packed (1, nnz, V) student logits, got {tuple(student_logits.shape)}")
    nnz = student_logits.shape[1]
    rows, t_ids, t_lp = _rows_and_teacher(student_logits, data)
    out = {F.stat_key(n): torch.zeros(1, nnz, dtype=torch.float32, device=student_logits.device)
           for n in PositionStats.SCALARS}
    if rows.numel() == 0:
        return _with_entropy(out, data, cfg)
    with torch.no_grad():
        stats = sparse_position_stats(
            student_logits[0, :, :vocab_size].detach(), t_ids.to(student_logits.device), t_lp.to(student_logits.device),
            topk=cfg.topk, entropy=cfg.entropy, rows=rows, **cfg.stats_chunking())
    for name, v in stats.scalars().items():
        out[F.stat_key(name)][0, rows] = v
    return _with_entropy(out, data, cfg)


def _with_entropy(out: dict[str, torch.Tensor], data, cfg: TAConfig) -> dict[str, torch.Tensor]:
    if entropy_from_hook(cfg) and not tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False):
        out[STATS_ENTROPY] = out[F.stat_key("H")]
    return out


def logit_index(rows: torch.Tensor, logit_rows: torch.Tensor | None) -> torch.Tensor:
    """(N,) where each packed row of ``rows`` sits in the logits handed to the processor: the row
    itself for verl's full packed logits (``logit_rows`` None), else its position in
    ``logit_rows`` (n,) ascending, the original packed rows of the compact kept-row logits
    (``engine.KeptRowsEngine``). Raises when a row has no logits there."""
    if logit_rows is None:
        return rows
    logit_rows = logit_rows.to(rows.device)
    at = torch.searchsorted(logit_rows, rows).clamp_max(max(logit_rows.numel() - 1, 0))  # (N,)
    if rows.numel() and (logit_rows.numel() == 0 or not torch.equal(logit_rows[at], rows)):
        raise ValueError(f"{rows.numel()} rows need logits but the kept-row logits cover rows "
                         f"{logit_rows.tolist()[:8]}...; the engine's plan and response_mask disagree")
    return at


def token_loss_outputs(student_logits: torch.Tensor, data, cfg: TAConfig, vocab_size: int,
                       logit_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-token loss of logits-path loss ``cfg.loss`` (with gradient) and its per-token
    metrics, each (1, nnz): computed at the kept rows only, zeros elsewhere. The declared
    LossInputs are built per chunk of rows as a (1, n) batch: the student's full-vocabulary
    log-probs at the teacher's top-K ids (its first K of K') and rest mass, the teacher's top-K
    log-probs, log π_θ(y_t) from the same logits (every logit row, as verl's ``log_probs``),
    log π_old(y_t) and log π_T(y_t) from the batch.
    student_logits: (1, nnz, V_model) packed, or (1, n, V_model) at the original packed rows
    ``logit_rows`` (n,) only (the kept-rows engine; :func:`logit_index`)."""
    needs, token_fn = loss_needs(cfg.loss), get_token_loss(cfg.loss)
    dev = student_logits.device
    rows, t_ids, t_lp = _rows_and_teacher(student_logits, data)  # (N,), (N, K'), (N, K')
    at = logit_index(rows, logit_rows)  # (N,) rows of student_logits
    nnz = student_logits.shape[1] if logit_rows is None else data["input_ids"].values().shape[0]
    ids = t_ids[:, : cfg.topk].long().to(dev)  # (N, K)
    t_lp = t_lp[:, : cfg.topk].to(dev)  # (N, K)
    _check_teacher_rows(t_lp, rows)
    kept = _padded(data["response_mask"], 0).bool()  # (B, R); row-major order = the order of rows
    given = [n for n in ("old_log_prob", "teacher_log_prob") if n in needs]
    from_batch = [_padded(data[{"old_log_prob": "old_log_probs", "teacher_log_prob": F.TEACHER_LOGP}[n]])[kept]
                  .float().to(dev) for n in given]  # (N,) each
    # (N,) y_t, the token row t scores (the next packed token); unused (rows stand in) without log_prob
    sampled = data["input_ids"].values().to(dev)[rows + 1] if "log_prob" in needs else rows

    def chunk(logits, r, i, t, y, *batch_fields):  # recomputed in backward: no (N, V) fp32 copy is kept
        x_model = logits[0, r]  # (n, V_model)
        x = x_model[:, :vocab_size]  # (n, V): the shared vocabulary
        f = {name: v.unsqueeze(0) for name, v in zip(given, batch_fields)}  # (1, n) each
        if {"student_topk_logp", "student_rest_logp"} & set(needs):
            s_lp, s_rest = topk_logp_and_rest(x, i)  # (n, K), (n,)
            for name, v in (("student_topk_logp", s_lp), ("student_rest_logp", s_rest)):
                if name in needs:  # an undeclared field stays None, as on the CPU backend
                    f[name] = v.unsqueeze(0)
        if "teacher_topk_logp" in needs:
            f["teacher_topk_logp"] = t.unsqueeze(0)  # (1, n, K)
        if "log_prob" in needs:  # over every logit row, as verl's own log_probs (the sampled path's)
            xf = x_model.float()
            f["log_prob"] = (xf.gather(-1, y.long().unsqueeze(-1)).squeeze(-1) - xf.logsumexp(-1)).unsqueeze(0)
        out = token_fn(LossInputs(mask=torch.ones(1, r.numel(), dtype=torch.bool, device=dev), **f),
                       clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        return out.loss[0].float(), {k: v[0].detach().float() for k, v in out.metrics.items()}

    from torch.utils.checkpoint import checkpoint

    n, step = rows.numel(), cfg.chunk_size
    parts = [checkpoint(chunk, student_logits, at[a:a + step], ids[a:a + step], t_lp[a:a + step],
                        sampled[a:a + step], *(v[a:a + step] for v in from_batch), use_reentrant=False)
             for a in range(0, max(n, 1), step)]  # n = 0: one empty chunk, for the metric names
    zeros = torch.zeros(1, nnz, dtype=torch.float32, device=dev)
    at = (torch.zeros_like(rows), rows)
    loss = zeros.index_put(at, torch.cat([p[0] for p in parts]))
    if n == 0:  # still a function of the logits: every FSDP rank runs the same backward collectives
        loss = loss + 0.0 * student_logits.sum()
    out = {TOKEN_LOSS_OUTPUT: loss}
    for key in parts[0][1]:
        out[TOKEN_METRIC_PREFIX + key] = zeros.index_put(at, torch.cat([p[1][key] for p in parts]))
    return out


def _check_teacher_rows(t_lp: torch.Tensor, rows: torch.Tensor) -> None:
    """NaN or +inf teacher log-probs at a kept row must not turn into a silent loss value."""
    bad = (torch.isnan(t_lp) | (t_lp == float("inf"))).any(-1)  # (n,)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise TAInputError(f"the teacher's top-K log-probs are {t_lp[i].tolist()[:8]}... at packed row {int(rows[i])} "
                           f"of this micro-batch (a kept response token; {int(bad.sum())} such rows): NaN or +inf "
                           "teacher outputs would make the top-K loss NaN; check the teacher at that position")


def update_flags(loss_mode: str) -> dict[str, bool | str]:
    """The engine flags of the update forward for a registered loss mode. verl derives them from its
    global distillation switch and the loss's top-K setting, which fits neither of our paths: the
    sampled path needs verl's current log-probs (verl would skip them for a top-K loss without
    policy gradient) and no logits processor; the logits path needs the processor and nothing else
    (it computes log π_θ(y_t) itself when the loss reads it). Plus ``ta_opd_phase = "update"``:
    the kept-rows engine (``engine.py``) runs this forward on the kept rows only."""
    if loss_mode not in _MODES:
        raise TAConfigError(f"verl loss mode {loss_mode!r} was not registered by TA-OPD; registered: "
                            f"{', '.join(sorted(_MODES))}")
    logits = _MODES[loss_mode][1]
    return {"distillation_use_topk": logits, "distillation_only": logits, F.PHASE: F.PHASE_UPDATE}


def ta_opd_actor_loss(*, inner, cfg: TAConfig, vocab_size: int, loss_mode: str, model_output=None, data=None,
                      dp_group=None, student_logits=None, data_format: str = "thd", actor_config=None,
                      distillation_config=None, logit_rows=None):
    """The actor's loss function (see module docstring); ``inner`` is verl's distillation loss.
    ``logit_rows``: the original packed rows of compact kept-row logits (``engine.py``)."""
    phase = tu.get_non_tensor_data(data=data, key=F.PHASE, default=None)
    if student_logits is not None:  # called as logits processor
        if phase == F.PHASE_STATS:
            return statistics_outputs(student_logits, data, cfg, vocab_size)
        if _MODES[loss_mode][1]:
            return token_loss_outputs(student_logits, data, cfg, vocab_size, logit_rows)
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
    loss_mode = distillation_config.distillation_loss.loss_mode
    if _MODES.get(loss_mode, (None,))[0] != cfg.loss:
        raise TAConfigError(f"verl loss mode {loss_mode!r} does not run ta_opd.loss={cfg.loss!r} (registered TA-OPD "
                            f"modes: {_MODES}); build the distillation config with validate.plan")
    inner = partial(distillation_ppo_loss, config=actor_config, distillation_config=distillation_config)
    return partial(ta_opd_actor_loss, inner=inner, cfg=cfg, vocab_size=vocab_size,
                   loss_mode=loss_mode, actor_config=actor_config,
                   distillation_config=distillation_config)
