"""Ray worker setup hook of the CPU ``fit()`` test: the recipe's own hook, then the CPU pieces.

``run_verl`` starts Ray with ``worker_process_setup_hook`` = the recipe's loss registration;
the test points it here instead (environment variable ``TA_OPD_WORKER_SETUP_HOOK``, read by
``recipe.ta_opd.verl_backend.runner``), so every Ray process — task runner, actor ranks,
teacher ranks, agent-loop and reward workers, rollout servers — gets, before its first task:

1. TA-OPD's losses (the product hook, unchanged);
2. the CPU platform, selected (``VERL_PLATFORM=cpu``);
3. engine selection: ``VERL_ENGINE_DEVICE=cuda`` makes verl's ``EngineRegistry`` hand out its
   FSDP engine (registered for cuda/npu only), which then runs on the platform's device, the CPU;
   the recipe's kept-rows engine (``recipe/ta_opd/verl_backend/engine.py``, registered for
   (cuda, nvidia)) is registered for (cuda, this platform's vendor ``cpu``) too, so the test runs
   the update the way a GPU run does;
4. the CPU rollout (``RolloutReplicaRegistry.register`` + the in-worker adapter class);
5. the actor ranks' process group opened on plain gloo before verl opens it (see
   :func:`gloo_before_verl`);
6. with ``TA_OPD_CPU_FIT_RECORD=<dir>``: recorders that save what the test asserts on.
"""

from __future__ import annotations

import os

HOOK = "tests.verl.cpu_fit.setup.worker_setup"
RECORD_ENV = "TA_OPD_CPU_FIT_RECORD"


def register_cpu() -> None:
    from verl.plugin.platform import platform_manager as pm

    from tests.verl.cpu_fit.platform import NAME, PlatformCPU

    os.environ["VERL_PLATFORM"] = NAME
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    if pm.PlatformRegistry.get(NAME) is None:
        pm.PlatformRegistry.register(NAME)(PlatformCPU)
    if pm._current_platform is None or pm._current_platform.device_name != "cpu":
        pm.set_platform(PlatformCPU())

    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from tests.verl.cpu_fit import rollout

    # verl 0.9.1 has no public registration for the in-worker rollout class: its lookup table is
    # this module dict (verl/workers/rollout/base.py, _ROLLOUT_REGISTRY)
    rollout_base._ROLLOUT_REGISTRY[(rollout.NAME, "async")] = "tests.verl.cpu_fit.rollout.HFWeightAdapter"
    RolloutReplicaRegistry.register(rollout.NAME, rollout.load_replica)


def gloo_before_verl() -> None:
    """verl's workers open their process group with ``f"cpu:gloo,{device}:{backend}"``
    (``verl/utils/distributed.py``, ``initialize_global_process_group_ray``), which torch rejects
    when the device is ``cpu`` ("Duplicate device type cpu"); it skips the call when a group
    exists. So the actor worker (our class) opens the plain gloo group first."""
    import functools

    import torch.distributed as dist

    from recipe.ta_opd.verl_backend import actor as A

    cls = A.TAOPDActorRolloutRefWorker
    if getattr(cls, "_ta_gloo_first", False):
        return
    init_model = cls.init_model

    def init_model_on_gloo(self):
        if not dist.is_initialized():
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend="gloo", rank=rank, world_size=world)
        return init_model(self)

    cls.init_model = functools.wraps(init_model)(init_model_on_gloo)  # keeps verl's @register attributes
    cls._ta_gloo_first = True


def worker_setup() -> None:
    import importlib

    register_cpu()  # first: verl resolves its platform once, on first use
    from recipe.ta_opd.verl_backend.runner import SETUP_HOOK

    module, _, fn = SETUP_HOOK.rpartition(".")
    getattr(importlib.import_module(module), fn)()
    from recipe.ta_opd.verl_backend.engine import register_engine
    from tests.verl.cpu_fit.platform import PlatformCPU

    register_engine(os.environ["VERL_ENGINE_DEVICE"], PlatformCPU().vendor_name)
    gloo_before_verl()
    if os.environ.get(RECORD_ENV):
        from tests.verl.cpu_fit.record import install

        install(os.environ[RECORD_ENV])
