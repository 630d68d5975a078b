"""The task runner's role and pool wiring (plain methods; no Ray cluster needed)."""

import pytest
from hydra import compose, initialize_config_dir

from verl.trainer.ppo.utils import Role

from recipe.ta_opd.main import ta_config
from recipe.ta_opd.verl_backend.actor import TAOPDActorRolloutRefWorker
from recipe.ta_opd.verl_backend.runner import TEACHER_POOL, TAOPDTaskRunner
from recipe.ta_opd.verl_backend.validate import plan
from tests.verl.test_configs import RECIPE_DIR


def _runner(*overrides):
    with initialize_config_dir(config_dir=RECIPE_DIR, version_base=None):
        cfg = compose("ta_opd_trainer", overrides=["trainer.n_gpus_per_node=4", *overrides])
    runner = TAOPDTaskRunner()
    runner.plan = plan(cfg, ta_config(cfg.ta_opd), student_path="s", teacher_path="t", vocab_size=151936)
    runner.add_actor_rollout_worker(cfg)
    runner.add_teacher_model_resource_pool(cfg)
    return runner, runner.init_resource_pool_mgr(cfg)


# trainer.nnodes counts ALL nodes of the run: 3 x 4 GPUs with a 1-node teacher leaves [4, 4] for the trainer
@pytest.mark.parametrize("overrides, pool, spec", [
    (["trainer.nnodes=3", "ta_opd.teacher.nnodes=1", "ta_opd.teacher.n_gpus_per_node=4"], TEACHER_POOL, [4]),
    (["trainer.nnodes=2", "ta_opd.teacher.colocate=true"], "global_pool", [4, 4]),
    (["trainer.nnodes=3", "ta_opd.teacher.backend=vllm", "ta_opd.teacher.nnodes=1", "ta_opd.teacher.n_gpus_per_node=4"],
     "teacher_pool", [4]),
])
def test_roles_and_pools(overrides, pool, spec):
    runner, mgr = _runner(*overrides)
    actor = runner.role_worker_mapping[Role.ActorRollout]
    cls = actor.__ray_metadata__.modified_class
    assert issubclass(cls, TAOPDActorRolloutRefWorker) and cls.VOCAB_SIZE == 151936
    assert mgr.mapping[Role.TeacherModel] == pool
    assert mgr.resource_pool_spec[pool] == spec
    assert mgr.resource_pool_spec["global_pool"] == [4, 4]


def test_the_recipe_runtime_env_keeps_a_users_pythonpath(monkeypatch):
    from recipe.ta_opd.verl_backend.runner import REPO_ROOT, SETUP_HOOK, add_recipe_runtime_env

    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("TA_OPD_WORKER_SETUP_HOOK", raising=False)
    with initialize_config_dir(config_dir=RECIPE_DIR, version_base=None):
        cfg = compose("ta_opd_trainer", overrides=["+ray_kwargs.ray_init.runtime_env.env_vars.PYTHONPATH=/opt/mine"])
    add_recipe_runtime_env(cfg)
    env = cfg.ray_kwargs.ray_init.runtime_env
    assert env.env_vars.PYTHONPATH.split(":") == [REPO_ROOT, "/opt/mine"]
    assert env.worker_process_setup_hook == SETUP_HOOK
