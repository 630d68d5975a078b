"""Startup checks and the derived verl settings of a TA-OPD run (driver side, before Ray starts).

Everything a user can get wrong fails here with a message naming the key and what is allowed:
teacher backend, K < V and K' >= K, the tokenizers' shared vocabulary (padding-row differences
are sliced off; real mismatches name the first ids), the split of the allocation into trainer
and teacher pools (``trainer.nnodes`` counts ALL nodes of the run), every divisibility verl's step
asserts, and the verl options the statistics hook cannot work with (fused kernels, sequence
parallelism, padded inputs, bypass mode).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from recipe.ta_opd.verl_backend.losses import on_logits_path, verl_loss_mode
from recipe.ta_opd.wandb_run import wandb_group
from ta_opd._checks import is_int, is_real
from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError
from ta_opd.vocab import shared_vocab_size

TEACHER_BACKENDS = ("fsdp", "vllm")
# verl loads the validation scorer from here unless reward.custom_reward_function.path is set
REWARD_FN = "pkg://recipe.ta_opd.verl_backend.reward"


@dataclass(frozen=True)
class VerlPlan:
    ta: TAConfig
    vocab_size: int
    teacher_backend: str
    loss_mode: str
    teacher_worker: dict  # TeacherWorkerConfig fields
    actor_distillation: dict | None  # fsdp backend: the actor-only distillation config
    pools: Pools  # the allocation and its split into trainer and teacher pools

    @property
    def teacher_pool(self) -> list[int] | None:
        """GPUs per node of the teacher pool; None = colocated on the trainer's pool."""
        return self.pools.teacher


def _positive_int(value, key: str) -> int:
    if not is_int(value) or value < 1:
        raise TAConfigError(f"{key}={value!r} is not allowed; it must be an integer >= 1")
    return value


@dataclass(frozen=True)
class Pools:
    """How the allocation ``trainer.nnodes x trainer.n_gpus_per_node`` (ALL the nodes of the run) is
    split: the teacher pool takes ``ta_opd.teacher.nnodes x n_gpus_per_node`` of it (whole nodes,
    or part of a single node); the trainer pool (vLLM rollout + FSDP actor) gets the rest. A
    colocated teacher shares the trainer's GPUs."""

    total: tuple[int, int]  # (nodes, GPUs per node) of the whole allocation
    trainer: list[int]  # GPUs per node of the trainer pool (verl's resource-pool spec)
    teacher: list[int] | None  # GPUs per node of the teacher pool; None = colocated on the trainer's

    @property
    def gpus(self) -> int:
        """GPUs (accelerators) the run asks Ray for."""
        return sum(self.trainer) + sum(self.teacher or [])


def split_allocation(nnodes: int, gpus_per_node: int, teacher_nnodes: int, teacher_gpus: int, colocate: bool) -> Pools:
    total = (nnodes, gpus_per_node)
    if colocate:
        return Pools(total, [gpus_per_node] * nnodes, None)
    where = (f"trainer.nnodes x trainer.n_gpus_per_node = {nnodes} x {gpus_per_node} (the whole allocation) with "
             f"ta_opd.teacher.nnodes x n_gpus_per_node = {teacher_nnodes} x {teacher_gpus}")
    if teacher_gpus == gpus_per_node:  # the teacher takes whole nodes
        if teacher_nnodes >= nnodes:
            raise TAConfigError(f"{where} leaves no node for rollout and training; trainer.nnodes counts ALL nodes "
                                f"of the run, so give trainer.nnodes >= {teacher_nnodes + 1} or fewer teacher nodes")
        return Pools(total, [gpus_per_node] * (nnodes - teacher_nnodes), [teacher_gpus] * teacher_nnodes)
    if nnodes == 1 and teacher_nnodes == 1 and teacher_gpus < gpus_per_node:  # one node, split by GPUs
        return Pools(total, [gpus_per_node - teacher_gpus], [teacher_gpus])
    raise TAConfigError(f"{where} is not a split this recipe supports: the teacher pool is either whole nodes "
                        f"(ta_opd.teacher.n_gpus_per_node={gpus_per_node}, fewer nodes than trainer.nnodes) or, on a "
                        f"single node (trainer.nnodes=1, ta_opd.teacher.nnodes=1), fewer GPUs than the node's "
                        f"{gpus_per_node}; or set ta_opd.teacher.colocate=true")


def _suggest_batch(prompts: int, n: int, divisor: int) -> str:
    """Nearest data.train_batch_size values whose rollout batch (x n) is divisible by ``divisor``."""
    step = divisor // math.gcd(divisor, n)  # train_batch_size must be a multiple of this
    lo, hi = (prompts // step) * step, -(-prompts // step) * step
    options = sorted({v for v in (lo, hi) if v >= 1})
    return " or ".join(f"data.train_batch_size={v} ({v * n} sequences)" for v in options)


# verl's placement, counted in CPUs (Ray's scheduling of verl's actors, measured in
# tests/verl/test_fit_placement.py): every accelerator bundle of a pool's placement group is
# {"CPU": 3, GPU: 1} (ResourcePoolManager.max_colocate_count = 3, verl/single_controller/ray/base.py:144-149,
# :192), and each worker holds 1 of those CPUs (num_gpus=1/3 with no num_cpus: ray/actor.py:2050-2056)
CPUS_PER_BUNDLE = 3
# verl's other actors (the task runner: plain ray.remote, as ours; rollout servers, agent-loop and
# reward workers) hold no CPU while they run: Ray places them on nodes with no free CPU
# (ray/actor.py:2045-2066), so only the bundles count.


def check_cluster(pools: Pools, nodes: list[dict], resource: str = "GPU", available: dict | None = None) -> None:
    """The Ray cluster can host both pools as verl places them: ``nodes`` as ``ray.nodes()`` returns
    them. Each pool entry is one node's placement group of ``need`` bundles of 1 ``resource`` +
    :data:`CPUS_PER_BUNDLE` CPUs. ``available`` (NodeID -> resources, as
    ``ray._private.state.available_resources_per_node()`` returns them, what verl's own check reads)
    is what is free right now (the task runner passes it: other jobs' actors count); without it, the
    nodes' totals. Checked before any data or model is loaded (verl's own check counts GPUs only; a
    node short of CPUs makes a placement group wait forever instead of failing)."""
    alive = [n for n in nodes if n.get("Alive", True)]
    if available is not None:
        res = [dict(available.get(n.get("NodeID"), {})) for n in alive]
    else:
        res = [n.get("Resources", {}) for n in alive]
    free = sorted(([float(r.get(resource, 0)), float(r.get("CPU", 0))] for r in res), reverse=True)
    wanted = sorted(pools.trainer + (pools.teacher or []), reverse=True)
    layout = f"trainer pool {pools.trainer}" + (f" + teacher pool {pools.teacher}" if pools.teacher else "")
    have = (f"the Ray cluster has {sum(f[0] for f in free):g} {resource}{' free' if available is not None else ''} "
            f"on {len(free)} node(s) "
            f"({', '.join(f'{f[0]:g} {resource} + {f[1]:g} CPU' for f in free)})")
    needs = (f"the run needs {pools.gpus} {resource} on {len(wanted)} node(s) ({layout}, from trainer.nnodes x "
             f"trainer.n_gpus_per_node = {pools.total[0]} x {pools.total[1]}, which counts ALL nodes of the run), "
             f"and {CPUS_PER_BUNDLE} CPUs per {resource} (verl's placement bundles)")
    for need in wanted:  # first-fit decreasing: each pool entry is one node's placement group
        for f in free:
            if f[0] >= need and f[1] >= CPUS_PER_BUNDLE * need:
                f[0] -= need
                f[1] -= CPUS_PER_BUNDLE * need
                break
        else:
            raise TAConfigError(f"{needs}, but {have}; give trainer.nnodes / n_gpus_per_node that match "
                                f"the allocation (and ray start --num-cpus)")


def check_trainer_divisibility(cfg: DictConfig, pools: Pools) -> None:
    """What verl's step needs of the trainer pool, named with numbers (verl's own validate_config
    skips its batch check under use_dynamic_bsz=true; these asserts fire regardless):

    - vLLM replicas tile the pool: GPUs % (tensor x data x pipeline parallel size) == 0;
    - the agent loop splits the rollout batch evenly over ``rollout.agent.num_workers`` workers;
    - batch balancing (``trainer.balance_batch``, equal-size partitions) and the data-parallel
      dispatch of ``compute_log_prob``/``update_actor`` split the batch evenly over the DP ranks;
    - ``train_mini_batch`` asserts ``ppo_mini_batch_size x n % dp == 0``.
    The FSDP teacher group needs nothing: its call is padded to a multiple of its ranks.
    """
    rollout, actor = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor
    gpus = sum(pools.trainer)
    dp = gpus  # FSDP with sequence parallelism 1 (check_verl_options enforces it)
    replica = 1
    for key in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"):
        replica *= _positive_int(rollout.get(key, 1), f"actor_rollout_ref.rollout.{key}")
    pool = f"the trainer pool ({' + '.join(map(str, pools.trainer))} = {gpus} GPUs"
    if gpus % replica:
        raise TAConfigError(f"{pool}) is not a multiple of one vLLM rollout replica ({replica} GPUs = tensor x data x "
                            "pipeline parallel sizes of actor_rollout_ref.rollout); change the rollout parallel sizes "
                            "or the pool split")
    per_node = pools.trainer[0]
    if per_node % replica and replica % per_node:
        raise TAConfigError(f"one vLLM rollout replica ({replica} GPUs) would straddle nodes of {per_node} GPUs (verl "
                            f"places a replica within one node or on whole nodes); use a replica size that divides "
                            f"{per_node} or is a multiple of it")
    prompts = _positive_int(cfg.data.train_batch_size, "data.train_batch_size")
    n = _positive_int(rollout.n, "actor_rollout_ref.rollout.n")
    batch = prompts * n
    if batch % dp:
        raise TAConfigError(
            f"data.train_batch_size x actor_rollout_ref.rollout.n = {prompts} x {n} = {batch} sequences per step is not "
            f"divisible by the {dp} data-parallel ranks of {pool}): verl's batch balancing and its data-parallel "
            f"dispatch split the batch evenly; use e.g. {_suggest_batch(prompts, n, dp)}, or a trainer pool whose "
            f"GPU count divides {batch}")
    workers = _positive_int(OmegaConf.select(cfg, "actor_rollout_ref.rollout.agent.num_workers", default=1),
                            "actor_rollout_ref.rollout.agent.num_workers")
    if batch % workers:
        raise TAConfigError(
            f"{batch} sequences per step (data.train_batch_size x rollout.n) is not divisible by "
            f"actor_rollout_ref.rollout.agent.num_workers={workers} (verl's agent loop splits the batch evenly); use "
            f"e.g. {_suggest_batch(prompts, n, workers)}, or a num_workers that divides {batch}")
    mini = _positive_int(actor.ppo_mini_batch_size, "actor_rollout_ref.actor.ppo_mini_batch_size") * n
    if mini % dp:
        raise TAConfigError(
            f"actor_rollout_ref.actor.ppo_mini_batch_size x rollout.n = {mini} sequences is not divisible by the {dp} "
            f"data-parallel ranks of {pool}) (verl's train_mini_batch asserts it); use a ppo_mini_batch_size that "
            f"makes it a multiple of {dp}")
    if batch % mini:
        raise TAConfigError(
            f"{batch} sequences per step are not a whole number of mini-batches of actor_rollout_ref.actor."
            f"ppo_mini_batch_size x rollout.n = {mini} (verl's update iterates over whole mini-batches); TA-OPD "
            f"takes one step per rollout: set ppo_mini_batch_size = data.train_batch_size = {prompts}")
    check_micro_batches(cfg, batch // dp, mini // dp)


def check_micro_batches(cfg: DictConfig, per_rank: int, mini_per_rank: int) -> None:
    """verl's micro-batching of the statistics pass (old log-probs) and of the update, per rank:
    fixed micro-batches must divide the rank's share (``workers/engine/utils.py``); token budgets
    (``use_dynamic_bsz``) must hold the longest sequence (``utils/seqlen_balancing.py``), else
    verl asserts on the first long rollout, possibly many steps in."""
    rollout, actor = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor
    longest = _longest(cfg)
    for dynamic, budget_key, mbs_key, share, what in (
            (actor.get("use_dynamic_bsz", False), "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", mini_per_rank, "update"),
            (rollout.get("log_prob_use_dynamic_bsz", actor.get("use_dynamic_bsz", False)),
             "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", per_rank, "statistics pass")):
        if dynamic:
            budget = OmegaConf.select(cfg, budget_key)
            if budget is not None and budget < longest:
                raise TAConfigError(
                    f"{budget_key}={budget} is below the longest sequence, data.max_prompt_length + "
                    f"max_response_length = {longest} (verl's dynamic batching asserts it on the first long rollout "
                    f"of the {what}); give at least {longest}")
        else:
            mbs = OmegaConf.select(cfg, mbs_key)
            if mbs is not None and share % mbs:
                raise TAConfigError(
                    f"{mbs_key}={mbs} does not divide the {share} sequences each rank gets in the {what} (verl "
                    f"splits them into whole micro-batches); use a divisor of {share}")


def check_unsupported_modes(cfg: DictConfig) -> None:
    """verl modes under which the TA hooks cannot work: refused at startup, not on step 1."""
    if OmegaConf.select(cfg, "algorithm.rollout_correction.bypass_mode", default=False):
        raise TAConfigError("algorithm.rollout_correction.bypass_mode=true is not supported: verl then skips the "
                            "old-log-prob forward, which is where the TA statistics are computed; set it to false")
    for key in ("rollout_is", "rollout_rs"):  # verl applies them after the old-log-prob pass (ray_trainer.fit)
        value = OmegaConf.select(cfg, f"algorithm.rollout_correction.{key}", default=None)
        if value is not None:
            raise TAConfigError(
                f"algorithm.rollout_correction.{key}={value!r} is not supported: verl's rollout correction runs after "
                "the TA statistics (rejection sampling edits response_mask, importance weights rescale the loss), so "
                "the positions TA-OPD selects and the budget it counts would no longer be the ones trained; set "
                f"algorithm.rollout_correction.{key}=null")
    for key in ("actor_rollout_ref.actor.pad_to_length", "actor_rollout_ref.actor.fsdp_config.pad_to_length"):
        if OmegaConf.select(cfg, key, default=False):
            raise TAConfigError(f"{key}=true is not supported: the statistics pass ships the teacher's top-K' "
                                "fields, and verl's FSDP engine refuses pad_to_length with top-K fields; set it to false")
    t = OmegaConf.select(cfg, "actor_rollout_ref.rollout.temperature", default=1.0)
    if not (is_real(t) and t > 0):
        raise TAConfigError(f"actor_rollout_ref.rollout.temperature={t!r} is not allowed; it must be a finite number > 0: "
                            "verl's actor divides the logits by it (clamped at 1e-8) before the old log-probs and "
                            "the TA statistics, so greedy (0) training would score degenerate distributions")


def check_loss_settings(cfg: DictConfig, ta: TAConfig, logits_path: bool) -> None:
    """verl settings that would silently train another loss than ``ta_opd.loss`` / ``ta_opd.loss_agg``
    say (and than the run identity records), or abort it mid-run: refused at startup."""
    import importlib.util

    from ta_opd.losses import get_token_loss

    agg = OmegaConf.select(cfg, "actor_rollout_ref.actor.loss_agg_mode", default=ta.loss_agg)
    if agg != ta.loss_agg:  # verl aggregates our per-token loss with the actor's mode
        raise TAConfigError(f"actor_rollout_ref.actor.loss_agg_mode={agg!r} differs from ta_opd.loss_agg="
                            f"{ta.loss_agg!r}; set ta_opd.loss_agg (the actor's mode follows it)")
    clamp = OmegaConf.select(cfg, "distillation.distillation_loss.loss_max_clamp", default=None)
    if clamp is not None:
        raise TAConfigError(f"distillation.distillation_loss.loss_max_clamp={clamp!r} is not supported: verl would clip "
                            "the TA-OPD per-token loss, which the CPU backend and the spec do not; set it to null")
    dtype = OmegaConf.select(cfg, "ta_opd.teacher.logp_dtype", default="float32")
    if logits_path and dtype != "float32":
        raise TAConfigError(f"ta_opd.teacher.logp_dtype={dtype!r} with ta_opd.loss={ta.loss!r}: that loss reads the "
                            "teacher's top-K' log-probs, whose mass must sum to <= 1 (checked to 1e-4), which a 16-bit "
                            "dtype breaks; set ta_opd.teacher.logp_dtype=float32")
    module = getattr(get_token_loss(ta.loss), "__module__", None)
    try:  # Ray's worker processes register losses by importing their module (the setup hook)
        ok = module not in (None, "__main__") and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        ok = False
    if not ok:
        raise TAConfigError(f"ta_opd.loss={ta.loss!r} is registered in module {module!r}, which Ray's worker processes "
                            "cannot import; register it in an importable module (and have the worker setup hook "
                            "import it)")


def _longest(cfg: DictConfig) -> int:
    """The longest sequence a step can hold: data.max_prompt_length + data.max_response_length."""
    return _positive_int(cfg.data.get("max_prompt_length", 1), "data.max_prompt_length") + \
        _positive_int(cfg.data.max_response_length, "data.max_response_length")


def check_teacher_token_budget(budget: int | None, cfg: DictConfig) -> None:
    """The teacher forwards one sequence at least: a token budget below the longest sequence would
    fail on the first long rollout, on the cluster; say so now."""
    longest = _longest(cfg)
    if budget is not None and budget < longest:
        raise TAConfigError(f"ta_opd.teacher.max_tokens_per_micro_batch={budget} is below the longest sequence, "
                            f"data.max_prompt_length + max_response_length = {longest}; set it to at least {longest} "
                            f"(or null to batch by ta_opd.teacher.micro_batch_size alone)")


def check_teacher_embeds(student_logits: int, teacher_rows: int) -> None:
    """The rollout samples over every student logit row and the teacher is fed the sampled ids as
    context: a student with more logit rows than the teacher has embedding rows can hand the teacher
    an id it cannot embed (a device-side index error on GPU, possibly many steps in)."""
    if student_logits > teacher_rows:
        raise TAConfigError(
            f"the student has {student_logits} logit rows (actor_rollout_ref.model.path config.json vocab_size) but "
            f"the teacher embeds only {teacher_rows} ids (ta_opd.teacher_model_path config.json vocab_size): the "
            f"rollout can sample an id in [{teacher_rows}, {student_logits}) and the teacher would fail to embed it "
            "as context; use a teacher whose vocab_size is at least the student's (e.g. resize its embeddings)")


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
    check_teacher_embeds(s_cfg.vocab_size, t_cfg.vocab_size)
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
    if not all(is_int(i) and i >= 0 for i in ok_ids):
        raise TAConfigError(f"ta_opd.vocab_mismatch_ok_ids={ok_ids!r} is not allowed; give a list of token ids >= 0")
    vocab = model_vocab(student_path, teacher_path, ok_ids) if vocab_size is None else vocab_size
    ta.check_vocab(vocab)
    check_verl_options(cfg)
    check_unsupported_modes(cfg)
    nnodes = _positive_int(node.nnodes, "ta_opd.teacher.nnodes")
    per_node = _positive_int(node.n_gpus_per_node, "ta_opd.teacher.n_gpus_per_node")
    for key in ("wandb_histogram", "token_export"):
        if not isinstance(cfg.ta_opd.get(key, False), bool):
            raise TAConfigError(f"ta_opd.{key}={cfg.ta_opd.get(key)!r} is not allowed; choose true or false")
    wandb_group(cfg)  # checked here, before Ray; set in the task runner (recipe/ta_opd/wandb_run.py)
    colocate = node.get("colocate", False)
    if not isinstance(colocate, bool):
        raise TAConfigError(f"ta_opd.teacher.colocate={colocate!r} is not allowed; choose true or false")
    if colocate and backend != "fsdp":
        raise TAConfigError("ta_opd.teacher.colocate=true needs ta_opd.teacher.backend=fsdp (verl's vLLM teacher "
                            "servers always run on their own pool)")
    pools = split_allocation(_positive_int(cfg.trainer.nnodes, "trainer.nnodes"),
                             _positive_int(cfg.trainer.n_gpus_per_node, "trainer.n_gpus_per_node"),
                             nnodes, per_node, colocate)
    if backend == "vllm":
        inf = cfg.distillation.teacher_models.teacher_model.inference
        replica = inf.tensor_model_parallel_size * inf.data_parallel_size * inf.get("pipeline_model_parallel_size", 1)
        if (nnodes * per_node) % replica:
            raise TAConfigError(
                f"teacher pool ta_opd.teacher.nnodes x n_gpus_per_node = {nnodes * per_node} GPUs is not a multiple "
                f"of one vLLM teacher replica ({replica} GPUs = tensor x data x pipeline parallel sizes of "
                "distillation.teacher_models.teacher_model.inference)")
    check_trainer_divisibility(cfg, pools)
    with open_dict(cfg):  # verl's trainer.* keys describe its own (trainer) pool from here on
        cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node = len(pools.trainer), pools.trainer[0]
        custom = cfg.reward.custom_reward_function
        if not custom.get("path"):  # the recipe's grader (toy task + verl's default by data_source)
            custom.path, custom.name = REWARD_FN, "compute_score"
    from verl.utils.config import validate_config

    try:  # verl's own batch-size and micro-batch checks, now rather than on the cluster
        validate_config(config=cfg, use_reference_policy=False, use_critic=False)
    except (AssertionError, ValueError, InstantiationException) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        raise TAConfigError(f"verl rejects the configuration: {cause}") from e
    loss_mode = verl_loss_mode(ta.loss, backend)  # derived from the loss registry; refuses a loss verl cannot run
    check_loss_settings(cfg, ta, on_logits_path(ta.loss))
    dist = cfg.distillation
    with open_dict(cfg):
        dist.distillation_loss.loss_mode = loss_mode
        # verl's key `topk` is K' (what the teacher ships), our ta_opd.teacher_topk: the one place they meet
        dist.distillation_loss.topk = ta.teacher_topk
        dist.distillation_loss.use_task_rewards = False
        dist.distillation_loss.use_policy_gradient = False
        dist.distillation_loss.clip_ratio_low = ta.clip_low
        dist.distillation_loss.clip_ratio_high = ta.clip_high
        dist.teacher_models.teacher_model.model_path = teacher_path
        dist.nnodes, dist.n_gpus_per_node = nnodes, per_node
        if backend == "vllm":
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
    worker = dict(model_path=teacher_path, vocab_size=vocab, teacher_topk=ta.teacher_topk,
                  layout=node.get("layout", "sorted"), micro_batch_size=node.micro_batch_size,
                  max_tokens_per_micro_batch=node.get("max_tokens_per_micro_batch", None),
                  chunk_size=_positive_int(node.chunk_size, "ta_opd.teacher.chunk_size"),
                  param_dtype=str(node.param_dtype), logp_dtype=str(node.logp_dtype),
                  timeout_s=_positive_int(node.get("timeout_s", 3600), "ta_opd.teacher.timeout_s"))
    from recipe.ta_opd.verl_backend.teacher import TeacherWorkerConfig

    TeacherWorkerConfig(**worker)  # validates dtypes and sizes now, not on the cluster
    check_teacher_token_budget(worker["max_tokens_per_micro_batch"], cfg)
    return VerlPlan(ta=ta, vocab_size=vocab, teacher_backend=backend, loss_mode=loss_mode, teacher_worker=worker,
                    actor_distillation=copy.deepcopy(actor_distillation), pools=pools)
