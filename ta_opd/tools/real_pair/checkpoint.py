"""Checkpoints of the top-layer SFT: the trainable parameters, AdamW's state and the step, as
safetensors + JSON (nothing unpickled), replaced atomically so a kill at any moment leaves the
previous or the new checkpoint, never a mix."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: ``path`` exists only when complete."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    write(tmp)
    os.replace(tmp, path)


def save_sft_checkpoint(folder: Path, params, opt, step: int, losses: list[float]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().contiguous()
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in st:
                tensors[f"{name}.{i}"] = torch.as_tensor(st[name]).detach().clone().contiguous()

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))

    if folder.exists():
        _replace_dir(folder, write)
    else:
        write_atomic(folder, write)


def _replace_dir(folder: Path, write) -> None:
    new = folder.with_name(folder.name + ".new")
    if new.exists():
        shutil.rmtree(new)
    write(new)
    old = folder.with_name(folder.name + ".old")
    os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old)


def load_sft_checkpoint(folder: Path, params, opt, sched) -> tuple[int, list[float]]:
    """Restore parameters (and, given ``opt``/``sched``, AdamW state and the LR schedule); returns
    (next step, losses so far); (0, []) when there is no checkpoint."""
    from safetensors.torch import load_file

    if not folder.exists():
        old = folder.with_name(folder.name + ".old")  # killed between the two renames of _replace_dir
        if old.exists():
            os.replace(old, folder)
        else:
            return 0, []
    meta = json.loads((folder / "state.json").read_text())
    t = load_file(str(folder / "state.safetensors"))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(t[f"param.{i}"])
    if opt is not None:
        for i, p in enumerate(params):
            if f"exp_avg.{i}" in t:
                opt.state[p] = {"step": t[f"step.{i}"], "exp_avg": t[f"exp_avg.{i}"], "exp_avg_sq": t[f"exp_avg_sq.{i}"]}
        with warnings.catch_warnings():  # stepping the schedule alone, to the resumed step, is intended
            warnings.simplefilter("ignore")
            for _ in range(meta["step"]):
                sched.step()
    return int(meta["step"]), list(meta["losses"])
