"""Ray task runner of the verl backend and ``run_verl`` (what ``ta_opd.backend=verl`` calls).

Follows verl's recipe pattern: subclass the task runner, build our trainer, ``init_workers()``,
``fit()``. Differences from verl's ``TaskRunner.run``: the actor role uses our worker class (TA
settings baked in), the teacher pool is added for the FSDP teacher, and the trainer is
:class:`TAOPDRayTrainer`. ``run_verl`` launches through verl's own ``run_ppo`` (its
determinism variables, runtime env and Ray start), adding to the runtime env a worker setup hook
that registers TA-OPD's losses in every worker process (verl's agent-loop and teacher workers
build distillation configs too); the Ray cluster is checked first thing in the runner.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import ray
import ray.exceptions
from omegaconf import OmegaConf, open_dict

from verl.trainer.main_ppo_v0 import BaseTaskRunner

from recipe.ta_opd.verl_backend.validate import VerlPlan
from ta_opd.errors import TAConfigError

TEACHER_POOL = "ta_opd_teacher_pool"
SETUP_HOOK = "recipe.ta_opd.verl_backend.losses.register_all"
# tests only: a hook that calls SETUP_HOOK and then registers more (tests/verl/cpu_fit/setup.py)
SETUP_HOOK_ENV = "TA_OPD_WORKER_SETUP_HOOK"
REPO_ROOT = str(Path(__file__).resolve().parents[3])


class TAOPDTaskRunner(BaseTaskRunner):
    def add_actor_rollout_worker(self, config):
        from verl.trainer.ppo.utils import Role

        from recipe.ta_opd.verl_backend.actor import actor_worker_class

        _, wg_cls = super().add_actor_rollout_worker(config)
        role = Role.ActorRolloutRef if Role.ActorRolloutRef in self.role_worker_mapping else Role.ActorRollout
        cls = actor_worker_class(self.plan.ta.__dict__, self.plan.vocab_size, self.plan.actor_distillation)
        self.role_worker_mapping[role] = ray.remote(cls)
        return cls, wg_cls

    def init_resource_pool_mgr(self, config):
        from verl.trainer.ppo.utils import Role

        mgr = super().init_resource_pool_mgr(config)
        if self.plan.teacher_backend == "fsdp":
            if self.plan.teacher_pool is None:  # colocated: the teacher ranks share the trainer's GPUs
                mgr.mapping[Role.TeacherModel] = "global_pool"
            else:
                mgr.resource_pool_spec[TEACHER_POOL] = list(self.plan.teacher_pool)
                mgr.mapping[Role.TeacherModel] = TEACHER_POOL
        return mgr

    PLAN: VerlPlan | None = None  # set by runner_class

    def run(self, config, plan: VerlPlan | None = None):
        from verl.plugin.platform.platform_manager import get_platform
        from verl.trainer.ppo.utils import create_rl_dataset, create_rl_sampler, need_critic, need_reference_policy
        from verl.utils.config import omega_conf_to_dataclass, validate_config
        from verl.utils.dataset.rl_dataset import collate_fn

        from recipe.ta_opd.verl_backend.trainer import TAOPDRayTrainer, VerlSettings
        from recipe.ta_opd.verl_backend.validate import check_cluster
        from recipe.ta_opd.wandb_run import apply_group
        from recipe.ta_opd.wandb_run import finish as finish_wandb

        self.plan = plan = plan or self.PLAN
        # before any data or model loads, on what is free now (other jobs on the cluster included)
        check_cluster(plan.pools, ray.nodes(), get_platform().ray_resource_name(),
                      available=ray._private.state.available_resources_per_node())
        OmegaConf.resolve(config)
        _, wg_cls = self.add_actor_rollout_worker(config)
        self.add_reward_model_resource_pool(config)
        self.add_teacher_model_resource_pool(config)
        validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        tokenizer, processor = model_config.tokenizer, model_config.processor
        resource_pool_manager = self.init_resource_pool_mgr(config)
        train = create_rl_dataset(config.data.train_files, config.data, tokenizer, processor, is_train=True,
                                  max_samples=config.data.get("train_max_samples", -1))
        val = create_rl_dataset(config.data.val_files, config.data, tokenizer, processor, is_train=False,
                                max_samples=config.data.get("val_max_samples", -1))
        settings = VerlSettings(teacher_backend=plan.teacher_backend, vocab_size=plan.vocab_size,
                                teacher_worker=plan.teacher_worker, loss_mode=plan.loss_mode,
                                wandb_histogram=bool(config.ta_opd.wandb_histogram),
                                token_export=bool(config.ta_opd.get("token_export", False)))
        trainer = TAOPDRayTrainer(
            config=config, tokenizer=tokenizer, processor=processor, role_worker_mapping=self.role_worker_mapping,
            resource_pool_manager=resource_pool_manager, ray_worker_group_cls=wg_cls, train_dataset=train,
            val_dataset=val, collate_fn=collate_fn, train_sampler=create_rl_sampler(config.data, train),
            ta_cfg=plan.ta, ta_settings=settings)
        apply_group(config)  # ta_opd.wandb_group -> $WANDB_RUN_GROUP, read by the wandb.init inside fit()'s Tracking
        trainer.init_workers()
        ok = False
        try:
            trainer.fit()
            ok = True
        finally:
            finish_wandb(ok)  # verl's fit() leaves its W&B run open; a killed worker would lose its tail


def add_recipe_runtime_env(config) -> None:
    """Put into ``ray_kwargs.ray_init.runtime_env`` what every Ray process of the recipe needs:
    this repository on PYTHONPATH and the loss-registration setup hook. verl's ``run_ppo`` merges
    it over verl's own runtime env (``get_ppo_ray_runtime_env``)."""
    with open_dict(config):
        if config.ray_kwargs.get("ray_init") is None:
            config.ray_kwargs.ray_init = {}
        init = config.ray_kwargs.ray_init
        given = OmegaConf.select(init, "runtime_env.env_vars.PYTHONPATH", default=None)  # the user's: kept, after ours
        extra = [given] if given else []
        paths = [REPO_ROOT] + [p for p in os.pathsep.join([*extra, os.environ.get("PYTHONPATH", "")]).split(os.pathsep)
                               if p and p != REPO_ROOT]
        ours = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))},
                "worker_process_setup_hook": os.environ.get(SETUP_HOOK_ENV) or SETUP_HOOK}
        init.runtime_env = OmegaConf.merge(init.get("runtime_env") or {}, ours)


def ray_runtime_env(config) -> dict:
    """The runtime env verl's ``run_ppo`` passes to ``ray.init`` for this config (tests start Ray
    with it): verl's PPO runtime env merged with :func:`add_recipe_runtime_env`'s."""
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    config = copy.deepcopy(config)
    add_recipe_runtime_env(config)
    env = OmegaConf.to_container(OmegaConf.merge(get_ppo_ray_runtime_env(config), config.ray_kwargs.ray_init.runtime_env),
                                 resolve=True)
    return {k: v for k, v in env.items() if v is not None}  # e.g. verl's working_dir: null


def runner_class(plan: VerlPlan):
    """The Ray task runner with this run's plan baked in (verl's ``run_ppo`` calls ``run(config)``).
    Plain ``ray.remote`` as verl's own ``TaskRunner`` (``main_ppo.py``): it holds no CPU while it runs
    (Ray needs one free CPU only to schedule it, before the pools exist), so it never leaves a node
    short of the CPUs verl's placement bundles take."""
    return ray.remote(type("TAOPDTaskRunner", (TAOPDTaskRunner,), {"PLAN": plan, "__module__": __name__}))


def run_verl(config, plan: VerlPlan) -> None:
    """Train through verl's own ``run_ppo`` (its determinism environment, runtime env, Ray start,
    profiling options) with our task runner. The run identity is checked and the folder locked
    first, before Ray starts (a no-op when the entry point already did it)."""
    from verl.trainer.main_ppo import run_ppo

    from recipe.ta_opd.verl_backend.identity import check_and_claim

    check_and_claim(config)
    add_recipe_runtime_env(config)
    try:
        run_ppo(config, task_runner_class=runner_class(plan))
    except ray.exceptions.RayTaskError as e:  # a startup refusal inside the runner (check_cluster): exit 2
        if isinstance(getattr(e, "cause", None), TAConfigError):
            raise e.cause from None
        raise
