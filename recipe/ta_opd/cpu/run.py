"""The CPU backend's ``run(cfg, ta)`` (what ``ta_opd.backend=cpu`` calls): plan, lock the output
folder (and the rollout folder), set the torch threads, train, print the summary."""

from __future__ import annotations

import json
import os

from omegaconf import DictConfig, OmegaConf

from ta_opd.config import TAConfig


def set_threads(requested: int | None) -> str:
    """torch CPU threads: ``ta_opd.cpu.num_threads`` (checked by the plan), else $OMP_NUM_THREADS,
    else half the visible CPUs (on a shared 2-core machine torch's default of all cores measured
    5-9x slower than one thread). Returns the line to print."""
    import torch

    if requested is not None:
        n, why = requested, "ta_opd.cpu.num_threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n, why = int(os.environ["OMP_NUM_THREADS"]), "$OMP_NUM_THREADS"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n, why = max(1, cpus // 2), f"half of the {cpus} visible CPUs; set ta_opd.cpu.num_threads to change"
    torch.set_num_threads(n)
    return f"[ta-opd] torch threads: {n} ({why})"


def say(line: str) -> None:
    """Print above the progress bar (tqdm.write), so a message never splits the bar's line."""
    from tqdm import tqdm

    tqdm.write(line)


def run(cfg: DictConfig, ta: TAConfig) -> dict:
    from verl.utils.tracking import Tracking

    from recipe.ta_opd import runlock
    from recipe.ta_opd.cpu.plan import plan
    from recipe.ta_opd.cpu.trainer import CPUTrainer
    from recipe.ta_opd.grading import Grader, resolve_score_fn
    from recipe.ta_opd.wandb_run import apply_group

    apply_group(cfg)  # ta_opd.wandb_group checked, -> $WANDB_RUN_GROUP (read by the wandb.init inside Tracking)
    p = plan(cfg, ta)  # every knob, folder, model and data file, before anything is loaded
    rc = p.run
    runlock.acquire(rc.out_dir)  # one run per folder; released by main.guarded() when the run ends
    if rc.rollout_dir:  # its rollouts too: two runs must not overwrite each other's step files
        runlock.acquire(rc.rollout_dir, key="trainer.rollout_data_dir")
    print(set_threads(p.num_threads))
    # "console" is the trainer's own compact line per step (cpu/console.py), not verl's all-metrics console logger
    tracker = Tracking(project_name=rc.project, experiment_name=rc.experiment,
                       default_backend=[b for b in rc.loggers if b != "console"],
                       config=OmegaConf.to_container(cfg, resolve=True))
    wandb = tracker.logger.get("wandb")
    if wandb is not None:  # the resolved pair (the toy's model paths are null in the Hydra config)
        wandb.config.update({"pair": {"name": rc.pair, "student": rc.student_path, "teacher": rc.teacher_path}})
    score_fn, grading = resolve_score_fn(cfg.get("reward"))
    print(f"[ta-opd] grading: {grading}")
    ok = False
    try:
        summary = CPUTrainer(rc, tracker=tracker, log=say, grader=Grader(score_fn, log=say)).fit()
        ok = True
    finally:
        tracker.finish(exit_code=0 if ok else 1)  # the W&B run is closed (and marked failed on an error)
    print("[ta-opd] summary: " + json.dumps(summary, indent=2))
    return summary
