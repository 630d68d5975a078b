"""The one-line messages the entry point (``main.py``) prints instead of a traceback: a mistake
Hydra finds while composing the config, and where an interrupted run stopped."""

from __future__ import annotations

import difflib
import os

from omegaconf import DictConfig, OmegaConf


def where_stopped(cfg: DictConfig) -> str:
    """Where an interrupted run stopped and how to resume it (one line)."""
    from pathlib import Path

    from recipe.ta_opd.cpu.checkpoint import TRACKER

    out = Path(os.path.expanduser(str(OmegaConf.select(cfg, "trainer.default_local_dir", default="."))))
    for folder in (out / "checkpoints", out):  # the CPU backend's checkpoints, verl's
        tracker = folder / TRACKER
        step = tracker.read_text().strip() if tracker.is_file() else ""
        if step.isdigit():
            return (f"the last checkpoint is {folder / f'global_step_{step}'} (step {step}); rerun the same command "
                    "(trainer.resume_mode=auto) to resume from it")
    return f"no checkpoint was written in {out} yet; rerunning the same command starts over"


def composition_error(e: Exception) -> str:
    """One line for a mistake Hydra finds while composing (before ``main`` runs), naming what is allowed."""
    import re

    from hydra.errors import MissingConfigException, OverrideParseException

    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:  # +experiment=nope
        group, _, name = e.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not allowed: there is no such {group}; choose one of: {', '.join(e.options)}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {text}"
    missing, append = re.search(r"Could not override '([^']+)'", text), re.search(r"use (\+\S+)", text)
    parent = getattr(e.__cause__, "parent_node", None)
    if missing and append and OmegaConf.is_dict(parent):  # a misspelt key (data.max_respons_length=64)
        name = str(e.__cause__.key)
        close = difflib.get_close_matches(name, [str(k) for k in parent.keys()], n=1)
        hint = f" (did you mean {e.__cause__.full_key[: -len(name)]}{close[0]}?)" if close else ""
        return f"{missing[1]} is not a key of the configuration{hint}; to add a new key write {append[1]}"
    return text
