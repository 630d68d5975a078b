"""The verl backend's ``run(cfg, ta)`` (what ``ta_opd.backend=verl`` calls): the pair and data keys,
``validate.plan`` (every check, before Ray starts), absolute data paths, the plan printed; then
Ray (``runner.run_verl``) unless ``ta_opd.dry_run``."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError


def local_data_files(files, key: str):
    """Local data files must exist (checked now, not after Ray started) and are made absolute;
    remote URLs (``hdfs://``, ``s3://`` ...) are verl's to fetch."""
    many = not isinstance(files, str)
    out = []
    for f in (list(files) if many else [files]):
        f = str(f)
        if "://" not in f:
            path = Path(os.path.expanduser(f))
            if not path.exists():
                raise TAConfigError(f"{key}={f!r} does not exist (resolved against {Path.cwd()}); give a verl RL "
                                    "parquet file (python -m recipe.ta_opd.reproduce.data writes them)")
            f = str(path.resolve())
        out.append(f)
    return out if many else out[0]


def check_run_folders(cfg: DictConfig, ta: TAConfig) -> None:
    """The CPU backend's rules where they apply on verl: output and rollout folders that are (or
    contain) a model or data folder the run reads, a resume path that points nowhere, and
    min_keep_per_sequence above the response length."""
    from recipe.ta_opd.cpu.preflight import check_min_keep, check_not_an_input

    models = {"actor_rollout_ref.model.path": cfg.actor_rollout_ref.model.path,
              "ta_opd.teacher_model_path": cfg.ta_opd.teacher_model_path}
    data = {}
    for key in ("data.train_files", "data.val_files"):
        files = OmegaConf.select(cfg, key)
        for i, f in enumerate([files] if isinstance(files, str) else list(files or [])):
            data[key if i == 0 else f"{key}[{i}]"] = str(f)
    for key in ("trainer.default_local_dir", "trainer.rollout_data_dir"):
        if OmegaConf.select(cfg, key):
            check_not_an_input(str(OmegaConf.select(cfg, key)), key, models, data, cache=None)
    resume = cfg.trainer.get("resume_from_path")
    if resume and not Path(os.path.expanduser(str(resume))).exists():
        raise TAConfigError(f"trainer.resume_from_path={resume} does not exist; give a global_step_<n> folder, or "
                            "null to resume the newest checkpoint of trainer.default_local_dir")
    if resume and cfg.trainer.get("resume_mode") == "auto":
        print(f"[ta-opd] warning: trainer.resume_from_path={resume} is ignored with trainer.resume_mode=auto (verl "
              "then resumes the newest checkpoint of trainer.default_local_dir); set trainer.resume_mode=resume_path "
              "to resume from it")
    length = cfg.data.get("max_response_length")
    if isinstance(length, int):
        check_min_keep(ta, length)


def run(cfg: DictConfig, ta: TAConfig) -> dict:
    from recipe.ta_opd.verl_backend.identity import check_and_claim
    from recipe.ta_opd.verl_backend.validate import plan

    student, teacher = cfg.actor_rollout_ref.model.path, cfg.ta_opd.teacher_model_path
    if student is None or teacher is None:
        raise TAConfigError("the verl backend needs actor_rollout_ref.model.path (student) and "
                            "ta_opd.teacher_model_path (teacher); the toy pair runs on ta_opd.backend=cpu")
    for files, key in ((cfg.data.train_files, "data.train_files"), (cfg.data.val_files, "data.val_files")):
        if files is None:
            raise TAConfigError(f"{key} is required on the verl backend (verl RL parquet files)")
    p = plan(cfg, ta, student_path=str(student), teacher_path=str(teacher))
    with open_dict(cfg):  # Ray's workers read the files from their own working directory: absolute paths
        cfg.data.train_files = local_data_files(cfg.data.train_files, "data.train_files")
        cfg.data.val_files = local_data_files(cfg.data.val_files, "data.val_files")
    pool = "colocated with the trainer" if p.teacher_pool is None else f"pool {p.teacher_pool}"
    nodes, gpus = p.pools.total
    print(f"[ta-opd] verl backend: allocation {nodes} x {gpus} GPUs (trainer.nnodes x n_gpus_per_node) -> trainer "
          f"pool {p.pools.trainer}, teacher {p.teacher_backend} ({pool}), loss {p.loss_mode}, "
          f"shared vocabulary {p.vocab_size}, K={ta.topk}, K'={ta.teacher_topk}, rho={ta.budget}, selector {ta.selector}")
    summary = {"backend": "verl", "loss_mode": p.loss_mode, "vocab_size": p.vocab_size, "teacher_pool": p.teacher_pool,
               "trainer_pool": p.pools.trainer}
    check_run_folders(cfg, ta)
    # run identity + run lock of trainer.default_local_dir, before Ray (the dry run checks, never writes)
    check_and_claim(cfg, dry_run=bool(cfg.ta_opd.get("dry_run", False)))
    rollouts = cfg.trainer.get("rollout_data_dir")
    if rollouts:  # two runs must not overwrite each other's rollout files: the rollout folder is locked too
        from recipe.ta_opd import runlock

        if cfg.ta_opd.get("dry_run", False):
            runlock.check_free(rollouts, key="trainer.rollout_data_dir")
        else:
            runlock.acquire(rollouts, key="trainer.rollout_data_dir")
    if cfg.ta_opd.get("dry_run", False):
        print("[ta-opd] dry run: configuration valid; not starting Ray")
        return summary
    from recipe.ta_opd.verl_backend.runner import run_verl  # Ray and verl's trainer: only for a real run

    run_verl(cfg, p)
    return summary
