"""The identity of a run: what a checkpoint may only be resumed with.

It holds a fingerprint of each model folder (weights, config and tokenizer files) and data file,
and every knob of :class:`CPURunConfig` that changes the trajectory. Only the knobs in
:data:`SAFE_TO_CHANGE` (how long, how often to evaluate/save, where to log) may differ on resume;
any other difference is refused with a message naming each key, its checkpointed and its new
value. Moving a model or data file is fine (the fingerprint, not the path, is compared).
"""

from __future__ import annotations

import hashlib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from recipe.ta_opd.cpu.preflight import key_of
from ta_opd.errors import TAConfigError

# CPURunConfig fields that may change between a checkpoint and its resumption
SAFE_TO_CHANGE = frozenset({"total_steps", "test_freq", "save_freq", "resume_mode", "project", "experiment",
                            "loggers", "rollout_dir", "out_dir", "max_ckpt_to_keep", "pair"})
PATH_FIELDS = frozenset({"student_path", "teacher_path", "train_file", "val_file", "test_file"})
_WHOLE_FILE = 8 << 20  # files up to 8 MiB are hashed whole; larger ones by size + three 1 MiB samples
_SAMPLE = 1 << 20


def fingerprint(path: str | Path) -> str:
    """A content fingerprint of a file or of every non-hidden file of a folder (names, sizes,
    contents; large weight files by size and head/middle/tail samples, which is cheap for a 16 GB
    teacher and still catches another checkpoint or a different fine-tune)."""
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(
        f for f in root.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE_FILE:
                h.update(fh.read())
            else:
                for offset in (0, size // 2, size - _SAMPLE):
                    fh.seek(offset)
                    h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:20]


def _plain(x: Any) -> Any:
    if is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


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
            out[key_of(f.name)] = _plain(value)
    for k, v in _plain(cfg.ta).items():  # the selection/loss knobs; the run's seed is also ta_opd.seed
        key = f"ta_opd.{k}"
        out[key if out.get(key, v) == v else f"{key} (TAConfig)"] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict) and "fingerprint" in a and "fingerprint" in b:
        return a["fingerprint"] == b["fingerprint"]
    return a == b


def _show(v: Any) -> str:
    if isinstance(v, dict) and "fingerprint" in v:
        return f"{v['path']} (content {v['fingerprint'][:8]})"
    return repr(v)


def differences(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {_show(saved.get(k, '<absent>'))} in the checkpoint, {_show(now.get(k, '<absent>'))} now"
            for k in keys if not _same(saved.get(k, "<absent>"), now.get(k, "<absent>"))]


def check_resume(saved: dict | None, now: dict, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` (identity ``saved``) under a run whose identity is ``now``."""
    if not isinstance(saved, dict):
        raise TAConfigError(f"checkpoint {checkpoint} records no run identity, so it cannot be resumed safely; "
                            "choose another trainer.default_local_dir or set trainer.resume_mode=disable")
    diff = differences(saved, now)
    if diff:
        raise TAConfigError(
            f"checkpoint {checkpoint} belongs to a different run; resuming it would mix two trajectories. "
            f"Differences: {'; '.join(diff)}. Resume with the checkpoint's settings, choose another "
            "trainer.default_local_dir, or set trainer.resume_mode=disable to start over in this folder "
            f"(only {', '.join(sorted(key_of(k) for k in SAFE_TO_CHANGE - {'pair'}))} may change on resume)")
