"""The CPU backend's front door: the Hydra config -> a checked :class:`CPURunConfig` (the twin of
``verl_backend/validate.plan``).

Every knob is ONE row of :data:`KNOBS`: the CPURunConfig field, the Hydra key the user sets
(errors name it) and its rule. :func:`plan` reads and checks each row once, proves the output
folders writable, resolves the pair (no model paths: the toy pair, built once and cached) and
checks the model folders and data files, then the sizes (``_sizes``: min_keep against the
response length, a step's memory against the machine's) and that no output folder is one the run
reads, all before a model is loaded. Every failure raises
``TAConfigError`` / ``TAInputError`` as ``<key>=<value> is not allowed; <what is allowed>``
(``python -m recipe.ta_opd.main`` prints it as ``[ta-opd] error: ...`` and exits 2).

A new CPU knob: a field of CPURunConfig (``cpu/trainer.py``) and a row here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import DictConfig, OmegaConf

from recipe.ta_opd.cpu import preflight
from ta_opd._checks import is_int, is_real
from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError

if TYPE_CHECKING:
    from recipe.ta_opd.cpu.trainer import CPURunConfig

Rule = Callable[[Any], "str | None"]  # the value as typed -> None if allowed, else what is allowed
RESUME_MODES = ("auto", "disable")
SEED_MAX = 2**32 - 1  # numpy's global seed range (torch's is wider)


def need(ok: Callable[[Any], bool], allowed: str) -> Rule:
    return lambda v: None if ok(v) else allowed


def at_least(lo: int, why: str = "") -> Rule:
    return need(lambda v: is_int(v) and v >= lo, f"it must be an integer >= {lo}{why}")


def _loggers(v: Any) -> str | None:
    names = [v] if isinstance(v, str) else v  # verl accepts one logger name as a string
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        return "it must be a list of logger names"
    from verl.utils.tracking import Tracking

    unknown = [x for x in names if x not in Tracking.supported_backend]
    if unknown:
        return f"logger {unknown[0]!r} is unknown; choose from: {', '.join(Tracking.supported_backend)}"
    return None


def _one_file(v: Any) -> str | None:
    files = [v] if isinstance(v, str) else v
    if v is None or (isinstance(files, list) and len(files) == 1 and isinstance(files[0], str)):
        return None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return "the CPU backend reads exactly one parquet file"
    return "give a parquet file path"


_text = need(lambda v: isinstance(v, str) and v != "", "it must be a non-empty string")
_folder_or_null = need(lambda v: v is None or isinstance(v, str), "give a folder path")
_model = need(lambda v: v is None or (isinstance(v, str) and v != ""),
              "give a Hugging Face model folder (or null for both models: the toy pair)")
_flag = need(lambda v: isinstance(v, bool), "it must be true or false")
_mapping = need(lambda v: v is None or isinstance(v, dict), "it must be a mapping (e.g. {enable_thinking: false})")


@dataclass(frozen=True)
class Knob:
    field: str  # CPURunConfig field (num_threads, cache_dir, resume_from_path: the plan's own)
    key: str  # the Hydra key a user sets; errors name it
    rule: Rule
    read: Callable[[Any], Any] = lambda v: v  # the checked value as the trainer takes it
    default: Any = None  # when the key is absent from the config


KNOBS: tuple[Knob, ...] = (
    Knob("prompts_per_step", "data.train_batch_size", at_least(1, " (prompts per step)")),
    Knob("n_samples", "actor_rollout_ref.rollout.n", at_least(1, " (samples per prompt)")),
    Knob("max_response_length", "data.max_response_length", at_least(1, " (tokens)")),
    Knob("temperature", "actor_rollout_ref.rollout.temperature", need(
        lambda v: is_real(v) and v > 0, "it must be a finite number > 0 (on-policy training scores its rollouts at "
        "this temperature; greedy rollouts would give G identical samples and no distribution)"), float),
    Knob("total_steps", "trainer.total_training_steps", at_least(1)),
    Knob("lr", "actor_rollout_ref.actor.optim.lr",
         need(lambda v: is_real(v) and v > 0, "the learning rate must be a finite number > 0"), float),
    Knob("weight_decay", "ta_opd.cpu.weight_decay",
         need(lambda v: is_real(v) and v >= 0, "it must be a finite number >= 0"), float),
    Knob("betas", "ta_opd.cpu.betas", need(
        lambda v: isinstance(v, list) and len(v) == 2 and all(is_real(b) and 0 <= b < 1 for b in v),
        "AdamW betas must be a list of two numbers in [0, 1), e.g. [0.9, 0.98]"), lambda v: tuple(map(float, v))),
    Knob("grad_clip", "actor_rollout_ref.actor.grad_clip", need(
        lambda v: is_real(v) and v > 0, "the gradient-norm clip must be a finite number > 0 "
        "(a negative clip flips the gradient's sign: gradient ascent)"), float),
    Knob("test_freq", "trainer.test_freq",
         need(is_int, "it must be an integer (<= 0: evaluate only before and after training)")),
    Knob("save_freq", "trainer.save_freq", need(is_int, "it must be an integer (<= 0: checkpoint only at the end)")),
    Knob("resume_mode", "trainer.resume_mode",
         need(lambda v: v in RESUME_MODES, f"the CPU backend supports {' | '.join(RESUME_MODES)}")),
    Knob("seed", "ta_opd.seed",
         need(lambda v: is_int(v) and 0 <= v <= SEED_MAX, f"the seed must be an integer in [0, {SEED_MAX}]")),
    Knob("eval_size", "ta_opd.cpu.eval_size", at_least(1, " (held-out problems per evaluation)")),
    Knob("project", "trainer.project_name", _text),
    Knob("experiment", "trainer.experiment_name", _text),
    Knob("loggers", "trainer.logger", _loggers, lambda v: (v,) if isinstance(v, str) else tuple(v)),
    Knob("rollout_dir", "trainer.rollout_data_dir",
         need(lambda v: v is None or str(v) != "", "it must be a folder path or null"),
         lambda v: None if v is None else str(v)),
    Knob("vocab_mismatch_ok_ids", "ta_opd.vocab_mismatch_ok_ids", need(
        lambda v: v is None or (isinstance(v, list) and all(is_int(i) and i >= 0 for i in v)),
        "it must be a list of token ids (integers >= 0)"), lambda v: tuple(v or ())),
    Knob("max_ckpt_to_keep", "trainer.max_actor_ckpt_to_keep",
         need(lambda v: v is None or (is_int(v) and v >= 1), "it must be null (keep every checkpoint) or an integer >= 1")),
    Knob("heldout_kl_prompts", "ta_opd.cpu.heldout_kl_prompts", at_least(1), default=64),
    Knob("eval_batch_size", "ta_opd.cpu.eval_batch_size", at_least(1), default=256),
    Knob("chat_template_kwargs", "data.apply_chat_template_kwargs", _mapping, lambda v: dict(v or {})),
    Knob("token_export", "ta_opd.token_export", _flag, default=False),
    Knob("wandb_histogram", "ta_opd.wandb_histogram", _flag, default=True),
    Knob("gradient_checkpointing", "actor_rollout_ref.model.enable_gradient_checkpointing", _flag, default=False),
    Knob("num_threads", "ta_opd.cpu.num_threads", need(
        lambda v: v is None or (is_int(v) and 1 <= v <= preflight.visible_cpus()),
        f"it must be null or an integer in [1, {preflight.visible_cpus()}] (the CPUs visible to this process)")),
    Knob("resume_from_path", "trainer.resume_from_path", need(
        lambda v: v is None, "the CPU backend resumes only the newest checkpoint of trainer.default_local_dir "
        "(trainer.resume_mode=auto): set trainer.default_local_dir to that run's folder instead")),
    Knob("out_dir", "trainer.default_local_dir", need(lambda v: isinstance(v, str) and v != "", "give a folder path")),
    Knob("cache_dir", "ta_opd.toy.cache_dir", _folder_or_null),
    # the pair: both model paths, or neither for the toy pair (resolved by _pair)
    Knob("student_path", "actor_rollout_ref.model.path", _model),
    Knob("teacher_path", "ta_opd.teacher_model_path", _model),
    Knob("train_file", "data.train_files", _one_file, lambda v: v[0] if isinstance(v, list) else v),
    Knob("val_file", "data.val_files", _one_file, lambda v: v[0] if isinstance(v, list) else v),
)
KEYS = {k.field: k.key for k in KNOBS} | {"test_file": "toy test split"}


def key_of(name: str) -> str:
    """The Hydra key of a CPURunConfig field (messages and run identities name what the user typed)."""
    return KEYS.get(name, name)


@dataclass(frozen=True)
class CPUPlan:
    run: CPURunConfig
    num_threads: int | None  # ta_opd.cpu.num_threads (None: $OMP_NUM_THREADS, else half the visible CPUs)


def _raw(cfg: DictConfig, key: str, default: Any = None) -> Any:
    v = OmegaConf.select(cfg, key, default=default)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def read(cfg: DictConfig) -> dict[str, Any]:
    """Every knob's value as typed, checked once ({field: value as the trainer takes it})."""
    values = {}
    for knob in KNOBS:
        value = _raw(cfg, knob.key, knob.default)
        allowed = knob.rule(value)
        if allowed is not None:
            raise TAConfigError(f"{knob.key}={value!r} is not allowed; {allowed}")
        values[knob.field] = knob.read(value)
    return values


def toy_spec(cfg: DictConfig):
    """``ta_opd.toy.spec`` as a ToySpec: unknown keys and wrongly typed values are errors."""
    from ta_opd.tools.toy.build import ToySpec

    given = _raw(cfg, "ta_opd.toy.spec") or {}
    if not isinstance(given, dict):
        raise TAConfigError(f"ta_opd.toy.spec={given!r} is not allowed; it must be a mapping of ToySpec fields")
    types = {f.name: type(f.default) for f in fields(ToySpec)}
    for k, v in given.items():
        if k not in types:
            raise TAConfigError(f"ta_opd.toy.spec.{k} is unknown; valid keys: {', '.join(types)}")
        t = types[k]
        ok = is_int(v) if t is int else (is_real(v) if t is float else isinstance(v, t))
        if not ok:
            raise TAConfigError(f"ta_opd.toy.spec.{k}={v!r} is not allowed; it must be {'an' if t is int else 'a'} "
                                f"{t.__name__}")
        if (k.endswith("_share") or "slip" in k) and not 0.0 <= float(v) <= 1.0:
            raise TAConfigError(f"ta_opd.toy.spec.{k}={v!r} is not allowed; it is a probability in [0, 1]")
    return ToySpec(**given)


def _pair(cfg: DictConfig, v: dict[str, Any]) -> dict[str, Any]:
    """Model folders and data files of the run: the user's (both models and both data files), or
    the toy pair when neither model path is given (its own data unless data.* are given)."""
    student, teacher, train, val, test = v["student_path"], v["teacher_path"], v["train_file"], v["val_file"], None
    if student is None and teacher is None:
        from ta_opd.tools.toy.build import load_or_build

        spec = toy_spec(cfg)
        preflight.check_toy_cache(v["cache_dir"], spec)
        toy = load_or_build(v["cache_dir"], spec)
        student, teacher, label = str(toy.student), str(toy.teacher), "the CPU toy"
        train, test = train or str(toy.train_file), str(toy.test_file) if val is None else None
        val = val or str(toy.val_file)
        print(f"[ta-opd] model paths not given: toy pair (student {student}, teacher {teacher})")
    elif student is None or teacher is None:
        raise TAConfigError("give both actor_rollout_ref.model.path (student) and ta_opd.teacher_model_path "
                            "(teacher), or neither for the toy pair")
    else:
        label = None
    out = {"student_path": _path(student), "teacher_path": _path(teacher)}
    preflight.check_model_folder(out["student_path"], "actor_rollout_ref.model.path")  # before loading
    preflight.check_model_folder(out["teacher_path"], "ta_opd.teacher_model_path")
    if train is None or val is None:
        raise TAConfigError("data.train_files and data.val_files are required with your own models")
    out |= {"train_file": _path(train), "val_file": _path(val), "test_file": test}
    for f, key in (("train_file", "data.train_files"), ("val_file", "data.val_files"), ("test_file", "toy test split")):
        if out[f] is not None:
            preflight.check_parquet(out[f], key)
    pair = label or f"{Path(out['student_path']).name} (student) <- {Path(out['teacher_path']).name} (teacher)"
    return out | {"pair": pair}


def _sizes(v: dict[str, Any], ta: TAConfig) -> None:
    """Values that are legal alone but cannot be meant together, and a step that cannot fit in
    memory: refused (or warned) before a model is loaded."""
    L = v["max_response_length"]
    preflight.check_min_keep(ta, L)
    vocab = preflight.vocab_of(v["student_path"])
    if vocab is not None:
        S = v["prompts_per_step"] * v["n_samples"]
        need = preflight.step_bytes(S, L, vocab, preflight.weight_bytes(v["student_path"]),
                                    preflight.weight_bytes(v["teacher_path"]))
        preflight.check_memory(need, f"data.train_batch_size={v['prompts_per_step']} x actor_rollout_ref.rollout.n="
                               f"{v['n_samples']} = {S} sequences of data.max_response_length={L} tokens over "
                               f"{vocab} logits")


def _default_cache() -> str:
    from ta_opd.tools.toy.build import DEFAULT_CACHE

    return str(DEFAULT_CACHE)


def _path(p: str) -> str:
    return str(Path(os.path.expanduser(p)))


def plan(cfg: DictConfig, ta: TAConfig) -> CPUPlan:
    """Check every knob once, the output folders, the pair and its files; nothing is loaded."""
    from recipe.ta_opd.cpu.trainer import CPURunConfig

    v = read(cfg)
    out_dir = str(preflight.check_writable(v["out_dir"], "trainer.default_local_dir"))  # (its probe file is removed)
    if v["rollout_dir"]:
        preflight.check_writable(v["rollout_dir"], "trainer.rollout_data_dir")
    v |= _pair(cfg, v)
    _sizes(v, ta)
    cache = v["cache_dir"] or _default_cache() if v["pair"] == "the CPU toy" else None
    models = {"actor_rollout_ref.model.path": v["student_path"], "ta_opd.teacher_model_path": v["teacher_path"]}
    data = {"data.train_files": v["train_file"], "data.val_files": v["val_file"], "toy test split": v["test_file"]}
    for key in ("out_dir", "rollout_dir"):  # before the lock, a checkpoint or a rollout is written there
        if v[key]:
            preflight.check_not_an_input(v[key], key_of(key), models, data, cache)
    v |= {"out_dir": out_dir, "ta": ta}
    run = CPURunConfig(**{f.name: v[f.name] for f in fields(CPURunConfig)})
    return CPUPlan(run=run, num_threads=v["num_threads"])
