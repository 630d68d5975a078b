"""The identity of a run: what a checkpoint may only be resumed with.

It holds a fingerprint (``recipe/ta_opd/run_identity.py``) of each model folder (weights, config
and tokenizer files) and data file, and every knob of :class:`CPURunConfig` that changes the trajectory. Only the knobs in
:data:`SAFE_TO_CHANGE` (how long, how often to evaluate/save, where to log) may differ on resume;
any other difference is refused with a message naming each key, its checkpointed and its new
value. Moving a model or data file is fine (the fingerprint, not the path, is compared).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from recipe.ta_opd.cpu.plan import key_of
from recipe.ta_opd.run_identity import differences, fingerprint, plain
from ta_opd.errors import TAConfigError

# CPURunConfig fields that may change between a checkpoint and its resumption
SAFE_TO_CHANGE = frozenset({"total_steps", "test_freq", "save_freq", "resume_mode", "project", "experiment",
                            "loggers", "rollout_dir", "out_dir", "max_ckpt_to_keep", "pair",
                            "token_export", "wandb_histogram", "gradient_checkpointing"})
PATH_FIELDS = frozenset({"student_path", "teacher_path", "train_file", "val_file", "test_file"})


def of(cfg) -> dict:
    """The identity of a :class:`CPURunConfig` as a flat {user-facing key: JSON value} dict."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        if f.name in SAFE_TO_CHANGE:
            continue
        value = getattr(cfg, f.name)
        if f.name in PATH_FIELDS:
            out[key_of(f.name)] = None if value is None else {"fingerprint": fingerprint(value), "path": str(value)}
        elif f.name != "ta":
            out[key_of(f.name)] = plain(value)
    for k, v in plain(cfg.ta).items():  # the selection/loss knobs; the run's seed is also ta_opd.seed
        key = f"ta_opd.{k}"
        out[key if out.get(key, v) == v else f"{key} (TAConfig)"] = v
    return out


def own_folder(cfg, now: dict) -> str:
    """The override that gives this run a folder of its own (nothing is overwritten): the experiment
    name + 6 hex digits of the identity when the folder is named after the experiment (the default
    ``runs/<project>/<experiment>``), else the folder + those digits. Same run, same suggestion."""
    slim = {k: (v["fingerprint"] if isinstance(v, dict) and "fingerprint" in v else v) for k, v in now.items()}
    tag = hashlib.sha256(json.dumps(slim, sort_keys=True, default=str).encode()).hexdigest()[:6]
    if Path(cfg.out_dir).name == cfg.experiment:
        return f"trainer.experiment_name={cfg.experiment}_{tag}"
    return f"trainer.default_local_dir={cfg.out_dir}_{tag}"


def way_out(fresh: str, folder: Path) -> str:
    """The ways out of a refused resume, the one that overwrites nothing first."""
    return (f"To start this run without touching that one, give it its own folder: {fresh} (nothing is overwritten). "
            f"trainer.resume_mode=disable instead starts over IN {folder} and overwrites its checkpoints")


def check_resume(saved: dict | None, now: dict, checkpoint: Path, fresh: Callable[[], str]) -> None:
    """Refuse to resume ``checkpoint`` (identity ``saved``) under a run whose identity is ``now``;
    ``fresh()`` gives :func:`own_folder`'s override, offered first."""
    folder = checkpoint.parent.parent  # <out_dir>/checkpoints/global_step_<n>
    if not isinstance(saved, dict):
        raise TAConfigError(f"checkpoint {checkpoint} records no run identity, so it cannot be resumed safely. "
                            f"{way_out(fresh(), folder)}")
    diff = differences(saved, now)
    if diff:
        raise TAConfigError(
            f"checkpoint {checkpoint} belongs to a different run; resuming it would mix two trajectories. "
            f"Differences: {'; '.join(diff)}. {way_out(fresh(), folder)}. To continue the checkpointed run, launch it "
            f"with its settings (only {', '.join(sorted(key_of(k) for k in SAFE_TO_CHANGE - {'pair'}))} may change "
            "on resume)")
