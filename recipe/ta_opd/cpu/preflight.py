"""Checks of a CPU run's files before the first step, so a mistake costs seconds, not a run.

The knobs are read and checked by ``cpu/plan.py`` (one row each); this module checks what they
point at. Each failure raises ``TAInputError`` naming the user-facing key, the value and what is
expected. What is checked (docs/reliability.md has the full list): the output/cache/rollout
folders (a probe file is written and removed), model folders (config.json, tokenizer,
safetensors headers against the file sizes; after loading, every weight finite), and data files
(readable parquet, verl's columns, at least one row, chat-format prompts).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

from ta_opd.errors import TAConfigError, TAInputError


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


# --- the pair -----------------------------------------------------------------------------------
def check_toy_cache(cache_dir, spec) -> None:
    """Building the toy pair needs a writable cache; the shipped or an already built pair only needs reading."""
    from ta_opd.tools.toy import shipped
    from ta_opd.tools.toy.build import DEFAULT_CACHE

    root = Path(cache_dir or DEFAULT_CACHE).expanduser()
    if shipped.find(spec.key()) is None and not (root / spec.key() / "manifest.json").exists():
        check_writable(root, "ta_opd.toy.cache_dir" if cache_dir else f"the toy cache ($TA_OPD_CACHE or {DEFAULT_CACHE})")


# --- folders the run writes vs. what it reads -----------------------------------------------------
def _within(a: Path, b: Path) -> bool:
    """a is b or inside b (both resolved)."""
    return a == b or b in a.parents


def check_not_an_input(path: str | Path, key: str, models: dict[str, str], data: dict[str, str],
                       cache: str | Path | None) -> None:
    """A folder the run writes must not be, contain or (for models) lie inside a model folder, a data
    file's folder or the toy cache the run reads: checkpoints and plots would land in the model
    folder (changing its fingerprint, so the run could never resume) or mix with the data."""
    out = Path(path).expanduser().resolve()
    local = lambda v: v and "://" not in str(v) and Path(str(v)).expanduser().exists()  # noqa: E731 (hub ids, URLs: no folder)
    reads: list[tuple[str, Path, bool]] = [(f"the model folder {k}={v}", Path(str(v)).expanduser().resolve(), True)
                                           for k, v in models.items() if local(v)]
    reads += [(f"the folder of {k}={v}", Path(str(v)).expanduser().resolve().parent, False)
              for k, v in data.items() if local(v)]
    if cache is not None:
        reads.append((f"the toy cache {cache}", Path(cache).expanduser().resolve(), False))
    for what, p, no_inside in reads:
        if _within(p, out) or (no_inside and _within(out, p)):
            where = "is" if out == p else ("contains" if _within(p, out) else "is inside")
            raise TAInputError(f"{key}={path} {where} {what}, which the run reads, and the run writes into "
                               f"{key}; choose a folder of its own (e.g. under runs/)")


# --- machine resources --------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes the kernel reports as available (Linux: MemAvailable), else the physical memory; None
    when neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def vocab_of(model: str | Path) -> int | None:
    """``vocab_size`` of a model folder's config.json (already checked to parse), if it holds one."""
    try:
        v = json.loads((Path(model).expanduser() / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and v > 0 else None


def weight_bytes(model: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(model).expanduser().glob("*.safetensors"))


def step_bytes(sequences: int, response_length: int, vocab: int, student_weights: int, teacher_weights: int) -> int:
    """A lower bound on what one CPU step holds at once: four (S, R, V) fp32 logit tensors (the
    student's scoring pass, the teacher's, the update's forward and its gradient; prompt tokens not
    counted) plus the student in fp32 with its gradient and two AdamW moments, and the teacher."""
    return 4 * sequences * response_length * vocab * 4 + 4 * student_weights + teacher_weights


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(need: int, what: str, available: int | None = None) -> None:
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise TAInputError(f"{what} needs at least {_gib(need)} of memory per step, but {_gib(available)} is "
                           "available; lower data.train_batch_size, actor_rollout_ref.rollout.n or "
                           "data.max_response_length")


def visible_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_min_keep(ta, length: int) -> None:
    """``ta_opd.min_keep_per_sequence`` against ``data.max_response_length`` (both backends): above
    it every position is kept and the budget means nothing (refused); equal to it, warned."""
    if ta.min_keep_per_sequence > length:
        raise TAConfigError(f"ta_opd.min_keep_per_sequence={ta.min_keep_per_sequence} is not allowed with "
                            f"data.max_response_length={length}; a response has at most {length} positions, so every "
                            f"position would be kept and ta_opd.budget={ta.budget} would have no effect (it must be "
                            f"<= {length})")
    if ta.min_keep_per_sequence == length:
        print(f"[ta-opd] warning: ta_opd.min_keep_per_sequence={length} equals data.max_response_length: every "
              f"position of every response is kept, so ta_opd.budget={ta.budget} has no effect")
