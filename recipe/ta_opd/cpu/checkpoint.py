"""Safe, atomic checkpoints. Nothing here ever unpickles: a checkpoint is tensors + JSON.

Layout of ``<root>/global_step_<n>/``:

    state.safetensors   every tensor of the training state (model, optimizer moments, torch RNGs)
    state.json          everything else (step, data-stream position, history, python/numpy RNG,
                        the run identity) plus the byte size and sha256 of state.safetensors
    actor/              the trained student as a Hugging Face folder (loadable by path)

A checkpoint is written into ``.tmp_global_step_<n>_*``, every file and folder is fsynced, the
folder is renamed into place, and then ``latest_checkpointed_iteration.txt`` (verl's tracker
file) is replaced atomically: a kill at any point leaves the previous checkpoint as the latest.
Loading verifies the size and hash of the tensors file and the hash of ``state.json`` itself (a
hand edit is a corrupt checkpoint); a corrupt latest checkpoint falls back to the previous one
with a warning, and so does one the caller's ``accept`` refuses (e.g. a field of the wrong type).
Symbolic links are never followed: a linked step folder, ``state.json`` or ``state.safetensors``
is a corrupt checkpoint, so nothing is read from outside the run folder. A full disk (``OSError``
or safetensors' own error for ENOSPC) is a :class:`CheckpointError` that names the intact previous
checkpoint. Only the newest ``keep`` checkpoints are kept (verl's
``trainer.max_actor_ckpt_to_keep``; ``None`` keeps all). A legacy or planted ``state.pt`` is
never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ta_opd.errors import TAInputError

TRACKER = "latest_checkpointed_iteration.txt"
TENSORS, META = "state.safetensors", "state.json"
TMP_PREFIX = ".tmp_"
FORMAT = 2
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full) or no checkpoint can be resumed."""


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, and safetensors' own error (its Rust writer reports
    ENOSPC as ``SafetensorError: ... No space left on device (os error 28)``, not as an OSError)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return (OSError,)
    return (OSError, SafetensorError)


class CorruptCheckpoint(Exception):
    """This one checkpoint folder is unreadable (truncated, missing files, hash mismatch)."""


# --- encoding: nested python state <-> (JSON tree, flat tensor dict) ----------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        # non-string keys (e.g. the optimizer's parameter indices) keep their type
        return {"__items__": [[_encode(k, tensors, f"{key}/k{i}"), _encode(v, tensors, f"{key}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state holds a {type(obj).__name__} at {key!r}; only tensors, numpy arrays "
                    "and JSON values can be stored")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _storable(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): store each identical view
    once and record the aliases; clone partial overlaps."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for k, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        sid = t.untyped_storage().data_ptr() if t.numel() else -1
        view = (sid, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in views:
            aliases[k] = views[view]
            continue
        if t.numel() and sid in storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            views[view] = k
            storages.add(sid)
        out[k] = t
    return out, aliases


# --- durable file operations -------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, so the rename publishes durable contents."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# test hook: called at each numbered point inside save(); the kill tests make it SIGKILL
_fault: Callable[[str], None] = lambda point: None


# --- public API ----------------------------------------------------------------------------------
def step_dirs(root: str | Path) -> list[int]:
    """Steps of the ``global_step_<n>`` folders under root, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink())


def clean_tmp(root: str | Path) -> list[str]:
    """Remove leftover temporary folders/files of interrupted saves (call while holding the run lock)."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX) or (p.name.startswith(f".{TRACKER}.")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def save(root: str | Path, step: int, state: dict, student=None, tokenizer=None, keep: int | None = None) -> Path:
    """Write ``state`` (nested dicts/lists/tuples of tensors, numpy arrays and JSON values) as
    checkpoint ``global_step_<step>`` and make it the latest; keep the newest ``keep``."""
    root = Path(root)
    final = root / f"global_step_{step}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}global_step_{step}_", dir=root))
        _write_state(tmp, step, state)
        _fault("state_written")
        if student is not None:  # a Hugging Face folder of the trained student (loadable by path)
            student.save_pretrained(tmp / "actor")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "actor")
        _fault("actor_written")
        _fsync_tree(tmp)
        _fault("fsynced")
        if final.exists():  # re-saving a step: move the old folder aside first, never delete it in place
            aside = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old_global_step_{step}_", dir=root))
            os.replace(final, aside / final.name)
        os.replace(tmp, final)
        tmp = None
        _fsync(root)
        _fault("renamed")
        tracker_tmp = root / f".{TRACKER}.{os.getpid()}"
        _write_text(tracker_tmp, str(step))
        os.replace(tracker_tmp, root / TRACKER)
        _fsync(root)
        _fault("tracker_written")
    except _write_errors() as e:
        raise CheckpointError(f"could not write checkpoint {final} ({type(e).__name__}: {e}); "
                              f"the previous checkpoint is intact: {latest_step_text(root)}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        prune(root, keep, current=step)
        clean_tmp(root)
    except OSError as e:
        raise CheckpointError(f"checkpoint {final} was written, but removing older checkpoints or temporary "
                              f"folders failed ({type(e).__name__}: {e})") from e
    return final


def latest_step_text(root: Path) -> str:
    t = root / TRACKER
    try:
        return f"global_step_{t.read_text().strip()}" if t.exists() else "none yet"
    except OSError:
        return "unknown"


def _write_state(folder: Path, step: int, state: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "state")
    stored, aliases = _storable(tensors)
    save_file(stored, str(folder / TENSORS))
    meta = {"format": FORMAT, "step": step, "state": tree, "aliases": aliases,
            TENSORS: {"bytes": (folder / TENSORS).stat().st_size, "sha256": _sha256(folder / TENSORS)}}
    _write_text(folder / META, json.dumps(meta | {META_HASH: _meta_hash(meta)}))


META_HASH = "meta_sha256"  # sha256 of state.json's other fields (canonical JSON): a hand edit is detected


def _meta_hash(meta: dict) -> str:
    body = json.dumps({k: v for k, v in meta.items() if k != META_HASH}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _no_links(path: Path) -> None:
    """A checkpoint is read only from real files inside the run folder, never through a link."""
    for p in (path, path / META, path / TENSORS):
        if p.is_symlink():
            raise CorruptCheckpoint(f"{p} is a symbolic link (to {os.readlink(p)}); checkpoint files are read only "
                                    "from inside the run folder, never through a link")


def prune(root: str | Path, keep: int | None, current: int) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints at or below ``current`` (None: keep all)."""
    if keep is None:
        return []
    old = [s for s in step_dirs(root) if s <= current][:-keep]
    for s in old:
        victim = Path(root) / f"global_step_{s}"
        aside = Path(root) / f"{TMP_PREFIX}pruned_global_step_{s}_{os.getpid()}"
        os.replace(victim, aside)  # a kill mid-delete leaves a tmp folder, never a half checkpoint
        shutil.rmtree(aside, ignore_errors=True)
    return old


def read_meta(path: str | Path) -> dict:
    """state.json of one checkpoint folder (cheap: no tensors); CorruptCheckpoint if unreadable."""
    path = Path(path)
    _no_links(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        legacy = " (it has a state.pt, a pickle; pickles are never loaded because they can run code)" \
            if (path / "state.pt").exists() else ""
        raise CorruptCheckpoint(f"{path} lacks {META} or {TENSORS}{legacy}")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path / META} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "state" not in meta:
        raise CorruptCheckpoint(f"{path / META} is not a format-{FORMAT} checkpoint")
    if META_HASH in meta and meta[META_HASH] != _meta_hash(meta):
        raise CorruptCheckpoint(f"{path / META} does not match its recorded sha256: edited or altered")
    m = _STEP_DIR.match(path.name)
    if m and meta.get("step") != int(m.group(1)):
        raise CorruptCheckpoint(f"{path / META} records step {meta.get('step')!r}, but the folder is {path.name}")
    return meta


def load(path: str | Path) -> dict:
    """The state saved by :func:`save`; CorruptCheckpoint if truncated, altered or incomplete."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    want = meta.get(TENSORS, {})
    size = (path / TENSORS).stat().st_size
    if size != want.get("bytes") or _sha256(path / TENSORS) != want.get("sha256"):
        raise CorruptCheckpoint(f"{path / TENSORS} does not match its recorded size/sha256 "
                                f"({size} bytes, expected {want.get('bytes')}): truncated or altered")
    try:
        tensors = load_file(str(path / TENSORS))
        for alias, target in meta.get("aliases", {}).items():
            tensors[alias] = tensors[target]
        return _decode(meta["state"], tensors)
    except Exception as e:  # safetensors/JSON structure errors of a file that passed the hash
        raise CorruptCheckpoint(f"{path} cannot be decoded ({type(e).__name__}: {e})") from None


def read_tracker(root: str | Path) -> int | None:
    """The step in verl's tracker file; None when absent. A garbled tracker is a user-facing error."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    try:
        text = tracker.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TAInputError(f"{tracker} cannot be read ({type(e).__name__}: {e})") from None
    if not text.strip().isdigit():
        raise TAInputError(
            f"{tracker} holds {text[:40]!r}; it must hold the step number of the checkpoint to resume "
            f"(a global_step_<n> folder next to it; present: {step_dirs(root) or 'none'}). Write the step, "
            "delete the file to resume the newest valid checkpoint, or set trainer.resume_mode=disable (starts over in this "
            "folder, overwriting its checkpoints)")
    return int(text.strip())


def load_latest(root: str | Path, warn: Callable[[str], None] = print,
                accept: Callable[[Path, dict], None] | None = None) -> tuple[Path, dict] | None:
    """(folder, state) of the checkpoint to resume, or None when there is none. The tracker's step
    is tried first, then older checkpoints (each skip is warned); nothing loadable is an error.
    ``accept(folder, state)`` may raise CorruptCheckpoint to skip a checkpoint whose contents the
    caller cannot use (e.g. a field of the wrong type), with the same fallback."""
    root = Path(root)
    steps = step_dirs(root)
    latest = read_tracker(root)
    if latest is None:
        if not steps:
            return None
        warn(f"[ta-opd] warning: {root / TRACKER} is missing; resuming from the newest valid checkpoint")
        latest = steps[-1]
    candidates = [latest] + [s for s in reversed(steps) if s < latest]
    problems = []
    for s in candidates:
        path = root / f"global_step_{s}"
        try:
            if not path.is_dir() and not path.is_symlink():
                raise CorruptCheckpoint(f"{path} does not exist")
            state = load(path)
            if accept is not None:
                accept(path, state)
        except CorruptCheckpoint as e:
            problems.append(str(e))
            warn(f"[ta-opd] warning: checkpoint {path.name} is not loadable ({e}); trying the previous one")
            continue
        return path, state
    raise CheckpointError(f"no loadable checkpoint in {root}: " + "; ".join(problems) +
                          ". Delete the broken folders, give this run another folder (trainer.experiment_name or "
                          "trainer.default_local_dir; nothing is overwritten), or set trainer.resume_mode=disable to start "
                          "over in this folder (overwriting its checkpoints)")


def latest(root: str | Path) -> Path | None:
    """The folder the tracker points to (no loading, no fallback)."""
    step = read_tracker(root)
    return None if step is None else Path(root) / f"global_step_{step}"
