"""Entry point: ``python -m recipe.ta_opd.main [hydra overrides]``.

Chooses the backend (``ta_opd.backend``: auto = verl when CUDA GPUs are visible, else the CPU
backend), prints which and why, validates the TA-OPD knobs, and runs. With no model paths the
embedded toy teacher–student pair is used (built once, then cached).
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError, TAInputError

# ta_opd.* keys that belong to the recipe rather than to TAConfig
RECIPE_KEYS = {"backend", "teacher_model_path", "toy", "cpu", "teacher", "wandb_histogram", "vocab_mismatch_ok_ids", "dry_run"}
BACKENDS = ("auto", "cpu", "verl")


def ta_config(node) -> TAConfig:
    values = OmegaConf.to_container(node, resolve=True)
    known = {f.name for f in fields(TAConfig)} | RECIPE_KEYS
    unknown = sorted(set(values) - known)
    if unknown:
        raise TAConfigError(f"unknown key(s) ta_opd.{unknown[0]}{' ...' if len(unknown) > 1 else ''}; "
                            f"valid keys: {', '.join(sorted(known))}")
    return TAConfig.from_mapping({k: v for k, v in values.items() if k not in RECIPE_KEYS})


def choose_backend(requested: str) -> tuple[str, str]:
    if requested not in BACKENDS:
        raise TAConfigError(f"ta_opd.backend={requested!r} is not allowed; choose one of: {', '.join(BACKENDS)}")
    import torch

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        if n_gpu > 0:
            return "verl", f"auto: {n_gpu} CUDA GPU(s) visible"
        return "cpu", "auto: no CUDA GPU visible"
    return requested, "requested with ta_opd.backend"


def _existing(path, key: str) -> str:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{key}={path} does not exist")
    return str(p)


def run_cpu(cfg: DictConfig, ta: TAConfig) -> dict:
    from verl.utils.tracking import Tracking

    from recipe.ta_opd.cpu.trainer import CPURunConfig, CPUTrainer

    student, teacher = cfg.actor_rollout_ref.model.path, cfg.ta_opd.teacher_model_path
    train, val, test = cfg.data.train_files, cfg.data.val_files, None
    if student is None and teacher is None:
        from ta_opd.toy.build import ToySpec, load_or_build

        spec_node = cfg.ta_opd.toy.get("spec")
        spec = ToySpec(**(OmegaConf.to_container(spec_node, resolve=True) if spec_node is not None else {}))
        pair = load_or_build(cfg.ta_opd.toy.cache_dir, spec)
        student, teacher = str(pair.student), str(pair.teacher)
        train = train or str(pair.train_file)
        val = val or str(pair.val_file)
        test = str(pair.test_file) if cfg.data.val_files is None else None
        print(f"[ta-opd] model paths not given: toy pair (student {student}, teacher {teacher})")
    elif student is None or teacher is None:
        raise TAConfigError("give both actor_rollout_ref.model.path (student) and ta_opd.teacher_model_path "
                            "(teacher), or neither for the toy pair")
    student = _existing(student, "actor_rollout_ref.model.path")
    teacher = _existing(teacher, "ta_opd.teacher_model_path")
    if train is None or val is None:
        raise TAConfigError("data.train_files and data.val_files are required with your own models")
    train, val = (_existing(f if isinstance(f, str) else f[0], k) for f, k in
                  ((train, "data.train_files"), (val, "data.val_files")))
    actor = cfg.actor_rollout_ref.actor
    rc = CPURunConfig(
        student_path=student, teacher_path=teacher, train_file=train, val_file=val, test_file=test,
        out_dir=str(cfg.trainer.default_local_dir), prompts_per_step=int(cfg.data.train_batch_size),
        n_samples=int(cfg.actor_rollout_ref.rollout.n), max_response_length=int(cfg.data.max_response_length),
        temperature=float(cfg.actor_rollout_ref.rollout.temperature),
        total_steps=int(cfg.trainer.total_training_steps), lr=float(actor.optim.lr),
        weight_decay=float(cfg.ta_opd.cpu.weight_decay), betas=tuple(cfg.ta_opd.cpu.betas),
        grad_clip=float(actor.grad_clip), test_freq=int(cfg.trainer.test_freq), save_freq=int(cfg.trainer.save_freq),
        resume_mode=str(cfg.trainer.resume_mode), seed=int(ta.seed), eval_size=int(cfg.ta_opd.cpu.eval_size),
        project=str(cfg.trainer.project_name), experiment=str(cfg.trainer.experiment_name),
        loggers=tuple(cfg.trainer.logger), ta=ta,
        rollout_dir=str(cfg.trainer.rollout_data_dir) if cfg.trainer.get("rollout_data_dir") else None,
        vocab_mismatch_ok_ids=tuple(cfg.ta_opd.get("vocab_mismatch_ok_ids") or ()))
    if rc.total_steps < 1:
        raise TAConfigError(f"trainer.total_training_steps={rc.total_steps} is not allowed; it must be >= 1")
    if rc.resume_mode not in ("auto", "disable"):
        raise TAConfigError(f"trainer.resume_mode={rc.resume_mode!r}: the CPU backend supports auto | disable")
    tracker = Tracking(project_name=rc.project, experiment_name=rc.experiment, default_backend=list(rc.loggers),
                       config=OmegaConf.to_container(cfg, resolve=True))
    summary = CPUTrainer(rc, tracker=tracker).fit()
    return summary


def run_verl(cfg: DictConfig, ta: TAConfig) -> dict:
    from recipe.ta_opd.verl_backend.runner import run_verl as launch
    from recipe.ta_opd.verl_backend.validate import plan

    student, teacher = cfg.actor_rollout_ref.model.path, cfg.ta_opd.teacher_model_path
    if student is None or teacher is None:
        raise TAConfigError("the verl backend needs actor_rollout_ref.model.path (student) and "
                            "ta_opd.teacher_model_path (teacher); the toy pair runs on ta_opd.backend=cpu")
    for files, key in ((cfg.data.train_files, "data.train_files"), (cfg.data.val_files, "data.val_files")):
        if files is None:
            raise TAConfigError(f"{key} is required on the verl backend (verl RL parquet files)")
    p = plan(cfg, ta, student_path=str(student), teacher_path=str(teacher))
    pool = "colocated with the trainer" if p.teacher_pool is None else f"pool {p.teacher_pool}"
    print(f"[ta-opd] verl backend: teacher {p.teacher_backend} ({pool}), loss {p.loss_mode}, "
          f"shared vocabulary {p.vocab_size}, K={ta.topk}, K'={ta.teacher_topk}, rho={ta.budget}, selector {ta.selector}")
    summary = {"backend": "verl", "loss_mode": p.loss_mode, "vocab_size": p.vocab_size, "teacher_pool": p.teacher_pool}
    if cfg.ta_opd.get("dry_run", False):
        print("[ta-opd] dry run: configuration valid; not starting Ray")
        return summary
    launch(cfg, p)
    return summary


def run(cfg: DictConfig) -> dict:
    import json

    ta = ta_config(cfg.ta_opd)
    backend, why = choose_backend(str(cfg.ta_opd.backend))
    print(f"[ta-opd] backend: {backend} ({why})")
    if backend == "verl":
        return run_verl(cfg, ta)
    summary = run_cpu(cfg, ta)
    print("[ta-opd] summary: " + json.dumps(summary, indent=2))
    return summary


@hydra.main(config_path="config", config_name="ta_opd_trainer", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (TAConfigError, TAInputError, FileNotFoundError) as e:
        print(f"[ta-opd] error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
