"""Atomic checkpoints: ``<dir>/global_step_<n>/`` written under a temporary name and renamed
into place, then ``latest_checkpointed_iteration.txt`` (verl's tracker file) replaced atomically.
A run killed mid-write leaves the previous checkpoint as the latest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

TRACKER = "latest_checkpointed_iteration.txt"


def save(root: str | Path, step: int, state: dict, student=None, tokenizer=None) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"global_step_{step}"
    tmp = root / f".tmp_global_step_{step}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    if student is not None:  # a Hugging Face folder of the trained student (loadable by path)
        student.save_pretrained(tmp / "actor")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "actor")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    tracker_tmp = root / f".{TRACKER}.{os.getpid()}"
    tracker_tmp.write_text(str(step))
    os.replace(tracker_tmp, root / TRACKER)
    return final


def latest(root: str | Path) -> Path | None:
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    path = Path(root) / f"global_step_{int(tracker.read_text().strip())}"
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"{tracker} points to {path}, which has no state.pt")
    return path


def load(path: str | Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
