"""The kept-rows engine (``recipe/ta_opd/verl_backend/engine.py``) against today's path: verl's own
``FSDPEngineWithLMHead.forward_step`` with our loss, on the same real verl FSDP2 engine, built in
this process (one gloo rank, the test-only CPU platform, fp32, gradient checkpointing on).

Per loss (sampled-token ``pg_opd``, top-K ``topk_forward_kl``) and kept set (ρ 5 %, ρ 100 %, and
a batch whose later micro-batches have nothing kept): every micro-batch's loss and every
parameter's gradient agree (fp32; loss rtol 1e-5 / atol 1e-6, gradients rtol 1e-4 / atol 1e-6,
the tolerance of the other verl-loss tests), and the kept-rows forward fed the model only the
planned tokens (one token for a micro-batch with nothing kept) while verl's fed every token."""

import math
import os

import pytest
import torch

from verl.utils import tensordict_utils as tu

from recipe.ta_opd.verl_backend import fields as F
from recipe.ta_opd.verl_backend.engine import KeptRowsEngine, forward_plan
from recipe.ta_opd.verl_backend.losses import make_actor_loss, update_flags
from tests.verl.helpers import VOCAB, tiny_qwen3
from tests.verl.test_verl_loss import configs, to_td

MICRO = 2  # sequences per micro-batch: the batch of 8 gives 4 micro-batches


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import torch.distributed as dist
    from verl.plugin.platform import platform_manager as pm
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    from tests.verl.cpu_fit.platform import PlatformCPU

    previous = pm._current_platform
    pm.set_platform(PlatformCPU())
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    path = tmp_path_factory.mktemp("kept_rows_student")
    tiny_qwen3(path, seed=2)  # vocab rows 104 > VOCAB: padding rows, as Qwen
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        model_cfg = HFModelConfig(path=str(path), load_tokenizer=False, use_remove_padding=True,
                                  enable_gradient_checkpointing=True,
                                  override_config={"attn_implementation": "sdpa"})
        eng = KeptRowsEngine(model_cfg, FSDPEngineConfig(strategy="fsdp2", mixed_precision={"param_dtype": "fp32"}),
                             FSDPOptimizerConfig(lr=1e-3), CheckpointConfig())
        eng.initialize()
        assert eng._autocast_dtype == torch.float32
        yield eng
    finally:
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if created:
            dist.destroy_process_group()
        pm._current_platform = previous


def kept_mask(valid: torch.Tensor, case: str) -> torch.Tensor:
    """(B, R) kept positions: ⌈ρ·|I|⌉ valid positions at random (ρ 5 %, 100 %), or (``none``) a few
    in the first micro-batch's sequences only, so every later micro-batch has nothing kept."""
    g = torch.Generator().manual_seed(7)
    if case == "rho100":
        return valid.clone()
    if case == "none":
        keep = valid.clone()
        keep[MICRO:] = False
        keep[:, 2:] = False
        return keep
    idx = valid.flatten().nonzero().squeeze(-1)
    chosen = idx[torch.randperm(idx.numel(), generator=g)[: math.ceil(0.05 * idx.numel())]]
    keep = torch.zeros(valid.numel(), dtype=torch.bool)
    keep[chosen] = True
    return keep.view_as(valid)


def update_td(rollout, model, keep: torch.Tensor, flags: dict):
    """The update's batch as verl's driver hands it to the actor: response_mask ANDed with the kept
    set, off-policy old log-probs (the student's, perturbed: a few ratios clipped)."""
    R = rollout["responses"].shape[1]
    P = rollout["input_ids"].shape[1] - R
    with torch.no_grad():
        logits = model(input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"],
                       position_ids=rollout["position_ids"]).logits[:, P - 1: P - 1 + R].float()
    valid = rollout["response_mask"].bool()
    logp = torch.log_softmax(logits, -1).gather(-1, rollout["responses"].unsqueeze(-1)).squeeze(-1)
    noise = 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    b = dict(rollout)
    b["old_log_probs"] = torch.where(valid, logp + noise, 0.0)
    b["advantages"] = torch.zeros_like(logp)
    b["response_mask"] = (valid & keep).long()
    return to_td(b, calculate_entropy=False, compute_loss=True, global_batch_size=8, use_dynamic_bsz=False,
                 micro_batch_size_per_gpu=MICRO, temperature=1.0, **flags)


def grads(eng) -> dict[str, torch.Tensor]:
    """Every parameter's gradient; a parameter the backward never reached counts as zero."""
    out = {}
    for n, p in eng.module.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
    return out


def run(eng, td, loss_fn):
    """(per-micro-batch losses, gradients, tokens fed to the model per forward)."""
    fed = []
    hook = eng.module.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[-1]),
                                                with_kwargs=True)
    try:
        eng.optimizer_zero_grad()
        with eng.train_mode():  # read the gradients inside: the context zeroes them on exit
            out = eng.forward_backward_batch(td, loss_fn, forward_only=False)
            g = grads(eng)
    finally:
        hook.remove()
    return torch.tensor(out["loss"]), g, fed


@pytest.mark.parametrize("loss", ["pg_opd", "topk_forward_kl"])
@pytest.mark.parametrize("case", ["rho05", "rho100", "none"])
def test_kept_rows_update_equals_verls_forward(engine, models, rollout, loss, case):
    ta, actor_cfg, dist_cfg = configs(f"ta_opd.loss={loss}")
    mode = dist_cfg.distillation_loss.loss_mode
    loss_fn = make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB)
    model = engine.module
    keep = kept_mask(rollout["response_mask"].bool(), case)
    ours_flags = update_flags(mode)
    assert ours_flags[F.PHASE] == F.PHASE_UPDATE
    theirs_flags = {k: v for k, v in ours_flags.items() if k != F.PHASE}  # no phase: verl's forward_step

    td_ours = update_td(rollout, _plain(model), keep, ours_flags)  # old log-probs from the engine's weights
    td_theirs = update_td(rollout, _plain(model), keep, theirs_flags)
    loss_ours, g_ours, fed_ours = run(engine, td_ours, loss_fn)
    loss_theirs, g_theirs, fed_theirs = run(engine, td_theirs, loss_fn)

    # the kept path ran: planned tokens only (1 for a micro-batch with nothing kept); verl: every token
    from verl.workers.engine.utils import prepare_micro_batches

    mbs, _ = prepare_micro_batches(data=td_ours, dp_group=None, same_micro_num_in_dp=True)
    planned = [max(int(forward_plan(mb).lengths.sum()), 1) for mb in mbs]
    assert fed_ours == planned and fed_theirs == [int(mb["input_ids"].offsets()[-1]) for mb in mbs]
    if case != "rho100":
        assert sum(fed_ours) < sum(fed_theirs)
    if case == "none":
        assert planned[1:] == [1] * (len(planned) - 1) and bool((loss_ours[1:] == 0).all())

    assert float(loss_theirs.abs().sum()) > 0
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in g_theirs.values()) > 0
    for name in g_theirs:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def _plain(fsdp_module):
    """A callable running the (FSDP2) module as a plain padded forward."""
    return lambda **kw: fsdp_module(**kw, use_cache=False)


def test_the_statistics_pass_is_verls_forward_with_entropy_from_the_hook(engine, models, rollout):
    """Forward-only (the statistics pass; validation alike): verl's forward over every token, and
    with verl's entropy off the hook's H comes back as verl's ``entropy`` (one sweep, item 2)."""
    ta, actor_cfg, dist_cfg = configs()
    td = update_td(rollout, _plain(engine.module), kept_mask(rollout["response_mask"].bool(), "rho100"),
                   {"distillation_use_topk": True, "distillation_only": False, F.PHASE: F.PHASE_STATS})
    tu.assign_non_tensor(td, compute_loss=False)
    fed = []
    hook = engine.module.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[-1]),
                                                   with_kwargs=True)
    try:
        with engine.eval_mode():
            out = engine.forward_backward_batch(td, make_actor_loss(actor_cfg, dist_cfg, ta, VOCAB), forward_only=True)
    finally:
        hook.remove()
    assert sum(fed) == int(td["input_ids"].offsets()[-1])
    mo = out["model_output"]
    H = mo[F.stat_key("H")].values()
    assert torch.equal(mo["entropy"].values(), H) and float(H.abs().sum()) > 0
