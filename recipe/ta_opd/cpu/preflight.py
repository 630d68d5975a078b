"""Checks that run before the first step of a CPU run, so a mistake costs seconds, not a run.

Each failure raises ``TAConfigError`` / ``TAInputError`` naming the user-facing key, the value
and what is allowed; ``python -m recipe.ta_opd.main`` prints it as ``[ta-opd] error: ...`` and
exits with status 2. What is checked (docs/reliability.md has the full list): every knob of
:class:`CPURunConfig` (type and range), the output/cache/rollout folders (a probe file is
written and removed), model folders (config.json, tokenizer, safetensors headers against the
file sizes; after loading, every weight finite), and data files (readable parquet, verl's
columns, at least one row, chat-format prompts).
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Any, Mapping

from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError, TAInputError

# CPURunConfig field -> the Hydra key a user sets (messages name what the user typed)
KEYS = {
    "student_path": "actor_rollout_ref.model.path", "teacher_path": "ta_opd.teacher_model_path",
    "train_file": "data.train_files", "val_file": "data.val_files", "test_file": "toy test split",
    "out_dir": "trainer.default_local_dir", "prompts_per_step": "data.train_batch_size",
    "n_samples": "actor_rollout_ref.rollout.n", "max_response_length": "data.max_response_length",
    "temperature": "actor_rollout_ref.rollout.temperature", "total_steps": "trainer.total_training_steps",
    "lr": "actor_rollout_ref.actor.optim.lr", "weight_decay": "ta_opd.cpu.weight_decay",
    "betas": "ta_opd.cpu.betas", "grad_clip": "actor_rollout_ref.actor.grad_clip",
    "test_freq": "trainer.test_freq", "save_freq": "trainer.save_freq", "resume_mode": "trainer.resume_mode",
    "seed": "ta_opd.seed", "eval_size": "ta_opd.cpu.eval_size", "project": "trainer.project_name",
    "experiment": "trainer.experiment_name", "loggers": "trainer.logger", "rollout_dir": "trainer.rollout_data_dir",
    "vocab_mismatch_ok_ids": "ta_opd.vocab_mismatch_ok_ids", "max_ckpt_to_keep": "trainer.max_actor_ckpt_to_keep",
}
RESUME_MODES = ("auto", "disable")
SEED_MAX = 2**32 - 1  # numpy's global seed range (torch's is wider)


def key_of(name: str) -> str:
    return KEYS.get(name, name)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _bad(name: str, value: Any, allowed: str) -> TAConfigError:
    return TAConfigError(f"{key_of(name)}={value!r} is not allowed; {allowed}")


def _loggers() -> list[str]:
    from verl.utils.tracking import Tracking

    return list(Tracking.supported_backend)


# name -> (predicate, what is allowed); applied to whichever of these keys are present
_RULES = {
    "prompts_per_step": (lambda v: _int(v) and v >= 1, "it must be an integer >= 1 (prompts per step)"),
    "n_samples": (lambda v: _int(v) and v >= 1, "it must be an integer >= 1 (samples per prompt)"),
    "max_response_length": (lambda v: _int(v) and v >= 1, "it must be an integer >= 1 (tokens)"),
    "temperature": (lambda v: _real(v) and v > 0, "it must be a finite number > 0 (on-policy training scores its "
                    "rollouts at this temperature; greedy rollouts would give G identical samples and no distribution)"),
    "total_steps": (lambda v: _int(v) and v >= 1, "it must be an integer >= 1"),
    "lr": (lambda v: _real(v) and v > 0, "the learning rate must be a finite number > 0"),
    "weight_decay": (lambda v: _real(v) and v >= 0, "it must be a finite number >= 0"),
    "betas": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_real(b) and 0 <= b < 1 for b in v),
              "AdamW betas must be a list of two numbers in [0, 1), e.g. [0.9, 0.98]"),
    "grad_clip": (lambda v: _real(v) and v > 0, "the gradient-norm clip must be a finite number > 0 "
                  "(a negative clip flips the gradient's sign: gradient ascent)"),
    "test_freq": (_int, "it must be an integer (<= 0: evaluate only before and after training)"),
    "save_freq": (_int, "it must be an integer (<= 0: checkpoint only at the end)"),
    "resume_mode": (lambda v: v in RESUME_MODES, f"the CPU backend supports {' | '.join(RESUME_MODES)}"),
    "seed": (lambda v: _int(v) and 0 <= v <= SEED_MAX, f"the seed must be an integer in [0, {SEED_MAX}]"),
    "eval_size": (lambda v: _int(v) and v >= 1, "it must be an integer >= 1 (held-out problems per evaluation)"),
    "project": (lambda v: isinstance(v, str) and v != "", "it must be a non-empty string"),
    "experiment": (lambda v: isinstance(v, str) and v != "", "it must be a non-empty string"),
    "rollout_dir": (lambda v: v is None or (isinstance(v, str) and v != ""), "it must be a folder path or null"),
    "vocab_mismatch_ok_ids": (lambda v: isinstance(v, (tuple, list)) and all(_int(i) and i >= 0 for i in v),
                              "it must be a list of token ids (integers >= 0)"),
    "max_ckpt_to_keep": (lambda v: v is None or (_int(v) and v >= 1),
                         "it must be null (keep every checkpoint) or an integer >= 1"),
}


def check_values(values: Mapping[str, Any]) -> None:
    """Type/range checks of the CPURunConfig fields present in ``values``."""
    for name, (ok, allowed) in _RULES.items():
        if name in values and not ok(values[name]):
            raise _bad(name, values[name], allowed)
    if "loggers" in values:
        loggers = values["loggers"]
        if not isinstance(loggers, (tuple, list)) or not all(isinstance(x, str) for x in loggers):
            raise _bad("loggers", loggers, "it must be a list of logger names")
        known = _loggers() if loggers else []
        for x in loggers:
            if x not in known:
                raise _bad("loggers", list(loggers), f"logger {x!r} is unknown; choose from: {', '.join(known)}")
    if "ta" in values and not isinstance(values["ta"], TAConfig):
        raise TAConfigError(f"ta must be a TAConfig, got {type(values['ta']).__name__}")
    for name in ("student_path", "teacher_path", "train_file", "val_file", "out_dir"):
        if name in values and not (isinstance(values[name], str) and values[name]):
            raise _bad(name, values[name], "it must be a path")


def check_run_config(cfg) -> None:
    """CPURunConfig.__post_init__: every field in range."""
    from dataclasses import fields

    check_values({f.name: getattr(cfg, f.name) for f in fields(cfg)})


# --- folders -----------------------------------------------------------------------------------
def check_writable(path: str | Path, key: str) -> Path:
    """Create ``path`` if needed and prove it writable with a probe file (removed again)."""
    p = Path(path).expanduser()
    probe = p / f".ta_opd_probe_{uuid.uuid4().hex}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise TAInputError(f"{key}={path} is not a writable folder ({type(e).__name__}: {e.strerror or e}); "
                           "choose a folder you can write") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return p


# --- data ---------------------------------------------------------------------------------------
REQUIRED_COLUMNS = ("prompt", "data_source", "reward_model")


def check_parquet(path: str | Path, key: str) -> int:
    """A readable parquet in verl's layout with chat-format prompts and ground truths. Returns rows."""
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    if not p.exists():
        raise TAInputError(f"{key}={path} does not exist")
    if not p.is_file():
        raise TAInputError(f"{key}={path} is not a file (expected one parquet file)")
    try:
        table = pq.read_table(p, columns=None)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants for non-parquet bytes
        raise TAInputError(f"{key}={path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise TAInputError(f"{key}={path} lacks column(s) {missing}; verl's layout needs {list(REQUIRED_COLUMNS)} "
                           f"(found {table.column_names})")
    if table.num_rows == 0:
        raise TAInputError(f"{key}={path} has no rows")
    prompts = table.column("prompt").to_pylist()
    rewards = table.column("reward_model").to_pylist()
    for i, (msgs, rm) in enumerate(zip(prompts, rewards)):
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise TAInputError(f"{key}={path}: row {i} has prompt {str(msgs)[:80]!r}; a prompt must be a non-empty "
                               "list of chat messages {role: str, content: str}")
        if not (isinstance(rm, dict) and rm.get("ground_truth") is not None):
            raise TAInputError(f"{key}={path}: row {i} has reward_model {str(rm)[:80]!r}; it needs a ground_truth")
    return table.num_rows


# --- models -------------------------------------------------------------------------------------
def _check_safetensors(f: Path, key: str) -> None:
    """The header of a safetensors file must parse and its tensors must fit the file's size."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise TAInputError(f"{key}: {f} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    if 8 + n + end != size:
        raise TAInputError(f"{key}: {f} is truncated or corrupt: its header describes {8 + n + end} bytes, "
                           f"the file has {size}")


def check_model_folder(path: str | Path, key: str) -> None:
    """A Hugging Face model folder: config.json that parses, a tokenizer, intact weight files."""
    from transformers import AutoConfig, AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise TAInputError(f"{key}={path} does not exist")
    if not p.is_dir():
        raise TAInputError(f"{key}={path} is not a folder (expected a Hugging Face model folder)")
    if not (p / "config.json").is_file():
        raise TAInputError(f"{key}={path} is not a Hugging Face model folder: it has no config.json "
                           "(expected config.json, weights and tokenizer files)")
    try:
        AutoConfig.from_pretrained(p)
    except Exception as e:  # JSON errors, unknown model_type, bad values: all a broken config.json
        raise TAInputError(f"{key}={path}: config.json cannot be loaded ({type(e).__name__}: {e})") from None
    weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
    if not weights:
        raise TAInputError(f"{key}={path} has no weight files (*.safetensors or *.bin)")
    for f in p.glob("*.safetensors"):
        _check_safetensors(f, key)
    try:
        AutoTokenizer.from_pretrained(p)
    except Exception as e:  # missing/garbled tokenizer files
        raise TAInputError(f"{key}={path}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


def check_finite_weights(model, key: str) -> None:
    """Every parameter and buffer finite (a NaN weight makes sampling fail mid-run)."""
    import torch

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                raise TAInputError(f"{key}: weight {name} holds {int(bad.sum())} non-finite value(s) "
                                   f"(first: {t[bad].flatten()[0].item()}); the model is corrupt")


# --- the Hydra config of a CPU run, before anything is converted or loaded -----------------------
_EXTRA_INTS = {  # recipe keys outside CPURunConfig: key -> (allow null, minimum)
    "ta_opd.cpu.num_threads": (True, 1), "ta_opd.cpu.heldout_kl_prompts": (False, 1),
    "ta_opd.cpu.eval_batch_size": (False, 1),
}


def _raw(cfg, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, key, default=default)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def check_cli(cfg) -> None:
    """Types and ranges of every CPU-run knob as the user typed it (so no int("abc") traceback
    and no 54 s wait for ``rollout.n=0``), the toy spec, and the one-file data keys."""
    names = ("prompts_per_step", "n_samples", "max_response_length", "temperature", "total_steps", "lr",
             "weight_decay", "betas", "grad_clip", "test_freq", "save_freq", "resume_mode", "seed", "eval_size",
             "project", "experiment", "loggers", "vocab_mismatch_ok_ids", "max_ckpt_to_keep")
    values = {n: _raw(cfg, KEYS[n]) for n in names}
    if isinstance(values["loggers"], str):  # verl accepts one logger name as a string
        values["loggers"] = [values["loggers"]]
    values["vocab_mismatch_ok_ids"] = values["vocab_mismatch_ok_ids"] or []
    rollout_dir = _raw(cfg, KEYS["rollout_dir"])
    values["rollout_dir"] = rollout_dir if rollout_dir is None else str(rollout_dir)
    check_values(values)
    for key, (nullable, lo) in _EXTRA_INTS.items():
        v = _raw(cfg, key, default=lo)
        if not ((nullable and v is None) or (_int(v) and v >= lo)):
            raise TAConfigError(f"{key}={v!r} is not allowed; it must be an integer >= {lo}"
                                + (" or null" if nullable else ""))
    for key in ("data.train_files", "data.val_files"):
        v = _raw(cfg, key)
        if isinstance(v, list) and len(v) != 1:
            raise TAConfigError(f"{key}={v!r} is not allowed; the CPU backend reads exactly one parquet file")
        if v is not None and not isinstance(v, (str, list)):
            raise TAConfigError(f"{key}={v!r} is not allowed; give a parquet file path")
    for key in ("trainer.default_local_dir", "ta_opd.toy.cache_dir"):
        v = _raw(cfg, key)
        if v is not None and not isinstance(v, str):
            raise TAConfigError(f"{key}={v!r} is not allowed; give a folder path")
    if _raw(cfg, "actor_rollout_ref.model.path") is None and _raw(cfg, "ta_opd.teacher_model_path") is None:
        toy_spec(cfg)


def toy_spec(cfg):
    """``ta_opd.toy.spec`` as a ToySpec: unknown keys and wrongly typed values are errors."""
    from dataclasses import fields

    from ta_opd.tools.toy.build import ToySpec

    given = _raw(cfg, "ta_opd.toy.spec") or {}
    if not isinstance(given, dict):
        raise TAConfigError(f"ta_opd.toy.spec={given!r} is not allowed; it must be a mapping of ToySpec fields")
    types = {f.name: type(f.default) for f in fields(ToySpec)}
    for k, v in given.items():
        if k not in types:
            raise TAConfigError(f"ta_opd.toy.spec.{k} is unknown; valid keys: {', '.join(types)}")
        t = types[k]
        ok = _int(v) if t is int else (_real(v) if t is float else isinstance(v, t))
        if not ok:
            raise TAConfigError(f"ta_opd.toy.spec.{k}={v!r} is not allowed; it must be {'an' if t is int else 'a'} "
                                f"{t.__name__}")
        if (k.endswith("_share") or "slip" in k) and not 0.0 <= float(v) <= 1.0:
            raise TAConfigError(f"ta_opd.toy.spec.{k}={v!r} is not allowed; it is a probability in [0, 1]")
    return ToySpec(**given)


def check_toy_cache(cache_dir, spec) -> None:
    """Building the toy pair needs a writable cache; an already built pair only needs reading."""
    from ta_opd.tools.toy.build import DEFAULT_CACHE

    root = Path(cache_dir or DEFAULT_CACHE).expanduser()
    if not (root / spec.key() / "manifest.json").exists():
        check_writable(root, "ta_opd.toy.cache_dir" if cache_dir else f"the toy cache ($TA_OPD_CACHE or {DEFAULT_CACHE})")


def check_inputs(student: str, teacher: str, train: str, val: str, test: str | None) -> None:
    """Model folders and data files, before the models are loaded."""
    check_model_folder(student, "actor_rollout_ref.model.path")
    check_model_folder(teacher, "ta_opd.teacher_model_path")
    for path, key in ((train, "data.train_files"), (val, "data.val_files"), (test, "toy test split")):
        if path is not None:
            check_parquet(path, key)


def mapping(cfg, key: str) -> dict:
    """A mapping-valued key as a plain dict (null = {})."""
    v = _raw(cfg, key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise TAConfigError(f"{key}={v!r} is not allowed; it must be a mapping (e.g. {{enable_thinking: false}})")
    return v
