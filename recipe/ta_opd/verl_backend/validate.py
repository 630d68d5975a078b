"""Startup checks and the derived verl settings of a TA-OPD run (driver side, before Ray starts).

Everything a user can get wrong fails here with a message naming the key and what is allowed:
teacher backend, K < V and K' >= K, the tokenizers' shared vocabulary (padding-row differences
are sliced off; real mismatches name the first ids), pool sizes, and the verl options the
statistics hook cannot work with (fused kernels, sequence parallelism, padded inputs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict

from recipe.ta_opd.verl_backend.losses import LOSS_MODES
from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError
from ta_opd.vocab import shared_vocab_size

TEACHER_BACKENDS = ("fsdp", "vllm")


@dataclass(frozen=True)
class VerlPlan:
    ta: TAConfig
    vocab_size: int
    teacher_backend: str
    loss_mode: str
    teacher_worker: dict  # TeacherWorkerConfig fields
    teacher_pool: list[int] | None  # GPUs per node of the teacher pool; None = colocated on the trainer's pool
    actor_distillation: dict | None  # fsdp backend: the actor-only distillation config


def _positive_int(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TAConfigError(f"{key}={value!r} is not allowed; it must be an integer >= 1")
    return value


def model_vocab(student_path: str, teacher_path: str, allowed_mismatch_ids=()) -> int:
    """The shared vocabulary V (tokenizers must agree; logit padding rows are allowed)."""
    from transformers import AutoConfig, AutoTokenizer

    loaded = {}
    for key, path in (("actor_rollout_ref.model.path", student_path), ("ta_opd.teacher_model_path", teacher_path)):
        try:
            loaded[key] = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise TAConfigError(f"{key}={path!r}: cannot load its tokenizer and config ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]})") from e
    (s_tok, s_cfg), (t_tok, t_cfg) = loaded.values()
    return shared_vocab_size(s_tok.get_vocab(), t_tok.get_vocab(), student_logits=s_cfg.vocab_size,
                             teacher_logits=t_cfg.vocab_size, allowed_mismatch_ids=frozenset(allowed_mismatch_ids))


def check_verl_options(cfg: DictConfig) -> None:
    """verl options the statistics hook (logits processor of the old-log-prob forward) needs."""
    model = cfg.actor_rollout_ref.model
    actor = cfg.actor_rollout_ref.actor
    if not model.get("use_remove_padding", False):
        raise TAConfigError("actor_rollout_ref.model.use_remove_padding=false is not supported: the TA statistics "
                            "hook runs on verl's packed (remove-padding) forward; set it to true")
    if model.get("use_fused_kernels", False) or actor.get("use_fused_kernels", False):
        raise TAConfigError("actor_rollout_ref.model.use_fused_kernels=true is not supported: fused kernels never "
                            "materialize the student logits the TA statistics need; set it to false")
    for key in ("actor_rollout_ref.actor.ulysses_sequence_parallel_size",
                "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size"):
        sp = OmegaConf.select(cfg, key, default=1)
        if sp != 1:
            raise TAConfigError(f"{key}={sp} is not supported yet: the statistics hook needs whole sequences per rank "
                                "(sequence parallelism slices them); set it to 1")
    if actor.get("strategy") not in ("fsdp", "fsdp2"):
        raise TAConfigError(f"actor_rollout_ref.actor.strategy={actor.get('strategy')!r} is not supported; "
                            "the TA-OPD recipe runs on fsdp | fsdp2")
    if cfg.algorithm.adv_estimator == "gae":
        raise TAConfigError("algorithm.adv_estimator=gae would start a critic; TA-OPD uses no task reward or critic "
                            "(set algorithm.adv_estimator=grpo)")


def plan(cfg: DictConfig, ta: TAConfig, *, student_path: str, teacher_path: str, vocab_size: int | None = None) -> VerlPlan:
    """Validate and derive this run's verl settings; mutates ``cfg.distillation`` accordingly."""
    node = cfg.ta_opd.teacher
    backend = node.backend
    if backend not in TEACHER_BACKENDS:
        raise TAConfigError(f"ta_opd.teacher.backend={backend!r} is not allowed; choose one of: "
                            f"{', '.join(TEACHER_BACKENDS)}")
    ok_ids = list(cfg.ta_opd.get("vocab_mismatch_ok_ids") or [])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ok_ids):
        raise TAConfigError(f"ta_opd.vocab_mismatch_ok_ids={ok_ids!r} is not allowed; give a list of token ids >= 0")
    vocab = model_vocab(student_path, teacher_path, ok_ids) if vocab_size is None else vocab_size
    ta.check_vocab(vocab)
    check_verl_options(cfg)
    from verl.utils.config import validate_config

    try:  # verl's own batch-size and micro-batch checks, now rather than on the cluster
        validate_config(config=cfg, use_reference_policy=False, use_critic=False)
    except (AssertionError, ValueError) as e:
        raise TAConfigError(f"verl rejects the configuration: {e}") from e
    nnodes = _positive_int(node.nnodes, "ta_opd.teacher.nnodes")
    per_node = _positive_int(node.n_gpus_per_node, "ta_opd.teacher.n_gpus_per_node")
    _positive_int(cfg.trainer.nnodes, "trainer.nnodes")
    _positive_int(cfg.trainer.n_gpus_per_node, "trainer.n_gpus_per_node")
    colocate = node.get("colocate", False)
    if not isinstance(colocate, bool):
        raise TAConfigError(f"ta_opd.teacher.colocate={colocate!r} is not allowed; choose true or false")
    if colocate and backend != "fsdp":
        raise TAConfigError("ta_opd.teacher.colocate=true needs ta_opd.teacher.backend=fsdp (verl's vLLM teacher "
                            "servers always run on their own pool)")
    loss_mode = LOSS_MODES[(ta.loss, backend)]
    dist = cfg.distillation
    with open_dict(cfg):
        dist.distillation_loss.loss_mode = loss_mode
        dist.distillation_loss.topk = ta.teacher_topk
        dist.distillation_loss.use_task_rewards = False
        dist.distillation_loss.use_policy_gradient = False
        dist.distillation_loss.clip_ratio_low = ta.clip_low
        dist.distillation_loss.clip_ratio_high = ta.clip_high
        dist.teacher_models.teacher_model.model_path = teacher_path
        dist.nnodes, dist.n_gpus_per_node = nnodes, per_node
        if backend == "vllm":
            inf = dist.teacher_models.teacher_model.inference
            replica = inf.tensor_model_parallel_size * inf.data_parallel_size * inf.get("pipeline_model_parallel_size", 1)
            if (nnodes * per_node) % replica:
                raise TAConfigError(
                    f"teacher pool ta_opd.teacher.nnodes x n_gpus_per_node = {nnodes * per_node} GPUs is not a multiple "
                    f"of one vLLM teacher replica ({replica} GPUs = tensor x data x pipeline parallel sizes of "
                    "distillation.teacher_models.teacher_model.inference)")
            dist.enabled = True
            actor_distillation = None
        else:
            # verl's switch stays off (it would start vLLM teacher servers); the actor alone gets an
            # enabled copy so that verl's distillation loss machinery runs our registered loss
            dist.enabled = False
            actor = OmegaConf.to_container(dist, resolve=True)
            actor["enabled"] = True
            inf = actor["teacher_models"]["teacher_model"]["inference"]
            inf["tensor_model_parallel_size"] = inf["data_parallel_size"] = 1
            inf["pipeline_model_parallel_size"] = 1
            inf["name"] = "vllm"  # never started; verl's top-K validation needs a known engine name
            actor["nnodes"], actor["n_gpus_per_node"] = 1, 1
            actor_distillation = actor
    worker = dict(model_path=teacher_path, vocab_size=vocab, topk=ta.teacher_topk,
                  micro_batch_size=_positive_int(node.micro_batch_size, "ta_opd.teacher.micro_batch_size"),
                  chunk_size=_positive_int(node.chunk_size, "ta_opd.teacher.chunk_size"),
                  param_dtype=str(node.param_dtype), logp_dtype=str(node.logp_dtype))
    from recipe.ta_opd.verl_backend.teacher import TeacherWorkerConfig

    TeacherWorkerConfig(**worker)  # validates dtypes and sizes now, not on the cluster
    return VerlPlan(ta=ta, vocab_size=vocab, teacher_backend=backend, loss_mode=loss_mode, teacher_worker=worker,
                    teacher_pool=None if colocate else [per_node] * nnodes, actor_distillation=copy.deepcopy(actor_distillation))
