"""Issue 9: the ways the verl backend died on its first step, each reproduced on CPU.

- the shipped batch did not divide over the trainer pool's data-parallel ranks (verl asserts it in
  batch balancing / dispatch / train_mini_batch, after rollout) -> refused at startup, with a fix;
- ``trainer.nnodes`` counts ALL nodes of the run; the cluster is checked before data loads;
- a rollout token outside the shared vocabulary killed the teacher -> the position leaves
  selection and the loss, counted in ``ta_opd/invalid_sampled_fraction``;
- modes under which the hooks cannot work (bypass, rollout correction, pad_to_length) -> refused at
  startup, and a student whose logit rows exceed the teacher's embedding rows;
- the statistics pass is verl's own ``_compute_old_log_prob`` (router replay, ``sum_pi_squared`` kept).
(Empty micro-batches vs verl's cross-rank metric aggregation: tests/verl/test_verl_loss.py.)
"""

import re

import pytest
import torch
from verl import DataProto

from verl.utils import tensordict_utils as tu

from recipe.ta_opd.main import ta_config
from recipe.ta_opd.verl_backend import fields as F
from recipe.ta_opd.verl_backend.teacher import TeacherWorkerConfig, compute_teacher_fields
from recipe.ta_opd.verl_backend.trainer import exclude_invalid_sampled, teacher_request
from recipe.ta_opd.verl_backend.validate import Pools, check_cluster, plan, split_allocation
from ta_opd.errors import TAConfigError
from ta_opd.stats import PositionStats
from tests.verl.helpers import VOCAB, rollout_batch
from tests.verl.test_configs import CONFIGS, QWEN_V, RECIPE_DIR, ROOT, compose_from


def _plan(*overrides, config_dir=RECIPE_DIR):
    cfg = compose_from(config_dir, "ta_opd_trainer", *overrides)
    return cfg, plan(cfg, ta_config(cfg.ta_opd), student_path="s", teacher_path="t", vocab_size=QWEN_V)


def _paper(monkeypatch, name, *overrides):
    for var in ("TRAIN_FILES", "VAL_FILES", "TEACHER_MODEL", "STUDENT_MODEL"):
        monkeypatch.setenv(var, "/x")
    monkeypatch.chdir(ROOT)
    return _plan(f"+experiment={name}", *overrides)


# --- data-parallel divisibility ---------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_paper_configs_split_8_nodes_and_divide_the_batch(name, monkeypatch):
    cfg, p = _paper(monkeypatch, name)
    assert p.pools.total == (8, 8)  # trainer.nnodes=8 means the whole allocation
    assert p.pools.trainer == [8] * 6 and p.pools.teacher == [8] * 2 and p.teacher_pool == [8] * 2
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (6, 8)  # what verl's trainer pool gets
    batch = cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n
    assert batch % 48 == 0 and batch % cfg.actor_rollout_ref.rollout.agent.num_workers == 0


def test_the_old_paper_batch_on_48_trainer_gpus_is_refused_with_numbers_and_a_fix(monkeypatch):
    # 64 prompts x 8 = 512 sequences over 6 x 8 = 48 ranks: verl's _balance_batch asserted 512 % 48
    with pytest.raises(TAConfigError) as e:
        _paper(monkeypatch, "qwen3_4b_to_qwen3_1p7b", "data.train_batch_size=64")
    msg = str(e.value)
    assert "64 x 8 = 512 sequences per step is not divisible by the 48 data-parallel ranks" in msg
    assert "data.train_batch_size=60 (480 sequences) or data.train_batch_size=66 (528 sequences)" in msg
    # the suggested values do validate
    _paper(monkeypatch, "qwen3_4b_to_qwen3_1p7b", "data.train_batch_size=66", "actor_rollout_ref.rollout.agent.num_workers=6")


def test_single_node_split_six_trainer_gpus(monkeypatch):
    cfg, p = _paper(monkeypatch, "qwen3_4b_to_qwen3_1p7b", "trainer.nnodes=1", "ta_opd.teacher.nnodes=1",
                    "ta_opd.teacher.n_gpus_per_node=2")
    assert p.pools.trainer == [6] and p.pools.teacher == [2]
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (1, 6)


@pytest.mark.parametrize("overrides, message", [
    # verl's train_mini_batch: ppo_mini_batch_size x n % dp
    (["trainer.n_gpus_per_node=8", "ta_opd.teacher.n_gpus_per_node=2", "data.train_batch_size=24",
      "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.agent.num_workers=4"],
     "ppo_mini_batch_size x rollout.n = 8 sequences is not divisible by the 6 data-parallel ranks"),
    # the agent loop's even split
    (["data.train_batch_size=5", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.rollout.agent.num_workers=8"],
     "20 sequences per step (data.train_batch_size x rollout.n) is not divisible by "
     "actor_rollout_ref.rollout.agent.num_workers=8"),
    # vLLM replicas tile the trainer pool
    (["ta_opd.teacher.n_gpus_per_node=3"], "the trainer pool (5 = 5 GPUs) is not a multiple of one vLLM rollout replica"),
    # the teacher takes ALL the nodes
    (["trainer.nnodes=2", "ta_opd.teacher.nnodes=2", "ta_opd.teacher.n_gpus_per_node=8"],
     "leaves no node for rollout and training; trainer.nnodes counts ALL nodes of the run"),
    (["trainer.nnodes=2", "ta_opd.teacher.nnodes=1", "ta_opd.teacher.n_gpus_per_node=2"],
     "is not a split this recipe supports"),
    # verl's update iterates over whole mini-batches (48 x 8 over 8 ranks with mini-batches of 32 x 8 passed every
    # other check and crashed in the first update)
    (["trainer.n_gpus_per_node=16", "ta_opd.teacher.n_gpus_per_node=8", "data.train_batch_size=48",
      "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.ppo_mini_batch_size=32"],
     "384 sequences per step are not a whole number of mini-batches of actor_rollout_ref.actor.ppo_mini_batch_size"),
    # fixed micro-batches must divide each rank's share (verl's engine asserts it)
    (["actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=3"],
     "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=3 does not divide the 16 sequences each rank gets"),
    (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=5"],
     "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=5 does not divide the 16 sequences each rank gets"),
    # dynamic batching: the token budget must hold the longest sequence
    (["actor_rollout_ref.actor.use_dynamic_bsz=true", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=100",
      "data.max_prompt_length=64", "data.max_response_length=40"],
     "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=100 is below the longest sequence"),
    # a vLLM replica must not straddle nodes
    (["trainer.nnodes=4", "trainer.n_gpus_per_node=8", "ta_opd.teacher.nnodes=1", "ta_opd.teacher.n_gpus_per_node=8",
      "actor_rollout_ref.rollout.tensor_model_parallel_size=6", "data.train_batch_size=24"],
     "one vLLM rollout replica (6 GPUs) would straddle nodes of 8 GPUs"),
    (["algorithm.rollout_correction.bypass_mode=true"], "algorithm.rollout_correction.bypass_mode=true is not supported"),
    # verl's rollout correction runs after the statistics and edits response_mask / rescales the loss
    (["algorithm.rollout_correction.rollout_rs=token_k1"], "algorithm.rollout_correction.rollout_rs='token_k1' is not supported"),
    (["algorithm.rollout_correction.rollout_is=token"], "algorithm.rollout_correction.rollout_is='token' is not supported"),
    (["actor_rollout_ref.actor.pad_to_length=true"], "actor_rollout_ref.actor.pad_to_length=true is not supported"),
    (["ta_opd.teacher.timeout_s=0"], "ta_opd.teacher.timeout_s=0 is not allowed"),
    (["actor_rollout_ref.rollout.temperature=0"], "actor_rollout_ref.rollout.temperature=0 is not allowed"),
    # verl would aggregate / clip / check the loss differently from what ta_opd.* (and the run identity) say
    (["actor_rollout_ref.actor.loss_agg_mode=token-sum"],
     "actor_rollout_ref.actor.loss_agg_mode='token-sum' differs from ta_opd.loss_agg='token-mean'"),
    (["distillation.distillation_loss.loss_max_clamp=10.0"],
     "distillation.distillation_loss.loss_max_clamp=10.0 is not supported"),
    (["ta_opd.loss=topk_forward_kl", "ta_opd.teacher.logp_dtype=bfloat16"],
     "ta_opd.teacher.logp_dtype='bfloat16' with ta_opd.loss='topk_forward_kl'"),
])
def test_what_verls_step_needs_is_refused_at_startup(overrides, message):
    with pytest.raises(TAConfigError, match=re.escape(message)):
        _plan(*overrides)


def test_recipe_defaults_validate():
    cfg, p = _plan()
    assert p.pools.trainer == [4] and p.pools.teacher == [4]


# --- trainer.nnodes against the Ray cluster -------------------------------------------------

def _nodes(*gpus):
    return [{"Alive": True, "Resources": {"GPU": float(g), "CPU": 64.0}} for g in gpus]


def test_cluster_check_names_what_is_missing():
    pools = split_allocation(8, 8, 2, 8, colocate=False)
    check_cluster(pools, _nodes(*[8] * 8))
    with pytest.raises(TAConfigError, match=re.escape("the run needs 64 GPU on 8 node(s) (trainer pool [8, 8, 8, 8, 8, 8]"
                                                      " + teacher pool [8, 8], from trainer.nnodes x trainer."
                                                      "n_gpus_per_node = 8 x 8, which counts ALL nodes of the run), "
                                                      "and 3 CPUs per GPU (verl's placement bundles), but "
                                                      "the Ray cluster has 48 GPU on 6 node(s)")):
        check_cluster(pools, _nodes(*[8] * 6))
    # enough GPUs in total but not per node: a pool entry is one node's placement group
    with pytest.raises(TAConfigError, match="the run needs 8 GPU"):
        check_cluster(Pools((1, 8), [6], [2]), _nodes(4, 4))
    check_cluster(Pools((1, 8), [6], [2]), _nodes(8))
    dead = [{"Alive": False, "Resources": {"GPU": 8.0}}] + _nodes(4)
    with pytest.raises(TAConfigError, match=r"has 4 GPU on 1 node"):
        check_cluster(Pools((1, 8), [6], [2]), dead)
    # verl reserves 3 CPUs per GPU bundle; a node short of CPUs made its placement group wait forever
    few_cpus = [{"Alive": True, "Resources": {"GPU": 8.0, "CPU": 16.0}}]
    with pytest.raises(TAConfigError, match=r"and 3 CPUs per GPU .* \(8 GPU \+ 16 CPU\)"):
        check_cluster(Pools((1, 8), [6], [2]), few_cpus)


def test_teacher_request_does_not_leak_the_padding_flag_into_the_batch():
    batch = DataProto.from_dict(tensors=rollout_batch(B=3, P=4, R=5, seed=1), meta_info={"temperature": 1.0})
    req = teacher_request(batch)
    assert req.meta_info == {"_verl_auto_padding": True}
    assert batch.meta_info == {"temperature": 1.0}  # select() shared the dict before the fix


# --- sampled ids outside the shared vocabulary ----------------------------------------------

def test_teacher_fields_skip_ids_outside_the_vocabulary(models):
    batch = rollout_batch(B=4, P=5, R=7, seed=9)
    cfg = TeacherWorkerConfig(model_path=models["teacher_path"], vocab_size=VOCAB, teacher_topk=8, micro_batch_size=2,
                              chunk_size=3, param_dtype="float32")
    clean = compute_teacher_fields(models["teacher"], batch, cfg)
    b, t = 1, 0  # a valid position; the models have 104 logit rows for the 96-token vocabulary
    assert batch["response_mask"][b, t] == 1
    batch["responses"][b, t] = VOCAB + 5
    batch["input_ids"][b, 5 + t] = VOCAB + 5
    out = compute_teacher_fields(models["teacher"], batch, cfg)  # raised TAInputError before the fix
    assert out[F.TEACHER_LOGP][b, t] == 0 and out[F.TEACHER_IDS][b, 5 - 1 + t].abs().sum() == 0
    others = torch.ones_like(batch["response_mask"], dtype=torch.bool)
    others[b] = False  # other sequences are untouched
    torch.testing.assert_close(out[F.TEACHER_LOGP][others], clean[F.TEACHER_LOGP][others], atol=0, rtol=0)


def test_invalid_sampled_positions_leave_selection_and_the_loss(models):
    from tests.verl.test_trainer_hooks import make_trainer

    trainer, _ = make_trainer(models, "ta_opd.budget=0.25")
    raw = rollout_batch(B=8, P=5, R=7, seed=4)
    bad = [(0, 0), (3, 1)]
    for b, t in bad:
        assert raw["response_mask"][b, t] == 1
        raw["responses"][b, t] = VOCAB + 3
        raw["input_ids"][b, 5 + t] = VOCAB + 3
    full = raw["response_mask"].clone()
    batch = DataProto.from_dict(tensors=raw)
    old, _ = trainer._compute_old_log_prob(batch)  # died in the teacher before the fix
    n_valid = int(full.sum())
    assert trainer._ta_metrics["ta_opd/invalid_sampled_fraction"] == pytest.approx(2 / n_valid)
    batch = batch.union(old)
    out = trainer._update_actor(batch)
    kept = trainer.actor_rollout_wg.seen["response_mask"].bool()
    assert int(kept.sum()) == -(-(n_valid - 2) // 4)  # ceil(rho |I|) with I = the valid, in-vocabulary positions
    assert not any(bool(kept[b, t]) for b, t in bad)
    assert torch.equal(batch.batch["response_mask"], full)  # verl's later metrics see every token again
    assert out.meta_info["metrics"]["ta_opd/valid_count"] == n_valid - 2


def test_exclude_invalid_is_a_no_op_on_clean_batches():
    raw = rollout_batch(B=3, P=4, R=5, seed=1)
    batch = DataProto.from_dict(tensors=raw)
    before = batch.batch["response_mask"].clone()
    full, m = exclude_invalid_sampled(batch, VOCAB)
    assert torch.equal(full, before) and torch.equal(batch.batch["response_mask"], before)
    assert m == {"ta_opd/invalid_sampled_fraction": 0.0}


# --- any teacher pool size with any batch size --------------------------------------------------

def test_teacher_request_is_padded_to_the_group(ray_cpu, models):
    """7 sequences over a 2-rank FSDP2 teacher group: verl's DP split asserted 7 % 2 before the
    request enabled auto-padding; the padding never reaches the caller."""
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from recipe.ta_opd.verl_backend.teacher import TATeacherWorker

    cfg = TeacherWorkerConfig(model_path=models["teacher_path"], vocab_size=VOCAB, teacher_topk=8, micro_batch_size=2,
                              chunk_size=5, param_dtype="float32")
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    wg = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=RayClassWithInitArgs(
        cls=ray_cpu.remote(TATeacherWorker), config=cfg.__dict__))
    wg.init_model()
    raw = rollout_batch(B=7, seed=2)
    got = wg.compute_teacher(teacher_request(DataProto.from_dict(tensors=raw)))
    assert len(got) == 7
    want = compute_teacher_fields(models["teacher"], raw, cfg)
    for k, v in want.items():
        torch.testing.assert_close(got.batch[k], v, atol=1e-5, rtol=0, msg=k)


def test_the_recipes_grader_is_verls_default_scorer_unless_the_user_sets_one():
    """Toy data has a data_source verl does not know: without the recipe's grader, verl's reward
    loop raised NotImplementedError on step 1."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from recipe.ta_opd.grading import compute_score

    cfg, _ = _plan()
    assert cfg.reward.custom_reward_function.path == "pkg://recipe.ta_opd.verl_backend.reward"
    fn = get_custom_reward_fn(cfg)  # verl's own loader resolves it
    assert fn("ta_opd_toy_addition", "A:12", "12") == compute_score("ta_opd_toy_addition", "A:12", "12")
    cfg, _ = _plan("reward.custom_reward_function.path=/mine.py", "reward.custom_reward_function.name=f")
    assert (cfg.reward.custom_reward_function.path, cfg.reward.custom_reward_function.name) == ("/mine.py", "f")


def test_local_data_files_must_exist_and_become_absolute(tmp_path, monkeypatch):
    """The paper configs default to relative data/dapo/*.parquet; Ray's workers open them from their
    own working directory, after Ray started: checked and made absolute on the driver."""
    from recipe.ta_opd.verl_backend.entry import local_data_files

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.parquet").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert local_data_files("d/train.parquet", "data.train_files") == str(tmp_path / "d" / "train.parquet")
    assert local_data_files(["d/train.parquet", "hdfs://x/y.parquet"], "k") == [
        str(tmp_path / "d" / "train.parquet"), "hdfs://x/y.parquet"]
    with pytest.raises(TAConfigError, match=r"data.val_files='d/val.parquet' does not exist \(resolved against "):
        local_data_files("d/val.parquet", "data.val_files")


# --- the statistics pass is verl's own _compute_old_log_prob -----------------------------------

def test_old_log_prob_pass_keeps_what_verl_returns(models):
    """``sum_pi_squared`` (asked for by actor.calculate_sum_pi_squared) and MoE ``routed_experts`` come
    back as verl returns them, next to the TA statistics; the flags reach the actor."""
    from tests.verl.test_trainer_hooks import FakeActorGroup, make_trainer

    class ActorWithExtras(FakeActorGroup):
        def compute_log_prob(self, td):
            self.seen["flags"] = {k: tu.get(td, k) for k in ("calculate_sum_pi_squared", "compute_loss")}
            out = super().compute_log_prob(td)
            out["sum_pi_squared"] = out["entropy"].clone()  # same packed layout as verl's
            out["routed_experts"] = torch.arange(8 * 12).reshape(8, 12)
            return out

    trainer, _ = make_trainer(models, "actor_rollout_ref.actor.calculate_sum_pi_squared=true")
    wg = trainer.actor_rollout_wg
    trainer.actor_rollout_wg = ActorWithExtras(wg.model, wg.loss_fn, wg.loss_mode)
    batch = DataProto.from_dict(tensors=rollout_batch(B=8, P=5, R=7, seed=4))
    old, _ = trainer._compute_old_log_prob(batch)
    assert trainer.actor_rollout_wg.seen["flags"] == {"calculate_sum_pi_squared": True, "compute_loss": True}
    assert isinstance(trainer.actor_rollout_wg, ActorWithExtras)  # the real group is back after the call
    keys = set(old.batch.keys())
    assert {"old_log_probs", "entropys", "sum_pi_squared", "routed_experts",
            *(F.stat_key(n) for n in PositionStats.SCALARS)} <= keys
    torch.testing.assert_close(old.batch["sum_pi_squared"], old.batch["entropys"])
    assert torch.equal(old.batch["routed_experts"], torch.arange(8 * 12).reshape(8, 12))


def test_student_with_more_logit_rows_than_teacher_embeddings_is_refused():
    from recipe.ta_opd.verl_backend.validate import check_teacher_embeds

    check_teacher_embeds(151936, 151936)
    check_teacher_embeds(151936, 152064)  # R1-Distill-Qwen-14B teacher, Qwen2.5-3B student
    with pytest.raises(TAConfigError, match=r"the student has 416 logit rows .* the teacher embeds only 399 ids"):
        check_teacher_embeds(416, 399)


def test_a_loss_ray_workers_cannot_import_is_refused_at_startup():
    """Ray's workers register losses by importing their module: one defined in __main__ (a user's
    script) would pass on the driver and fail in the worker after the models loaded."""
    import torch

    from ta_opd.losses import _LOSSES, TokenLoss, register_loss

    def script_loss(inp, **_):
        return TokenLoss(torch.where(inp.mask, inp.log_prob, 0.0), {})

    script_loss.__module__ = "__main__"
    register_loss("test_script_loss", needs=("log_prob",), per_token=True)(script_loss)
    try:
        with pytest.raises(TAConfigError, match="registered in module '__main__', which Ray's worker processes"):
            _plan("ta_opd.loss=test_script_loss")
        _plan("ta_opd.loss=topk_forward_kl")  # a shipped logits-path loss at the default float32 passes
    finally:
        _LOSSES._items.pop("test_script_loss", None)


def test_min_keep_against_the_response_length_is_the_cpu_rule(capsys):
    """verl's entry applies the CPU backend's rule (one function): above the length refused, equal warned."""
    from recipe.ta_opd.verl_backend.entry import check_run_folders

    cfg = compose_from(RECIPE_DIR, "ta_opd_trainer", "data.max_response_length=8", "ta_opd.min_keep_per_sequence=9")
    with pytest.raises(TAConfigError, match="ta_opd.min_keep_per_sequence=9 is not allowed with data.max_response_length=8"):
        check_run_folders(cfg, ta_config(cfg.ta_opd))
    cfg = compose_from(RECIPE_DIR, "ta_opd_trainer", "data.max_response_length=8", "ta_opd.min_keep_per_sequence=8")
    check_run_folders(cfg, ta_config(cfg.ta_opd))
    assert "min_keep_per_sequence=8 equals data.max_response_length" in capsys.readouterr().out
