"""The registered statistics hook and losses through verl's own batch conversion
(``left_right_2_no_padding``, ``no_padding_2_padding``) and micro-batching
(``prepare_micro_batches``, ``postprocess_batch_func``) on CPU equal ``ta_opd`` on the same data."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from verl import DataProto
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from recipe.ta_opd.main import ta_config
from recipe.ta_opd.verl_backend import fields as F
from recipe.ta_opd.verl_backend.losses import make_actor_loss
from recipe.ta_opd.verl_backend.trainer import apply_selection
from recipe.ta_opd.verl_backend.validate import plan
from ta_opd.losses import LossInputs, compute_loss, loss_needs, topk_logp_and_rest
from ta_opd.select import select_positions
from ta_opd.stats import PositionStats, sparse_position_stats
from tests.verl.engine_sim import forward_backward
from tests.verl.helpers import VOCAB

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "recipe" / "ta_opd" / "config")
MICRO = [dict(use_dynamic_bsz=False, micro_batch_size_per_gpu=2), dict(use_dynamic_bsz=True, max_token_len_per_gpu=24)]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("ta_opd_trainer", overrides=["ta_opd.teacher_topk=12", "ta_opd.topk=4", *overrides])


def configs(*overrides, loss_mode=None, policy_gradient=False):
    """(TAConfig, ActorConfig, actor DistillationConfig) as the verl backend builds them."""
    cfg = compose_cfg(*overrides)
    ta = ta_config(cfg.ta_opd)
    p = plan(cfg, ta, student_path="unused", teacher_path="unused", vocab_size=VOCAB)
    dist = OmegaConf.create(p.actor_distillation)
    if loss_mode is not None:  # verl's own modes, for comparisons
        dist.distillation_loss.loss_mode = loss_mode
        dist.distillation_loss.use_policy_gradient = policy_gradient
    actor_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    return ta, actor_cfg, omega_conf_to_dataclass(dist)


def to_td(batch: dict, **flags):
    td = left_right_2_no_padding(DataProto.from_dict(tensors=dict(batch)).to_tensordict())
    tu.assign_non_tensor(td, **flags)
    return td


def reference_stats(model, batch, ta) -> PositionStats:
    """ta_opd directly: per-sequence unpadded forward, response rows, sparse_position_stats."""
    valid = batch["response_mask"].bool()
    R = batch["responses"].shape[1]
    P = batch["input_ids"].shape[1] - R
    logits, ids, lps = [], [], []
    with torch.no_grad():
        for b in range(valid.shape[0]):
            keep = batch["attention_mask"][b].bool()
            x = model(input_ids=batch["input_ids"][b][keep].unsqueeze(0)).logits[0, :, :VOCAB]
            n_p, n_r = int(keep[:P].sum()), int(valid[b].sum())
            logits.append(x[n_p - 1 : n_p - 1 + n_r])
            ids.append(batch[F.TEACHER_IDS][b, P - 1 : P - 1 + n_r])
            lps.append(batch[F.TEACHER_LOGPROBS][b, P - 1 : P - 1 + n_r])
    stats = sparse_position_stats(torch.cat(logits), torch.cat(ids), torch.cat(lps), topk=ta.topk, entropy=ta.entropy,
                                  chunk_size=ta.chunk_size)
    return PositionStats.from_scalars(stats.scalars()).scatter(valid)


def hook_stats(model, batch, ta, actor_cfg, dist_cfg, micro) -> tuple[PositionStats, torch.Tensor]:
    td = to_td(batch, calculate_entropy=True, compute_loss=True, distillation_use_topk=True,
               **{F.PHASE: F.PHASE_STATS}, **micro)
    out, _ = forward_backward(model, td, make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB), forward_only=True)
    mo = out["model_output"]
    grid = {n: no_padding_2_padding(mo[F.stat_key(n)], td) for n in PositionStats.SCALARS}
    return PositionStats.from_scalars(grid), no_padding_2_padding(mo["log_probs"], td)


@pytest.mark.parametrize("micro", MICRO, ids=["fixed_micro", "dynamic_bsz"])
def test_statistics_hook_equals_ta_opd(models, rollout, micro):
    ta, actor_cfg, dist_cfg = configs()
    got, _ = hook_stats(models["student"], rollout, ta, actor_cfg, dist_cfg, micro)
    want = reference_stats(models["student"], rollout, ta)
    valid = rollout["response_mask"].bool()
    for name in PositionStats.SCALARS:
        torch.testing.assert_close(getattr(got, name)[valid].float(), getattr(want, name)[valid].float(),
                                   atol=2e-5, rtol=1e-5, msg=name)
        assert getattr(got, name)[~valid].abs().sum() == 0, name
    assert int(got.missing[valid].sum()) > 0  # K'=12 of V=96: some student top-K ids were not shipped


def test_selection_over_dp_shards_equals_single_process(models, rollout):
    """Two simulated DP ranks each run the statistics pass on their shard (verl's DP split), the
    driver concatenates (verl's collect) and selects: same mask as one process on the whole batch."""
    ta, actor_cfg, dist_cfg = configs("ta_opd.budget=0.2")
    B = rollout["input_ids"].shape[0]
    shards = [{k: v[s] for k, v in rollout.items()} for s in (slice(0, B // 2), slice(B // 2, B))]
    grids = [hook_stats(models["student"], sh, ta, actor_cfg, dist_cfg, MICRO[0])[0] for sh in shards]
    proto = DataProto.from_dict(tensors=dict(rollout))
    for n in PositionStats.SCALARS:
        proto.batch[F.stat_key(n)] = torch.cat([getattr(g, n).float() for g in grids])
    sel, full = apply_selection(proto, ta, step=3)
    want = select_positions(reference_stats(models["student"], rollout, ta), rollout["response_mask"].bool(), ta, 3)
    assert torch.equal(sel.mask, want.mask)
    assert torch.equal(proto.batch["response_mask"].bool(), want.mask & full.bool())
    assert 0 < int(want.mask.sum()) < int(full.sum())


def _update_batch(rollout, mask, old_log_probs):
    b = dict(rollout)
    b["response_mask"] = (rollout["response_mask"].bool() & mask).long()
    b["old_log_probs"] = old_log_probs
    b["advantages"] = torch.zeros_like(old_log_probs)
    return b


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _selected(models, rollout, *overrides, step=1):
    """Configs, the statistics pass (old log-probs) and the selected mask of the rollout."""
    ta, actor_cfg, dist_cfg = configs(*overrides)
    stats, logp = hook_stats(models["student"], rollout, ta, actor_cfg, dist_cfg, MICRO[0])
    valid = rollout["response_mask"].bool()
    return ta, actor_cfg, dist_cfg, logp, valid, select_positions(stats, valid, ta, step=step).mask


def test_masked_loss_equals_ta_opd_and_gradient_is_zero_off_the_kept_rows(models, rollout):
    model = models["student"]
    ta, actor_cfg, dist_cfg, logp, valid, mask = _selected(models, rollout, "ta_opd.budget=0.3")
    old = logp.detach()  # on-policy (ratio 1, nothing clipped): every kept row must get a gradient
    batch = _update_batch(rollout, mask, old)
    kept_rows = []

    def leaf(l):  # packed logits as a leaf: gradient per row
        l = l.detach().requires_grad_()
        kept_rows.append(l)
        return l

    model.zero_grad()
    td = to_td(batch, calculate_entropy=False, compute_loss=True, distillation_use_topk=False, global_batch_size=8,
               **MICRO[1])
    out, total = forward_backward(model, td, make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB), forward_only=False,
                                  logits_hook=leaf)
    # reference: ta_opd's pg_opd on the (B, R) grid, one pass
    model.zero_grad()
    g_ref = _reference_pg(model, rollout, mask & valid, old, ta)
    torch.testing.assert_close(total, g_ref[0], atol=1e-6, rtol=1e-5)
    # gradient reaches the model only through kept positions; every other packed row gets exactly 0
    for mb_logits, mb in zip(kept_rows, _micro_batches(td)):
        rows = F.response_rows(mb)
        grad = mb_logits.grad[0].abs().sum(-1)
        others = torch.ones_like(grad, dtype=torch.bool)
        others[rows] = False
        assert grad[others].sum() == 0
        assert bool((grad[rows] > 0).all())


def _micro_batches(td):
    from verl.workers.engine.utils import prepare_micro_batches

    return prepare_micro_batches(data=td, dp_group=None, same_micro_num_in_dp=True)[0]


def _reference_pg(model, rollout, mask, old, ta):
    R = rollout["responses"].shape[1]
    P = rollout["input_ids"].shape[1] - R
    logits = model(input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"],
                   position_ids=rollout["position_ids"]).logits[:, P - 1 : P - 1 + R]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, rollout["responses"].unsqueeze(-1)).squeeze(-1)
    out = compute_loss("pg_opd", LossInputs(mask=mask, log_prob=logp, old_log_prob=old,
                                            teacher_log_prob=rollout[F.TEACHER_LOGP]),
                       clip_low=ta.clip_low, clip_high=ta.clip_high, loss_agg=ta.loss_agg)
    out.loss.backward()
    return out.loss.detach(), _grads(model)


def test_masked_gradients_equal_ta_opd_off_policy(models, rollout):
    """Off-policy old log-probs (ratios clipped at 0.2 / 0.28): same gradients as ta_opd's pg_opd."""
    model = models["student"]
    ta, actor_cfg, dist_cfg, logp, valid, mask = _selected(models, rollout, "ta_opd.budget=0.3")
    old = torch.where(valid, logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)), 0.0)
    model.zero_grad()
    td = to_td(_update_batch(rollout, mask, old), calculate_entropy=False, compute_loss=True, global_batch_size=8,
               distillation_use_topk=False, **MICRO[0])
    forward_backward(model, td, make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB), forward_only=False)
    got = _grads(model)
    model.zero_grad()
    _, want = _reference_pg(model, rollout, mask & valid, old, ta)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_rho_one_equals_verls_unmasked_pg_opd(models, rollout):
    """selector=full (rho = 1): our masked loss == verl's own PG-OPD (k1 estimator, policy
    gradient, vanilla PPO loss) on the unmasked batch, in value and gradient, at the on-policy
    point of a one-step-per-rollout update (where verl's dual clip and current-policy k1 coincide
    with the spec's plain clip and π_old)."""
    model = models["student"]
    ta, actor_cfg, dist_cfg = configs("ta_opd.selector=full")
    stats, logp = hook_stats(model, rollout, ta, actor_cfg, dist_cfg, MICRO[0])
    valid = rollout["response_mask"].bool()
    proto = DataProto.from_dict(tensors=dict(rollout))
    for n in PositionStats.SCALARS:
        proto.batch[F.stat_key(n)] = getattr(stats, n).float()
    sel, _ = apply_selection(proto, ta, step=0)
    assert torch.equal(sel.mask, valid)
    batch = _update_batch(rollout, sel.mask, logp.detach())

    model.zero_grad()
    td = to_td(batch, calculate_entropy=False, compute_loss=True, distillation_use_topk=False, global_batch_size=8,
               **MICRO[0])
    _, ours = forward_backward(model, td, make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB), forward_only=False)
    g_ours = _grads(model)

    # verl: teacher_logprobs (B, S, 1) = log π_T(y_t) at the row scoring y_t, as its estimator expects
    from functools import partial

    from verl.trainer.distillation.losses import distillation_ppo_loss

    _, _, verl_dist = configs("ta_opd.selector=full", loss_mode="k1", policy_gradient=True)
    B, S = rollout["input_ids"].shape
    R = rollout["responses"].shape[1]
    vb = dict(batch)
    vb[F.TEACHER_LOGPROBS] = torch.zeros(B, S, 1)
    vb[F.TEACHER_LOGPROBS][:, S - R - 1 : S - 1, 0] = rollout[F.TEACHER_LOGP]
    vb[F.TEACHER_IDS] = torch.zeros(B, S, 1, dtype=torch.int32)
    model.zero_grad()
    td = to_td(vb, calculate_entropy=False, compute_loss=True, distillation_use_topk=False, global_batch_size=8,
               **MICRO[0])
    _, theirs = forward_backward(model, td, partial(distillation_ppo_loss, config=actor_cfg, distillation_config=verl_dist),
                                 forward_only=False)
    assert float(ours.abs()) > 0
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_ours, _grads(model), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("loss", ["topk_forward_kl", "topk_reverse_kl"])
def test_topk_losses_through_the_update_processor_equal_ta_opd(models, rollout, loss):
    model = models["student"]
    ta, actor_cfg, dist_cfg, logp, valid, mask = _selected(models, rollout, "ta_opd.budget=0.3",
                                                           f"ta_opd.loss={loss}", step=2)
    assert dist_cfg.distillation_loss.loss_mode == f"ta_opd_{loss}"
    model.zero_grad()
    td = to_td(_update_batch(rollout, mask, logp.detach()), calculate_entropy=False, compute_loss=True,
               global_batch_size=8, distillation_use_topk=True, distillation_only=True, **MICRO[1])
    _, got = forward_backward(model, td, make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB), forward_only=False)
    g_got = _grads(model)
    model.zero_grad()
    R = rollout["responses"].shape[1]
    P = rollout["input_ids"].shape[1] - R
    logits = model(input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"],
                   position_ids=rollout["position_ids"]).logits[:, P - 1 : P - 1 + R, :VOCAB]
    ids = rollout[F.TEACHER_IDS][:, P - 1 : P - 1 + R, : ta.topk].long()
    s_lp, s_rest = topk_logp_and_rest(logits, ids)
    t_lp = rollout[F.TEACHER_LOGPROBS][:, P - 1 : P - 1 + R, : ta.topk]
    want = compute_loss(loss, LossInputs(mask=mask & valid, student_topk_logp=s_lp, student_rest_logp=s_rest,
                                         teacher_topk_logp=t_lp), loss_agg=ta.loss_agg)
    want.loss.backward()
    assert float(want.loss) > 0
    torch.testing.assert_close(got, want.loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_got, _grads(model), atol=1e-7, rtol=1e-4)


def test_vllm_teacher_sampled_logp_from_top_k(rollout):
    """teacher_backend=vllm: log π_T(y_t) comes from the shipped top-K' where y_t is in it (exact),
    else the documented point value; the fraction of point values is reported."""
    from recipe.ta_opd.verl_backend.trainer import teacher_logp_from_topk

    proto = DataProto.from_dict(tensors={k: v for k, v in rollout.items() if k != F.TEACHER_LOGP})
    m = teacher_logp_from_topk(proto, VOCAB)
    got = proto.batch[F.TEACHER_LOGP]
    valid = rollout["response_mask"].bool()
    R = rollout["responses"].shape[1]
    P = rollout["input_ids"].shape[1] - R
    ids = rollout[F.TEACHER_IDS][:, P - 1 : P - 1 + R]
    inside = (ids.long() == rollout["responses"].unsqueeze(-1)).any(-1) & valid
    torch.testing.assert_close(got[inside], rollout[F.TEACHER_LOGP][inside], atol=1e-6, rtol=0)
    outside = valid & ~inside
    assert bool(outside.any()) and bool(inside.any())
    # outside the top-K' the point value never exceeds the K'-th shipped probability
    kth = rollout[F.TEACHER_LOGPROBS][:, P - 1 : P - 1 + R, -1]
    assert bool((got[outside] <= kth[outside] + 1e-6).all())
    assert m["ta_opd/teacher/sampled_missing_fraction"] == pytest.approx(float(outside.sum() / valid.sum()))


def test_forward_topk_kl_equals_verls_forward_kl_topk_where_the_forms_coincide():
    """Where the teacher's top-K holds all of its mass (rest bin 0), our (K + 1)-bin forward KL is
    verl's forward_kl_topk (its FSDP logits-processor function, which computes the per-token loss;
    verl's final loss function only unpads and clamps it at >= 0): same per-token values and the
    same gradient on the student's logits."""
    from verl.trainer.distillation.fsdp.losses import compute_forward_kl_topk as verl_processor

    from ta_opd.losses import topk_kl_per_token

    _, actor_cfg, dist_cfg = configs(loss_mode="forward_kl_topk")
    # our plan keeps verl's clamps off: log_prob_min_clamp would cut the gradient of student log-probs
    # below it, loss_max_clamp that of per-token losses above it (ours included: verl applies it to
    # every registered distillation loss)
    assert dist_cfg.distillation_loss.log_prob_min_clamp is None and dist_cfg.distillation_loss.loss_max_clamp is None
    assert configs()[2].distillation_loss.loss_max_clamp is None
    gen = torch.Generator().manual_seed(0)
    lens, K, V = [4, 3], 5, VOCAB
    N = sum(lens)
    logits = torch.randn(1, N, V, generator=gen).requires_grad_(True)  # (1, nnz, V) packed
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)])  # (N, K) distinct
    t_lp = torch.log_softmax(2 * torch.randn(N, K, generator=gen), -1)  # all the teacher's mass on its K ids
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    nested = lambda x: torch.nested.nested_tensor_from_jagged(x, offsets)  # noqa: E731
    out = verl_processor(student_logits=logits, teacher_topk_log_probs=nested(t_lp), teacher_topk_ids=nested(ids),
                         config=dist_cfg, data_format="thd")
    theirs = out["distillation_losses"][0].clamp_min(0.0)  # (N,); verl's final loss then clamps at 0
    g_theirs, = torch.autograd.grad(theirs.sum(), logits)

    s_lp, s_rest = topk_logp_and_rest(logits[0], ids)
    ours = topk_kl_per_token(s_lp, s_rest, t_lp, reverse=False)  # (N,)
    g_ours, = torch.autograd.grad(ours.sum(), logits)
    assert float(ours.min()) > 0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss", ["pg_opd", "topk_forward_kl"])
def test_an_empty_micro_batch_aggregates_across_two_dp_ranks(models, rollout, loss, monkeypatch):
    """Issue 9: rank 1's first micro-batch keeps no position. Each rank runs our loss through
    verl's micro-batching and postprocess_batch_func; then verl's own cross-rank path:
    allgather_dict_into_dict (all_gather_object stubbed to hand over both ranks' dicts) and the
    Metric.aggregate_dp loop of ActorRolloutRefWorker.train_mini_batch (engine_workers.py ~l.323).
    Before the fix the empty micro-batch returned {} and aggregate_dp raised ValueError."""
    from itertools import chain

    import verl.utils.torch_functional as vtf
    from verl.utils.metric import Metric
    from verl.utils.metric.utils import reduce_metrics
    from verl.utils.py_functional import append_to_dict

    model = models["student"]
    ta, actor_cfg, dist_cfg, logp, valid, mask = _selected(models, rollout, "ta_opd.budget=0.5", f"ta_opd.loss={loss}")
    batch = _update_batch(rollout, mask, logp.detach())
    B = batch["input_ids"].shape[0]
    shards = [{k: v[: B // 2] for k, v in batch.items()}, {k: v[B // 2:] for k, v in batch.items()}]
    shards[1]["response_mask"][:2] = 0  # rank 1's first micro-batch (2 sequences) keeps nothing
    kept = [s["response_mask"].bool() for s in shards]
    n_global = int(sum(k.sum() for k in kept))
    assert all(int(k.sum()) > 0 for k in kept)
    topk = loss != "pg_opd"
    per_rank = []
    for shard in shards:
        td = to_td(shard, calculate_entropy=False, compute_loss=True, global_batch_size=B,
                   distillation_use_topk=topk, distillation_only=topk, **MICRO[0])
        out, _ = forward_backward(model, td, make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB), forward_only=False,
                                  dp_size=2, batch_num_tokens=n_global)
        per_rank.append(out["metrics"])
    assert per_rank[0].keys() == per_rank[1].keys()

    monkeypatch.setattr(vtf.torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(vtf.torch.distributed, "all_gather_object",
                        lambda out, obj, group=None: out.__setitem__(slice(None), per_rank))
    gathered = vtf.allgather_dict_into_dict(data=per_rank[0], group=object())
    output = {k: (Metric.aggregate_dp(v) if isinstance(v[0], Metric) else list(chain.from_iterable(v)))
              for k, v in gathered.items()}
    final = {}
    append_to_dict(final, output)
    final = reduce_metrics(final)

    if loss == "pg_opd":  # the global token mean over both ranks' kept positions
        want = float(torch.cat([(s["old_log_probs"] - s[F.TEACHER_LOGP])[k] for s, k in zip(shards, kept)]).mean())
        assert final["ta_opd/loss/sampled_kl"] == pytest.approx(want, rel=1e-5)
        assert final["ta_opd/loss/clipfrac"] == 0.0  # on-policy
    else:
        assert 0 < final["ta_opd/loss/student_topk_mass"] < 1 and final["ta_opd/loss/topk_forward_kl"] > 0
        assert 0 < final["ta_opd/loss/teacher_topk_mass"] <= 1 + 1e-5
    assert final["distillation/loss_min"] <= final["distillation/loss_max"]
    assert all(v == v and abs(v) != float("inf") for v in final.values())  # no NaN / inf reaches the logger


def test_topk_processor_refuses_a_nan_teacher_value_at_a_kept_row(models, rollout):
    """Issue 14: a NaN teacher log-prob at a kept row must not become a silent top-K loss value."""
    from recipe.ta_opd.verl_backend.losses import token_loss_outputs
    from ta_opd.errors import TAInputError

    ta, actor_cfg, dist_cfg, logp, valid, mask = _selected(models, rollout, "ta_opd.budget=0.3",
                                                           "ta_opd.loss=topk_forward_kl", step=2)
    batch = _update_batch(rollout, mask, logp.detach())
    kept = batch["response_mask"].bool()
    b, t = (int(i) for i in kept.nonzero()[0])
    R = rollout["responses"].shape[1]
    P = rollout["input_ids"].shape[1] - R
    batch[F.TEACHER_LOGPROBS] = batch[F.TEACHER_LOGPROBS].clone()
    batch[F.TEACHER_LOGPROBS][b, P - 1 + t, 0] = float("nan")
    td = to_td(batch, calculate_entropy=False, compute_loss=True, global_batch_size=8, distillation_use_topk=True,
               distillation_only=True, **MICRO[0])
    mb = _micro_batches(td)
    logits = [torch.randn(1, int(m["input_ids"].values().shape[0]), 104) for m in mb]
    with pytest.raises(TAInputError, match="teacher's top-K log-probs .*nan.* at packed row"):
        for m, x in zip(mb, logits):
            token_loss_outputs(x, m, ta, VOCAB)


# ----------------------------------------------------------------------------- the loss registry on verl


@pytest.fixture
def toy_losses():
    """Two losses registered for this test only, per token: one the final loss can build (sampled
    path), one that also reads top-K fields (logits path, every LossInputs field but the rest
    mass); and one registered aggregated only. Unregistered afterwards, from ta_opd and verl."""
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY, DISTILLATION_SETTINGS_REGISTRY

    from recipe.ta_opd.verl_backend import losses as L
    from ta_opd.losses import _LOSSES, TokenLoss, aggregate, register_loss

    @register_loss("test_toy_sampled", needs=("log_prob", "teacher_log_prob"), per_token=True)
    def sampled(inp, **_):  # (B, R): half the squared sampled-token log-ratio
        gap = inp.log_prob - inp.teacher_log_prob.detach()
        return TokenLoss(torch.where(inp.mask, 0.5 * gap ** 2, 0.0), {"ta_opd/loss/toy_gap": gap.detach()})

    needs = ("log_prob", "old_log_prob", "teacher_log_prob", "student_topk_logp", "teacher_topk_logp")

    @register_loss("test_toy_logits", needs=needs, per_token=True)
    def logits(inp, *, clip_low, clip_high):  # sampled gap + teacher-weighted cross-entropy on its top-K + ratio
        gap = inp.log_prob - inp.teacher_log_prob.detach()
        p_t = inp.teacher_topk_logp.detach().exp()  # (B, R, K)
        ce = -(p_t * inp.student_topk_logp).sum(-1)  # (B, R)
        ratio = (inp.log_prob - inp.old_log_prob.detach()).clamp(-clip_low, clip_high)
        per_token = 0.5 * gap ** 2 + ce + ratio
        return TokenLoss(torch.where(inp.mask, per_token, 0.0), {"ta_opd/loss/toy_ce": ce.detach()})

    @register_loss("test_toy_aggregated", needs=("log_prob",))
    def aggregated(inp, *, loss_agg="token-mean", denominator=None, **_):
        from ta_opd.losses import LossOutput
        return LossOutput(aggregate(inp.log_prob ** 2, inp.mask, loss_agg, denominator), {})

    names = ("test_toy_sampled", "test_toy_logits", "test_toy_aggregated")
    yield names
    for name in names:
        _LOSSES._items.pop(name, None)
    for mode in [m for m, (loss, _) in L._MODES.items() if loss in names]:
        DISTILLATION_LOSS_REGISTRY.pop(mode, None)
        DISTILLATION_SETTINGS_REGISTRY.pop(mode, None)
        L._MODES.pop(mode)


@pytest.mark.parametrize("loss", ["test_toy_sampled", "test_toy_logits"])
def test_a_newly_registered_per_token_loss_runs_on_verls_loss_path(models, rollout, toy_losses, loss):
    """A loss registered per token (no edit of the verl adapter) runs through verl's update and
    equals ta_opd's compute_loss on the (B, R) grid, in value, metrics and gradient: off-policy
    old log-probs, both micro-batchings."""
    from recipe.ta_opd.verl_backend.losses import on_logits_path, update_flags

    model = models["student"]
    ta, actor_cfg, dist_cfg, logp, valid, mask = _selected(models, rollout, "ta_opd.budget=0.3", f"ta_opd.loss={loss}")
    mode = dist_cfg.distillation_loss.loss_mode
    assert mode == f"ta_opd_{loss}" and on_logits_path(loss) == (loss == "test_toy_logits")
    logits_path = on_logits_path(loss)
    assert update_flags(mode) == {"distillation_use_topk": logits_path, "distillation_only": logits_path,
                                  F.PHASE: F.PHASE_UPDATE}
    old = torch.where(valid, logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2)), 0.0)
    batch = _update_batch(rollout, mask, old)
    R = rollout["responses"].shape[1]
    P = rollout["input_ids"].shape[1] - R
    for micro in MICRO:
        model.zero_grad()
        td = to_td(batch, calculate_entropy=False, compute_loss=True, global_batch_size=8, **update_flags(mode),
                   **micro)
        out, got = forward_backward(model, td, make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB), forward_only=False)
        g_got = _grads(model)
        model.zero_grad()
        logits = model(input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"],
                       position_ids=rollout["position_ids"]).logits[:, P - 1 : P - 1 + R]  # (B, R, V_model)
        ids = rollout[F.TEACHER_IDS][:, P - 1 : P - 1 + R, : ta.topk].long()
        s_lp, _ = topk_logp_and_rest(logits[..., :VOCAB], ids)
        log_prob = torch.log_softmax(logits.float(), -1).gather(-1, rollout["responses"].unsqueeze(-1))[..., 0]
        every = dict(log_prob=log_prob, old_log_prob=old, teacher_log_prob=rollout[F.TEACHER_LOGP], student_topk_logp=s_lp,
                     teacher_topk_logp=rollout[F.TEACHER_LOGPROBS][:, P - 1 : P - 1 + R, : ta.topk])
        want = compute_loss(loss, LossInputs(mask=mask & valid, **{f: every[f] for f in loss_needs(loss)}),
                            clip_low=ta.clip_low, clip_high=ta.clip_high, loss_agg=ta.loss_agg)
        want.loss.backward()
        assert float(want.loss.abs()) > 0
        torch.testing.assert_close(got, want.loss.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g_got, _grads(model), atol=1e-7, rtol=1e-4)
        metric = "ta_opd/loss/toy_gap" if loss == "test_toy_sampled" else "ta_opd/loss/toy_ce"
        from verl.utils.metric import Metric

        got_metrics = {k: Metric.aggregate_dp([v]) for k, v in out["metrics"].items()}  # one rank: sum of SUM shares
        assert got_metrics[metric] == pytest.approx(want.metrics[metric], rel=1e-5, abs=1e-6)
        assert got_metrics[f"ta_opd/loss/{loss}"] == pytest.approx(float(want.loss), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", ["fsdp", "vllm"])
def test_a_loss_registered_aggregated_only_is_refused_by_name_at_startup(toy_losses, backend):
    from ta_opd.errors import TAConfigError

    cfg = compose_cfg("ta_opd.loss=test_toy_aggregated", f"ta_opd.teacher.backend={backend}")
    ta = ta_config(cfg.ta_opd)
    assert ta.loss == "test_toy_aggregated"  # the CPU backend's config accepts it
    with pytest.raises(TAConfigError, match=r"ta_opd.loss='test_toy_aggregated' is registered without a per-token "
                                            r"form, so only the CPU backend can run it.*losses the verl backend runs: "
                                            r"pg_opd, topk_forward_kl, topk_reverse_kl, test_toy_sampled"):
        plan(cfg, ta, student_path="unused", teacher_path="unused", vocab_size=VOCAB)
