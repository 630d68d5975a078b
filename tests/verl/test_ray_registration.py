"""Whatever TA-OPD registers with verl is registered in every Ray worker process before any
distillation config is built there."""

from omegaconf import OmegaConf


def test_setup_hook_registers_losses_in_a_fresh_worker(ray_cpu):
    def probe():  # nested: pickled by value, so unpickling it imports nothing of ours
        from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY

        return sorted(k for k in DISTILLATION_LOSS_REGISTRY if k.startswith("ta_opd"))

    got = ray_cpu.get(ray_cpu.remote(probe).remote())
    assert got == ["ta_opd_pg_opd", "ta_opd_pg_opd_topk", "ta_opd_topk_forward_kl", "ta_opd_topk_reverse_kl"]


def test_actor_worker_class_builds_its_distillation_config_in_a_worker(ray_cpu):
    from hydra import compose, initialize_config_dir

    from recipe.ta_opd.main import ta_config
    from recipe.ta_opd.verl_backend.actor import actor_worker_class
    from recipe.ta_opd.verl_backend.validate import plan
    from tests.verl.test_configs import RECIPE_DIR

    with initialize_config_dir(config_dir=RECIPE_DIR, version_base=None):
        cfg = compose("ta_opd_trainer", overrides=["ta_opd.loss=topk_reverse_kl"])
    ta = ta_config(cfg.ta_opd)
    p = plan(cfg, ta, student_path="s", teacher_path="t", vocab_size=151936)
    cls = actor_worker_class(ta.__dict__, p.vocab_size, p.actor_distillation)

    def build(worker_cls):  # what the actor's init_model does with the baked settings
        from verl.utils.config import omega_conf_to_dataclass

        from ta_opd.config import TAConfig

        d = omega_conf_to_dataclass(OmegaConf.create(worker_cls.ACTOR_DISTILLATION))
        return d.enabled, d.distillation_loss.loss_mode, d.distillation_loss.loss_settings.use_topk, \
            TAConfig.from_mapping(worker_cls.TA_OPD).loss, worker_cls.VOCAB_SIZE

    got = ray_cpu.get(ray_cpu.remote(build).remote(cls))
    assert got == (True, "ta_opd_topk_reverse_kl", True, "topk_reverse_kl", 151936)


def test_run_verls_ray_start_registers_and_finds_the_repository(tmp_path):
    """What run_verl passes to ray.init (verl's runtime env + ours), in a fresh Ray cluster."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = f"""
import ray
from hydra import compose, initialize_config_dir
from recipe.ta_opd.verl_backend.runner import REPO_ROOT, ray_runtime_env
with initialize_config_dir(config_dir="{root}/recipe/ta_opd/config", version_base=None):
    cfg = compose("ta_opd_trainer")
def probe():
    import sys
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY
    return "ta_opd_pg_opd" in DISTILLATION_LOSS_REGISTRY, REPO_ROOT in sys.path or REPO_ROOT in __import__("os").environ["PYTHONPATH"]
ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # negative control: no runtime env
print("PLAIN", ray.get(ray.remote(probe).remote())[0])
ray.shutdown()
ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env(cfg))
print("PROBE", ray.get(ray.remote(probe).remote()))
ray.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert "PLAIN False" in out.stdout, out.stderr[-3000:]  # a fresh worker has none of our losses...
    assert "PROBE (True, True)" in out.stdout, out.stderr[-3000:]  # ...until the setup hook registers them
