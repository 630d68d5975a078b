"""The default ``trainer.experiment_name`` of a run (both backends): its output folder's name."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ta_opd.config import TAConfig


def _where(model) -> str:
    """A local model folder by its absolute path; anything else (a hub id such as Qwen/Qwen3-4B) as
    given, so the name does not depend on the working directory."""
    if model is None:
        return "none"
    local = Path(os.path.expanduser(str(model)))
    return str(local.resolve()) if local.exists() else str(model)


def data_tag(cfg: DictConfig) -> str:
    """``_data<hash>`` of the data files' CONTENT (the run identity's fingerprint: moving a file keeps
    the name, editing it changes it); empty when no data file is given (the toy's own data)."""
    from recipe.ta_opd.run_identity import source

    files = []
    for key in ("data.train_files", "data.val_files"):
        value = OmegaConf.select(cfg, key, default=None)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        files += [value] if isinstance(value, str) else list(value or [])
    if not files:
        return ""
    prints = [source(os.path.expanduser(str(f)))["fingerprint"] for f in files]
    return "_data" + hashlib.sha256(chr(0).join(prints).encode()).hexdigest()[:6]


def run_name(cfg: DictConfig, ta: TAConfig) -> str:
    """Default trainer.experiment_name: ``<pair>[_data<hash>]_<selector>[_rho<ρ>]_k<K>_seed<s>`` (full
    OPD keeps every position, so it carries no budget). ``<pair>`` is ``toy`` or
    ``<student>_from_<teacher>_<hash of both>``, ``_data<hash>`` the data files' content
    (:func:`data_tag`), so runs of different pairs, data, selections or seeds never share an output
    folder; anything else that differs is caught by the run identity when a checkpoint would be resumed."""
    student, teacher = cfg.actor_rollout_ref.model.path, cfg.ta_opd.teacher_model_path
    if student is None and teacher is None:
        pair = "toy"
    else:
        where = [_where(x) for x in (student, teacher)]
        slug = [re.sub(r"[^A-Za-z0-9.-]+", "-", Path(x).name)[:40] or "model" for x in where]
        pair = f"{slug[0]}_from_{slug[1]}_{hashlib.sha256(chr(0).join(where).encode()).hexdigest()[:6]}"
    budget = "" if ta.selector == "full" else f"_rho{ta.budget}"
    return f"{pair}{data_tag(cfg)}_{ta.selector}{budget}_k{ta.topk}_seed{ta.seed}"
