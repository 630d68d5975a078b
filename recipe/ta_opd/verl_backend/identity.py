"""A verl run resumes only itself: run identity and run lock of ``trainer.default_local_dir``.

verl's ``trainer.resume_mode=auto`` loads the newest ``global_step_N`` of the folder and checks
nothing about the configuration, and the teacher is never checkpointed. :func:`check_and_claim`
runs on the driver before Ray starts (the dry run included):

1. this run's identity: the whole resolved configuration except :data:`SAFE_TO_CHANGE` (how
   long, how often, where to write and log), with every model and data input (student, teacher,
   data files, reward code: keys ending in ``path``/``_path``/``train_files``/``val_files``)
   replaced by a content fingerprint; a hub id (no local folder) is identified by its id and the
   revision the local hub cache resolves it to (the driver's tokenizer load fills the cache), or by
   the id alone when it is not cached, and the log says so;
2. every ``global_step_N`` of the folder (and ``trainer.resume_from_path``) must carry the same
   identity (``ta_opd_identity.json`` inside it); one without an identity or with a different one is
   refused (exit 2) naming each difference, offering first a way out that overwrites nothing;
3. unless a dry run: the folder's run lock (``recipe/ta_opd/runlock.py``, held until the driver
   exits) and the identity written to ``<folder>/ta_opd_identity.json``. The trainer copies that
   file into each checkpoint it saves (``TAOPDRayTrainer._save_checkpoint``), so a checkpoint
   carries its identity wherever it is copied.

The folder must be on a file system the driver sees (on a multi-node run a shared one: verl's FSDP
ranks write their checkpoint shards there too).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from recipe.ta_opd import runlock
from recipe.ta_opd.run_identity import differences, source
from ta_opd.errors import TAConfigError

IDENTITY_FILE = "ta_opd_identity.json"
SCHEMA = "ta_opd.verl_run_identity/v1"
# keys (and key prefixes) that may change between a checkpoint and its resumption
SAFE_TO_CHANGE = (
    "trainer.total_training_steps", "trainer.total_epochs", "trainer.save_freq", "trainer.test_freq",
    "trainer.logger", "trainer.project_name", "trainer.experiment_name", "trainer.default_local_dir",
    "trainer.default_hdfs_dir", "trainer.resume_mode", "trainer.resume_from_path", "trainer.max_actor_ckpt_to_keep",
    "trainer.max_critic_ckpt_to_keep", "trainer.val_before_train", "trainer.val_only", "trainer.log_val_generations",
    "trainer.rollout_data_dir", "trainer.validation_data_dir", "trainer.del_local_ckpt_after_load",
    "trainer.ray_wait_register_center_timeout", "trainer.profile", "trainer.npu_profile", "trainer.esi_redundant_time",
    "ray_kwargs", "global_profiler",
    # how the same computation is split into micro-batches and memory (after an out-of-memory crash a
    # resume with smaller micro-batches is the usual fix): not the trajectory
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "actor_rollout_ref.actor.ppo_micro_batch_size",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size", "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
    "actor_rollout_ref.rollout.gpu_memory_utilization", "ta_opd.teacher.micro_batch_size", "ta_opd.teacher.chunk_size",
    "ta_opd.teacher.layout", "ta_opd.teacher.max_tokens_per_micro_batch",
    "ta_opd.teacher.timeout_s", "ta_opd.chunk_bytes", "ta_opd.chunk_size", "ta_opd.dry_run", "ta_opd.wandb_histogram", "ta_opd.token_export", "ta_opd.wandb_group", "ta_opd.cpu",
    "ta_opd.toy")
INPUT_NAMES = ("path", "train_files", "val_files")  # last key component of an input (also any "*_path")
_claimed: set[str] = set()  # folders this process has checked and locked


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") or key.startswith(s + "_") for s in SAFE_TO_CHANGE) or \
        "profiler" in key.split(".")


def _is_input(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in INPUT_NAMES or last.endswith("_path")


def _flatten(node: Any, prefix: str, out: dict) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = node


def _masked(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose safe-to-change leaves hold one placeholder, so a key that merely
    interpolates one of them (verl copies ``trainer.experiment_name`` into
    ``actor_rollout_ref.rollout.trace.experiment_name``) resolves alike on both launches."""
    masked = copy.deepcopy(cfg)
    raw: dict[str, Any] = {}
    _flatten(OmegaConf.to_container(masked, resolve=False), "", raw)
    with open_dict(masked):
        for key in raw:
            if _safe(key):
                OmegaConf.update(masked, key, "<safe to change>", merge=False)
    return masked


def identity_of(cfg: DictConfig) -> dict:
    """The identity of a run: {dotted config key: JSON value}, inputs as fingerprints."""
    flat: dict[str, Any] = {}
    _flatten(OmegaConf.to_container(_masked(cfg), resolve=True), "", flat)
    seen: dict[str, dict] = {}  # one fingerprint per input (the student path appears under several keys)
    out = {}
    for key, value in sorted(flat.items()):
        if _safe(key):
            continue
        if _is_input(key) and isinstance(value, str) and value:
            value = seen[value] if value in seen else seen.setdefault(value, source(value))
        elif _is_input(key) and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = [seen[v] if v in seen else seen.setdefault(v, source(v)) for v in value]
        out[key] = value
    return out


def _by_name(identity: dict) -> list[str]:
    """Inputs identified by name only (no local content to fingerprint), as log lines."""
    found = []
    for key, v in identity.items():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, dict) and item.get("exact") is False:
                found.append(f"{key}={item['path']} is not a local folder: identified by its name and cached hub "
                             f"revision ({item['fingerprint']}), not by content")
    return found


def _tag(identity: dict) -> str:
    """6 hex digits of the identity: a folder name suffix that is the same for the same run."""
    slim = {k: (v["fingerprint"] if isinstance(v, dict) and "fingerprint" in v else v) for k, v in identity.items()}
    return hashlib.sha256(json.dumps(slim, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _checkpoints(folder: Path, cfg: DictConfig) -> list[Path]:
    """Every verl checkpoint this launch could resume or overwrite, newest first."""
    found = [p for p in folder.glob("global_step_*") if p.is_dir() and p.name[len("global_step_"):].isdigit()]
    found.sort(key=lambda p: int(p.name[len("global_step_"):]), reverse=True)
    if cfg.trainer.get("resume_mode") == "resume_path" and cfg.trainer.get("resume_from_path"):
        chosen = Path(os.path.expanduser(str(cfg.trainer.resume_from_path))).resolve()
        if chosen not in found:
            found.insert(0, chosen)
    return found


def _refusal(folder: Path, ckpt: Path, problem: str, cfg: DictConfig, now: dict) -> TAConfigError:
    name = str(cfg.trainer.experiment_name)
    if name and name in str(cfg.trainer.default_local_dir):
        new = f"trainer.experiment_name={name}_{_tag(now)}"
    else:
        new = f"trainer.default_local_dir={folder}_{_tag(now)}"
    return TAConfigError(
        f"trainer.default_local_dir={folder} holds checkpoint {ckpt.name} {problem}; verl would resume it (or "
        f"overwrite it) and mix two runs. To start this run without touching it, give this run its own folder: {new} "
        f"(nothing is overwritten). To continue the checkpointed run, launch it with its own settings. Only to "
        f"discard that run: delete {folder} (this DELETES its checkpoints) and launch again")


def check(cfg: DictConfig, now: dict) -> list[Path]:
    """Refuse a folder holding a checkpoint without this run's identity (TAConfigError: exit 2).
    Returns the checkpoints checked (this run's), newest first."""
    folder = Path(str(cfg.trainer.default_local_dir))
    found = _checkpoints(folder, cfg)
    for ckpt in found:
        path = ckpt / IDENTITY_FILE
        try:
            saved = json.loads(path.read_text()).get("identity") if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            saved = None
        if not isinstance(saved, dict):
            raise _refusal(folder, ckpt, f"with no readable TA-OPD run identity ({IDENTITY_FILE}: written by verl "
                           "directly or by an older version of this recipe), so nothing says which run it belongs to",
                           cfg, now)
        diff = differences(saved, now)
        if diff:
            raise _refusal(folder, ckpt, f"of a different run. Differences: {'; '.join(diff)}", cfg, now)
    return found


def _state(found: list[Path]) -> str:
    return f"{len(found)} checkpoint(s) of this run, newest {found[0].name}" if found else "no checkpoint yet"


def _write(folder: Path, now: dict) -> None:
    tmp = folder / f".{IDENTITY_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump({"schema": SCHEMA, "identity": now, "safe_to_change": list(SAFE_TO_CHANGE)}, f, indent=1,
                  default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / IDENTITY_FILE)


def check_and_claim(cfg: DictConfig, dry_run: bool = False, log=print) -> dict:
    """Make ``trainer.default_local_dir`` absolute (verl resolves it against its own working
    directory), check that no checkpoint in it belongs to another run, and (unless ``dry_run``)
    take its run lock and write the identity. Returns the identity. Idempotent per process."""
    with open_dict(cfg):  # verl resolves both against the runner's working directory: check what it will load
        cfg.trainer.default_local_dir = str(Path(os.path.expanduser(str(cfg.trainer.default_local_dir))).resolve())
        if cfg.trainer.get("resume_from_path"):
            cfg.trainer.resume_from_path = str(Path(os.path.expanduser(str(cfg.trainer.resume_from_path))).resolve())
    folder = Path(cfg.trainer.default_local_dir)
    now = identity_of(cfg)
    for line in _by_name(now):
        log(f"[ta-opd] run identity: {line}")
    if dry_run:
        runlock.check_free(folder)
        found = check(cfg, now)
        log(f"[ta-opd] run identity: {folder} holds {_state(found)} (dry run: nothing written or locked)")
        return now
    if str(folder) in _claimed:
        return now
    runlock.acquire(folder, log)  # first: no second launch can write between our check and our claim
    found = check(cfg, now)
    _write(folder, now)
    _claimed.add(str(folder))
    log(f"[ta-opd] run identity: {len(now)} keys (tag {_tag(now)}) in {folder / IDENTITY_FILE}; {_state(found)}; "
        "run lock held")
    return now


def stamp_checkpoint(folder: str, step: int) -> None:
    """Copy the folder's identity into ``global_step_<step>`` (the trainer calls it before verl saves)."""
    src = Path(folder) / IDENTITY_FILE
    if not src.is_file():
        print(f"[ta-opd] warning: {src} is missing; checkpoint global_step_{step} will not be resumable "
              "(launch through python -m recipe.ta_opd.main, which writes it)")
        return
    dst = Path(folder) / f"global_step_{step}"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst / f".{IDENTITY_FILE}.tmp")
    os.replace(dst / f".{IDENTITY_FILE}.tmp", dst / IDENTITY_FILE)
