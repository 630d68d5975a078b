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
from omegaconf import DictConfig, OmegaConf, open_dict

from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError, TAInputError

from recipe.ta_opd.naming import run_name

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


def set_threads(requested) -> str:
    """torch CPU threads for the CPU backend: ``ta_opd.cpu.num_threads``, else $OMP_NUM_THREADS,
    else half the visible CPUs (on a shared 2-core machine torch's default of all cores measured
    5-9x slower than one thread). Returns the line to print."""
    import torch

    if requested is not None:
        n, why = int(requested), "ta_opd.cpu.num_threads"
        if n < 1:
            raise TAConfigError(f"ta_opd.cpu.num_threads={requested} is not allowed; it must be >= 1 (or null)")
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n, why = int(os.environ["OMP_NUM_THREADS"]), "$OMP_NUM_THREADS"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n, why = max(1, cpus // 2), f"half of the {cpus} visible CPUs; set ta_opd.cpu.num_threads to change"
    torch.set_num_threads(n)
    return f"[ta-opd] torch threads: {n} ({why})"


def _existing(path, key: str) -> str:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{key}={path} does not exist")
    return str(p)


def run_cpu(cfg: DictConfig, ta: TAConfig) -> dict:
    from verl.utils.tracking import Tracking

    from recipe.ta_opd.cpu import preflight, runlock
    from recipe.ta_opd.cpu.trainer import CPURunConfig, CPUTrainer
    from recipe.ta_opd.grading import Grader, resolve_score_fn

    preflight.check_cli(cfg)  # every knob's type and range, before anything is built or loaded
    out_dir = preflight.check_writable(cfg.trainer.default_local_dir, "trainer.default_local_dir")
    if cfg.trainer.get("rollout_data_dir"):
        preflight.check_writable(cfg.trainer.rollout_data_dir, "trainer.rollout_data_dir")
    runlock.acquire(out_dir)  # one run per folder; released by guarded() when the run ends
    print(set_threads(cfg.ta_opd.cpu.get("num_threads")))
    student, teacher = cfg.actor_rollout_ref.model.path, cfg.ta_opd.teacher_model_path
    pair_label = "the CPU toy" if student is None and teacher is None else None
    train, val, test = cfg.data.train_files, cfg.data.val_files, None
    if student is None and teacher is None:
        from ta_opd.tools.toy.build import load_or_build

        spec = preflight.toy_spec(cfg)
        preflight.check_toy_cache(cfg.ta_opd.toy.cache_dir, spec)
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
    preflight.check_inputs(student, teacher, train, val, test)  # model folders and data files, before loading
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
        vocab_mismatch_ok_ids=tuple(cfg.ta_opd.get("vocab_mismatch_ok_ids") or ()),
        max_ckpt_to_keep=cfg.trainer.get("max_actor_ckpt_to_keep"),
        pair=pair_label or f"{Path(student).name} (student) <- {Path(teacher).name} (teacher)",
        heldout_kl_prompts=int(cfg.ta_opd.cpu.get("heldout_kl_prompts", 64)),
        eval_batch_size=int(cfg.ta_opd.cpu.get("eval_batch_size", 256)),
        chat_template_kwargs=preflight.mapping(cfg, "data.apply_chat_template_kwargs"))
    for key in ("heldout_kl_prompts", "eval_batch_size"):
        if getattr(rc, key) < 1:
            raise TAConfigError(f"ta_opd.cpu.{key}={getattr(rc, key)} is not allowed; it must be >= 1")
    if rc.total_steps < 1:
        raise TAConfigError(f"trainer.total_training_steps={rc.total_steps} is not allowed; it must be >= 1")
    if rc.resume_mode not in ("auto", "disable"):
        raise TAConfigError(f"trainer.resume_mode={rc.resume_mode!r}: the CPU backend supports auto | disable")
    tracker = Tracking(project_name=rc.project, experiment_name=rc.experiment, default_backend=list(rc.loggers),
                       config=OmegaConf.to_container(cfg, resolve=True))
    score_fn, grading = resolve_score_fn(cfg.get("reward"))
    print(f"[ta-opd] grading: {grading}")
    summary = CPUTrainer(rc, tracker=tracker, grader=Grader(score_fn)).fit()
    return summary


def _local_data_files(files, key: str):
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
    with open_dict(cfg):  # Ray's workers read the files from their own working directory: absolute paths
        cfg.data.train_files = _local_data_files(cfg.data.train_files, "data.train_files")
        cfg.data.val_files = _local_data_files(cfg.data.val_files, "data.val_files")
    pool = "colocated with the trainer" if p.teacher_pool is None else f"pool {p.teacher_pool}"
    nodes, gpus = p.pools.total
    print(f"[ta-opd] verl backend: allocation {nodes} x {gpus} GPUs (trainer.nnodes x n_gpus_per_node) -> trainer "
          f"pool {p.pools.trainer}, teacher {p.teacher_backend} ({pool}), loss {p.loss_mode}, "
          f"shared vocabulary {p.vocab_size}, K={ta.topk}, K'={ta.teacher_topk}, rho={ta.budget}, selector {ta.selector}")
    summary = {"backend": "verl", "loss_mode": p.loss_mode, "vocab_size": p.vocab_size, "teacher_pool": p.teacher_pool,
               "trainer_pool": p.pools.trainer}
    if cfg.ta_opd.get("dry_run", False):
        print("[ta-opd] dry run: configuration valid; not starting Ray")
        return summary
    launch(cfg, p)
    return summary


def run(cfg: DictConfig) -> dict:
    import json

    ta = ta_config(cfg.ta_opd)
    if cfg.trainer.get("experiment_name") is None:
        with open_dict(cfg):
            cfg.trainer.experiment_name = run_name(cfg, ta)
    backend, why = choose_backend(str(cfg.ta_opd.backend))
    print(f"[ta-opd] backend: {backend} ({why})")
    if backend == "verl":
        return run_verl(cfg, ta)
    summary = run_cpu(cfg, ta)
    print("[ta-opd] summary: " + json.dumps(summary, indent=2))
    return summary


def guarded(cfg: DictConfig) -> int:
    """Run; a user mistake (bad value, missing or broken file, busy folder, full disk) prints
    ``[ta-opd] error: ...`` and returns 2. Anything else propagates: a traceback is a bug."""
    from omegaconf.errors import OmegaConfBaseException

    from recipe.ta_opd.cpu.checkpoint import CheckpointError
    from recipe.ta_opd.cpu.runlock import release_all

    try:
        run(cfg)
        return 0
    except (TAConfigError, TAInputError, FileNotFoundError, CheckpointError) as e:
        print(f"[ta-opd] error: {e}", file=sys.stderr)
        return 2
    except OmegaConfBaseException as e:  # e.g. an interpolation to a missing key
        print(f"[ta-opd] error: configuration: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        release_all()


@hydra.main(config_path="config", config_name="ta_opd_trainer", version_base=None)
def main(cfg: DictConfig) -> None:
    status = guarded(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
