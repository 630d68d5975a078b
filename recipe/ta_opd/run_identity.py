"""What makes two runs the same run (both backends): content fingerprints and identity differences.

A run identity is a flat {user-facing key: JSON value} dict; a model folder, data file or other
input is stored as ``{"fingerprint": ..., "path": ...}`` and compared by its fingerprint only, so
moving a file is fine and replacing its content is not. The CPU backend builds its identity from
``CPURunConfig`` (``cpu/identity.py``), the verl backend from the resolved Hydra config
(``verl_backend/identity.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

_WHOLE_FILE = 8 << 20  # files up to 8 MiB are hashed whole; larger ones by size + three 1 MiB samples
_SAMPLE = 1 << 20
BY_NAME = "name:"  # inputs with no local file (hub ids, URLs): "name:<id>@<revision or unresolved>"


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
        # a file is its content alone (a renamed copy is the same input); a folder's files also by name
        h.update(f"{f.relative_to(root) if f != root else ''}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE_FILE:
                h.update(fh.read())
            else:
                for offset in (0, size // 2, size - _SAMPLE):
                    fh.seek(offset)
                    h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:20]


def hub_revision(repo_id: str) -> str | None:
    """The commit a Hugging Face hub id resolves to in the local hub cache (``refs/main``, written
    when the driver loaded the tokenizer); None when it is not cached. No network access."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    return (ref.read_text().strip() or None) if ref.is_file() else None


def source(value: str) -> dict:
    """An input as the identity stores it: a local file or folder by content; anything else (a
    hub id such as ``Qwen/Qwen3-4B``, a remote URL) by its string plus, for a hub id cached here,
    the revision it resolves to. ``exact`` says whether the content itself was fingerprinted."""
    local = Path(str(value)).expanduser()
    if local.exists():
        return {"fingerprint": fingerprint(local), "path": str(value), "exact": True}
    rev = hub_revision(str(value)) if "://" not in str(value) else None
    return {"fingerprint": f"{BY_NAME}{value}@{rev or 'unresolved'}", "path": str(value), "exact": False}


def plain(x: Any) -> Any:
    """Dataclasses, tuples and dicts as JSON values."""
    if is_dataclass(x):
        return {f.name: plain(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    return x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict) and "fingerprint" in a and "fingerprint" in b:
        return a["fingerprint"] == b["fingerprint"]
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict) and "fingerprint" in v:
        fp = str(v["fingerprint"])
        return f"{v['path']} ({fp if fp.startswith(BY_NAME) else 'content ' + fp[:8]})"
    return repr(v)


def differences(saved: dict, now: dict) -> list[str]:
    """One line per key whose value differs: ``key: <saved> in the checkpoint, <now> now``."""
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {_show(saved.get(k, '<absent>'))} in the checkpoint, {_show(now.get(k, '<absent>'))} now"
            for k in keys if not _same(saved.get(k, "<absent>"), now.get(k, "<absent>"))]
