"""Checkpoints never unpickle, survive corruption and full disks, clean up, fsync, and keep N."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from recipe.ta_opd.cpu import checkpoint
from recipe.ta_opd.cpu.checkpoint import CheckpointError, load_latest
from ta_opd.errors import TAInputError


def _state(step: int) -> dict:
    """A state shaped like the trainer's: tied weights, optimizer ints as keys, every RNG."""
    torch.manual_seed(step)
    emb = torch.nn.Embedding(7, 3)
    head = torch.nn.Linear(3, 7, bias=False)
    head.weight = emb.weight  # tied, as in small HF models
    model = torch.nn.Sequential(emb, head)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    random.seed(step)
    np.random.seed(step)
    return {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "sampler_rng": torch.Generator().manual_seed(step).get_state(), "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
            "stream": {"epoch": 0, "pos": 4 * step}, "history": [{"step": step, "x": float("nan"), "y": None}],
            "before": {}, "identity": {"ta_opd.budget": 0.1}}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


def _marker_pickle(marker) -> bytes:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling creates the marker file

    return pickle.dumps({"step": 9, "payload": Payload()})


def test_state_round_trips_exactly_without_pickle(tmp_path):
    s = _state(3)
    path = checkpoint.save(tmp_path, 3, s)
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "state.safetensors"]
    assert _equal(s, checkpoint.load(path))
    rng = checkpoint.load(path)["numpy_rng"]
    np.random.set_state(rng)  # the loaded numpy state is usable as is
    assert isinstance(checkpoint.load(path)["python_rng"], tuple)


def test_planted_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    checkpoint.save(tmp_path / "ck", 1, _state(1))
    planted = tmp_path / "ck" / "global_step_2"
    planted.mkdir()
    (planted / "state.pt").write_bytes(_marker_pickle(marker))
    (tmp_path / "ck" / checkpoint.TRACKER).write_text("2")
    (tmp_path / "ck" / "global_step_1" / "state.pt").write_bytes(_marker_pickle(marker))  # inside a valid one too
    warnings = []
    path, state = load_latest(tmp_path / "ck", warn=warnings.append)
    assert path.name == "global_step_1" and state["step"] == 1
    assert any("state.pt" in w and "never loaded" in w for w in warnings)
    assert not marker.exists(), "loading a checkpoint executed a planted pickle"


@pytest.mark.parametrize("damage", ["truncate_tensors", "zero_json", "flip_byte", "delete_tensors", "missing_folder"])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, damage):
    checkpoint.save(tmp_path, 1, _state(1))
    checkpoint.save(tmp_path, 2, _state(2))
    ck = tmp_path / "global_step_2"
    t = ck / "state.safetensors"
    if damage == "truncate_tensors":
        t.write_bytes(t.read_bytes()[:-10])
    elif damage == "zero_json":
        (ck / "state.json").write_bytes(b"")
    elif damage == "flip_byte":
        b = bytearray(t.read_bytes())
        b[-1] ^= 0xFF
        t.write_bytes(bytes(b))
    elif damage == "delete_tensors":
        t.unlink()
    else:
        import shutil

        shutil.rmtree(ck)
    warnings = []
    path, state = load_latest(tmp_path, warn=warnings.append)
    assert path.name == "global_step_1" and _equal(state, _state(1))
    assert len(warnings) == 1 and "global_step_2" in warnings[0]


def test_nothing_loadable_is_a_clear_error(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1))
    (tmp_path / "global_step_1" / "state.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no loadable checkpoint.*resume_mode=disable"):
        load_latest(tmp_path, warn=lambda *_: None)


@pytest.mark.parametrize("text", ["abc", "", "1.5", "-3"])
def test_garbled_tracker_is_a_clear_error(tmp_path, text):
    checkpoint.save(tmp_path, 1, _state(1))
    (tmp_path / checkpoint.TRACKER).write_text(text)
    with pytest.raises(TAInputError, match=r"latest_checkpointed_iteration.txt holds .*present: \[1\]"):
        load_latest(tmp_path)


def test_missing_tracker_resumes_newest_valid(tmp_path):
    checkpoint.save(tmp_path, 1, _state(1))
    checkpoint.save(tmp_path, 2, _state(2))
    (tmp_path / checkpoint.TRACKER).unlink()
    warnings = []
    assert load_latest(tmp_path, warn=warnings.append)[0].name == "global_step_2" and warnings


def test_keep_last_n(tmp_path):
    for s in range(1, 6):
        checkpoint.save(tmp_path, s, _state(s), keep=2)
    assert checkpoint.step_dirs(tmp_path) == [4, 5]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for s in range(6, 8):
        checkpoint.save(tmp_path, s, _state(s), keep=None)
    assert checkpoint.step_dirs(tmp_path) == [4, 5, 6, 7]


def test_temp_folders_cleaned_after_success_failure_and_on_next_start(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, _state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_1", checkpoint.TRACKER]

    def disk_full(point):
        if point == "actor_written":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_fault", disk_full)
    for attempt in range(3):  # each retry must not add a folder
        with pytest.raises(CheckpointError, match="No space left.*previous checkpoint is intact: global_step_1"):
            checkpoint.save(tmp_path, 2 + attempt, _state(2))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_1", checkpoint.TRACKER]
    monkeypatch.setattr(checkpoint, "_fault", lambda point: None)
    # leftovers of a SIGKILLed save (no chance to clean) go on the next start / next save
    (tmp_path / ".tmp_global_step_2_abc").mkdir()
    (tmp_path / ".tmp_global_step_2_abc" / "state.safetensors").write_bytes(b"partial")
    (tmp_path / f".{checkpoint.TRACKER}.12345").write_text("2")
    assert len(checkpoint.clean_tmp(tmp_path)) == 2
    (tmp_path / ".tmp_global_step_3_xyz").mkdir()
    checkpoint.save(tmp_path, 2, _state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_1", "global_step_2", checkpoint.TRACKER]


def test_files_and_folders_are_fsynced_before_the_renames(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    checkpoint.save(tmp_path, 1, _state(1))
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    folder_rename, tracker_rename = renames
    tmp_dir = events[folder_rename][1]
    synced_before = {e[1] for e in events[:folder_rename] if e[0] == "fsync"}
    assert {f"{tmp_dir}/state.json", f"{tmp_dir}/state.safetensors", tmp_dir} <= synced_before
    tracker_tmp = events[tracker_rename][1]
    between = {e[1] for e in events[folder_rename:tracker_rename] if e[0] == "fsync"}
    assert {str(tmp_path), tracker_tmp} <= between  # the folder rename is durable before the tracker moves
    assert events[-1] == ("fsync", str(tmp_path))  # and the tracker rename is durable on return


def test_json_holds_no_tensors_and_no_pickle_opcodes(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state(1))
    meta = json.loads((path / "state.json").read_text())
    assert meta["format"] == checkpoint.FORMAT and meta["step"] == 1
    assert b"\x80\x04" not in (path / "state.safetensors").read_bytes()[:8]  # not a pickle stream


def test_killed_toy_build_folder_is_removed_on_the_next_build(tmp_path):
    """Before: a killed toy build leaked its .building-* folder forever."""
    import socket
    import subprocess

    from ta_opd.tools.toy.build import clean_stale_builds

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists
    host = socket.gethostname()
    leaked = tmp_path / f".building-{host}-{dead.pid}-abc123"
    running = tmp_path / f".building-{host}-{os.getpid()}-def456"  # this process: still building
    elsewhere = tmp_path / f".building-otherhost-{dead.pid}-ghi789"  # another host's build: not ours to judge
    for p in (leaked, running, elsewhere):
        p.mkdir()
    said = []
    assert clean_stale_builds(tmp_path, log=said.append) == [leaked.name]
    assert not leaked.exists() and running.exists() and elsewhere.exists() and said


# --- issue 20: full disks as the writer reports them, hand edits, links ----------------------------
def _only_step_1(tmp_path):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_1", checkpoint.TRACKER]
    assert checkpoint.read_tracker(tmp_path) == 1 and _equal(checkpoint.load(tmp_path / "global_step_1"), _state(1))


def test_safetensors_disk_full_error_is_a_checkpoint_error(tmp_path, monkeypatch):
    """Before: safetensors' Rust writer raised SafetensorError (not an OSError): a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    checkpoint.save(tmp_path, 1, _state(1))

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=r"os error 28.*previous checkpoint is intact: global_step_1"):
        checkpoint.save(tmp_path, 2, _state(2))
    _only_step_1(tmp_path)


@pytest.fixture
def small_fs(tmp_path):
    """A 5 MB tmpfs (needs mount rights: root in a container); skipped where it cannot be mounted."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a 5 MB tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_disk_full_on_a_5mb_filesystem(small_fs):
    checkpoint.save(small_fs, 1, _state(1))
    big = {**_state(2), "model": {"w": torch.zeros(2_000_000)}}  # 8 MB of tensors on a 5 MB disk
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint is intact: global_step_1"):
        checkpoint.save(small_fs, 2, big)
    _only_step_1(small_fs)


def _edit(path, change):
    meta = json.loads((path / "state.json").read_text())
    change(meta)
    (path / "state.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit", ["step_text", "rng_garbled", "folder_step", "rehashed"])
def test_hand_edited_state_json_falls_back_to_the_previous_checkpoint(tmp_path, edit):
    """Before: "step": "two" -> ValueError, a malformed RNG state -> TypeError (rc 1)."""
    checkpoint.save(tmp_path, 1, _state(1))
    checkpoint.save(tmp_path, 2, _state(2))
    ck = tmp_path / "global_step_2"
    if edit == "step_text":
        _edit(ck, lambda m: m["state"].update(step="two"))
    elif edit == "rng_garbled":
        _edit(ck, lambda m: m["state"].update(python_rng="garbled"))
    elif edit == "folder_step":
        _edit(ck, lambda m: m.update(step=5))
    else:  # an editor who also recomputes the hash: the caller's field check catches it
        _edit(ck, lambda m: (m["state"].update(step="two"), m.update(meta_sha256=checkpoint._meta_hash(m))))

    def accept(path, state):
        try:
            int(state["step"]) if isinstance(state["step"], (int, str)) else None
            random.setstate(state["python_rng"])
        except (TypeError, ValueError) as e:
            raise checkpoint.CorruptCheckpoint(f"{path}: {e}") from None

    warnings = []
    path, state = load_latest(tmp_path, warn=warnings.append, accept=accept)
    assert path.name == "global_step_1" and _equal(state, _state(1))
    assert len(warnings) == 1 and "global_step_2" in warnings[0]
    if edit != "rehashed":
        assert "sha256" in warnings[0] or "records step 5" in warnings[0]


def test_trainer_refuses_unusable_fields_through_accept(tmp_path):
    """The CPU trainer's accept: load_state's TypeError/ValueError become a skipped checkpoint."""
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    class Stub:
        identity = {"ta_opd.budget": 0.1}
        load_state = CPUTrainer.load_state

    stub = Stub()
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"state.json holds an unusable field \(ValueError"):
        CPUTrainer._resume_from(stub, tmp_path, {**_state(1), "step": "two"})


@pytest.mark.parametrize("what", ["tensors", "json", "folder"])
def test_links_are_never_followed(tmp_path, what):
    """A linked state.safetensors / state.json / step folder would read from outside the run folder."""
    root, outside = tmp_path / "run", tmp_path / "elsewhere"
    checkpoint.save(root, 1, _state(1))
    checkpoint.save(outside, 2, _state(2))
    checkpoint.save(root, 2, _state(2))
    ck = root / "global_step_2"
    if what == "folder":
        import shutil

        shutil.rmtree(ck)
        ck.symlink_to(outside / "global_step_2")
    else:
        name = "state.safetensors" if what == "tensors" else "state.json"
        (ck / name).unlink()
        (ck / name).symlink_to(outside / "global_step_2" / name)
    warnings = []
    path, _ = load_latest(root, warn=warnings.append)
    assert path.name == "global_step_1"
    assert len(warnings) == 1 and "is a symbolic link" in warnings[0] and "never through a link" in warnings[0]
    assert checkpoint.step_dirs(root) == ([1] if what == "folder" else [1, 2])
