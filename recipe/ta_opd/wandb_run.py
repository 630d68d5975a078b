"""A run's W&B name and group, on both backends.

Both backends log through verl's ``Tracking`` (``verl/utils/tracking.py``), which calls
``wandb.init(project=trainer.project_name, name=trainer.experiment_name, entity=$WANDB_ENTITY,
config=<the whole config>)``: the run is named after the experiment (its default comes from
``recipe/ta_opd/naming.py``) and no group is passed, so ``wandb.init`` takes the group from
``$WANDB_RUN_GROUP``. ``ta_opd.wandb_group`` is therefore put there, in the process that builds the
``Tracking``, before it does: ``cpu/run.py`` on the CPU backend, the task runner
(``verl_backend/runner.py``, where verl's ``fit()`` builds it) on the verl backend. verl's ``fit()``
never finishes its ``Tracking``; :func:`finish` closes the W&B run it left open.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from ta_opd.errors import TAConfigError

GROUP_KEY = "ta_opd.wandb_group"
GROUP_ENV = "WANDB_RUN_GROUP"  # read by wandb.init when no group is passed


def wandb_group(cfg) -> str | None:
    """The checked ``ta_opd.wandb_group``: a name, or None (no group of ours; a ``$WANDB_RUN_GROUP``
    the user set still applies)."""
    value = OmegaConf.select(cfg, GROUP_KEY, default=None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise TAConfigError(f"{GROUP_KEY}={value!r} is not allowed; give a non-empty group name (the runs of one "
                            "sweep share it) or null (no group)")
    return str(value)


def apply_group(cfg) -> str | None:
    """Put ``ta_opd.wandb_group`` into ``$WANDB_RUN_GROUP`` of this process (it wins over a value
    already there); call before verl's ``Tracking`` is built. Returns the group."""
    group = wandb_group(cfg)
    if group is not None:
        os.environ[GROUP_ENV] = group
    return group


def finish(ok: bool) -> None:
    """Close the W&B run of this process, if one is open (marked failed unless ``ok``)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.run.finish(exit_code=0 if ok else 1)
