"""verl's ActorRolloutRefWorker with the TA-OPD actor loss installed.

Importing this module registers TA-OPD's per-token losses with verl (``losses.register_losses``);
building the worker runs ``losses.register_all``, which also registers the kept-rows update
engine (``engine.py``), so every Ray process that builds the worker has both before
``init_model`` builds the distillation config and verl's engine. ``update_actor`` marks its
forward ``ta_opd_phase = "update"`` (``losses.update_flags``): the engine's cue for the kept rows.
:func:`actor_worker_class` bakes the TA-OPD settings into a subclass because verl constructs the
actor with a fixed argument list (config, role, distillation_config).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker

from recipe.ta_opd.verl_backend import losses as L
from ta_opd.config import TAConfig


class TAOPDActorRolloutRefWorker(ActorRolloutRefWorker):
    # set by actor_worker_class: the TAConfig mapping, the shared vocabulary size, and (FSDP
    # teacher backend) the actor-only distillation config that enables verl's loss machinery
    TA_OPD: dict = {}
    VOCAB_SIZE: int = 0
    ACTOR_DISTILLATION: dict | None = None

    def __init__(self, config: DictConfig, role: str, distillation_config=None, **kwargs):
        L.register_all()  # losses registered since the import, and the kept-rows engine (idempotent)
        if self.ACTOR_DISTILLATION is not None:
            distillation_config = OmegaConf.create(self.ACTOR_DISTILLATION)
        super().__init__(config, role, distillation_config=distillation_config, **kwargs)
        self.ta_cfg = TAConfig.from_mapping(self.TA_OPD)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        if self.actor is not None:
            inner = self.loss_fn  # partial(distillation_ppo_loss, config=..., distillation_config=...)
            dcfg = inner.keywords["distillation_config"]
            self.ta_loss_mode = dcfg.distillation_loss.loss_mode
            self.loss_fn = L.make_actor_loss(inner.keywords["config"], dcfg, self.ta_cfg, self.VOCAB_SIZE)
            self.actor.set_loss_fn(self.loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        tu.assign_non_tensor(data, **L.update_flags(self.ta_loss_mode))  # see update_flags
        return super().update_actor(data)


def actor_worker_class(ta_opd: dict, vocab_size: int, actor_distillation: dict | None):
    """A subclass of :class:`TAOPDActorRolloutRefWorker` carrying this run's settings."""
    return type("TAOPDActorWorker", (TAOPDActorRolloutRefWorker,), {
        "TA_OPD": dict(ta_opd), "VOCAB_SIZE": int(vocab_size), "ACTOR_DISTILLATION": actor_distillation,
        "__module__": __name__})
