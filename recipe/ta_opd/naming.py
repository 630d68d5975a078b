"""The default ``trainer.experiment_name`` of a run (both backends): its output folder's name."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from ta_opd.config import TAConfig


def run_name(cfg: DictConfig, ta: TAConfig) -> str:
    """Default trainer.experiment_name: the pair and the selection knobs, so runs of different
    pairs never share an output folder (or resume each other's checkpoints)."""
    import hashlib
    import re

    student, teacher = cfg.actor_rollout_ref.model.path, cfg.ta_opd.teacher_model_path
    if student is None and teacher is None:
        pair = "toy"
    else:
        paths = [str(Path(os.path.expanduser(str(x))).resolve()) if x is not None else "none"
                 for x in (student, teacher)]
        slug = [re.sub(r"[^A-Za-z0-9.-]+", "-", Path(x).name)[:40] or "model" for x in paths]
        pair = f"{slug[0]}_from_{slug[1]}_{hashlib.sha256(chr(0).join(paths).encode()).hexdigest()[:6]}"
    return f"{pair}_{ta.selector}_rho{ta.budget}_k{ta.topk}_seed{ta.seed}"
