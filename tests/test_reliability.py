"""Issue 14: a run cannot lose work, be taken over, or run someone else's code.

One test per defect (each failed before the fix): the output folder is checked before the first
step; two real processes cannot share a folder (and a dead run's lock is cleared); a resume with
another identity is refused; a negative grad_clip is refused; SIGKILLs at random times and inside
the checkpoint write lose at most one step and end in the uninterrupted run's exact weights.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ta_opd import TAConfig
from ta_opd.errors import TAConfigError, TAInputError
from tests.conftest import TINY
from tests.test_cpu_backend import run_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)


# --- 1. output folder checked before the first step ------------------------------------------
def test_unwritable_output_folder_fails_before_training(tiny_pair, tmp_path):
    from tests.cli_inprocess import run

    cache, _ = tiny_pair
    (tmp_path / "file").write_text("x")
    spec = [f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()]
    status, out, err = run(spec + [f"ta_opd.toy.cache_dir={cache}", f"trainer.default_local_dir={tmp_path}/file/run",
                                   "trainer.total_training_steps=2", "trainer.logger=[]"])
    assert status == 2 and "[ta-opd] error: trainer.default_local_dir=" in err and "not a writable folder" in err
    assert "toy pair" not in out  # failed before even locating the models


# --- 2. run lock -------------------------------------------------------------------------------
def _hold(folder, ready, done):
    from recipe.ta_opd import runlock

    runlock.acquire(folder, log=lambda *_: None)
    ready.set()
    done.wait(60)


def test_lock_refuses_a_live_holder_and_clears_a_dead_one(tmp_path):
    from recipe.ta_opd import runlock

    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready, done))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(TAConfigError, match=f"in use by another run: pid {holder.pid} on host"):
        runlock.acquire(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the file stays behind
    holder.join()
    assert (tmp_path / runlock.LOCK_NAME).exists()
    said = []
    with runlock.hold(tmp_path, log=said.append):
        assert len(said) == 1 and f"stale lock" in said[0] and f"pid {holder.pid}" in said[0]
    assert not (tmp_path / runlock.LOCK_NAME).exists()  # released and removed on a clean exit


def test_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    from recipe.ta_opd import runlock

    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x", "argv": "y"}))
    with pytest.raises(TAConfigError, match=r"another host.*delete .*\.ta_opd\.lock"):
        runlock.acquire(tmp_path)


def _entry(args, cache, out):
    env = {**os.environ, "TA_OPD_CACHE": str(cache), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    spec = [f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()]
    return subprocess.Popen([sys.executable, "-m", "recipe.ta_opd.main", *spec, f"ta_opd.toy.cache_dir={cache}",
                             f"trainer.default_local_dir={out}", "ta_opd.cpu.eval_size=4", "data.train_batch_size=4",
                             "actor_rollout_ref.rollout.n=2", "data.max_response_length=8", "trainer.logger=[]",
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_real_processes_cannot_share_a_folder(tiny_pair, tmp_path):
    """Before: both exited 0 and the later overwrote the other's checkpoints and summary."""
    from recipe.ta_opd.runlock import LOCK_NAME

    cache, _ = tiny_pair
    first = _entry(["trainer.total_training_steps=200", "trainer.save_freq=1"], cache, tmp_path)
    try:
        deadline = time.time() + 240
        while not (tmp_path / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        second = _entry(["trainer.total_training_steps=2", "ta_opd.seed=1"], cache, tmp_path)
        _, err = second.communicate(timeout=240)
        assert second.returncode == 2, err[-3000:]
        assert f"[ta-opd] error: trainer.default_local_dir={tmp_path} is in use by another run: pid {first.pid}" in err
        assert first.poll() is None  # the first run is untouched and still training
    finally:
        first.kill()
        first.communicate()
    assert not (tmp_path / "summary.json").exists()


# --- 3. run identity ---------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_with_another_identity_is_refused(tiny_pair, tmp_path):
    """Before: a resume with another budget was accepted and the summary labelled the whole run with it."""
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    _, pair = tiny_pair
    small = dict(total_steps=1, eval_size=4, max_response_length=8)
    CPUTrainer(run_config(pair, tmp_path, **small), **QUIET).fit()
    for change, key in ((dict(ta=TAConfig(budget=0.2)), "ta_opd.budget: 0.1 in the checkpoint, 0.2 now"),
                        (dict(lr=2e-4), "actor_rollout_ref.actor.optim.lr: 0.0001 in the checkpoint, 0.0002 now"),
                        (dict(seed=1), "ta_opd.seed: 0 in the checkpoint, 1 now"),
                        (dict(teacher_path=str(pair.student)), "ta_opd.teacher_model_path: ")):
        with pytest.raises(TAConfigError, match="belongs to a different run") as e:
            CPUTrainer(run_config(pair, tmp_path, **{**small, "total_steps": 2, **change}), **QUIET).fit()
        assert key in str(e.value)
    # safe changes resume: more steps, other logging/saving; a moved (identical) model folder is the same model
    moved = shutil.copytree(pair.student, tmp_path / "moved_student")
    t = CPUTrainer(run_config(pair, tmp_path, **{**small, "total_steps": 2, "save_freq": 5, "test_freq": 7},
                              student_path=str(moved)), **QUIET)
    t.fit()
    assert t.step == 2 and [h["step"] for h in t.history] == [0, 1, 2]
    # resume_mode=disable starts over in the same folder
    fresh = CPUTrainer(run_config(pair, tmp_path, **{**small, "ta": TAConfig(budget=0.2)}, resume_mode="disable"),
                       **QUIET)
    fresh.fit()
    assert [h["step"] for h in fresh.history] == [0, 1]


# --- 5. grad_clip -------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [dict(grad_clip=-1.0), dict(grad_clip=0.0), dict(temperature=-1.0),
                                    dict(lr=-1e-4), dict(n_samples=0), dict(max_response_length=0),
                                    dict(eval_size=0), dict(betas=(0.9,)), dict(seed=2**70), dict(loggers=("foo",))])
def test_run_config_rejects_out_of_range_knobs(change):
    """Before: grad_clip=-1 was accepted and trained by gradient ascent (torch flips the sign). Every
    CPURunConfig field is checked once, by the CPU plan's row for it (cpu/plan.py), by its Hydra key."""
    from recipe.ta_opd.cpu.plan import key_of, read
    from tests.cli_inprocess import config

    (field, value), = change.items()
    key = key_of(field)
    valid = ["trainer.experiment_name=t"]
    read(config(valid))  # the baseline is valid (nothing is read from disk here)
    with pytest.raises(TAConfigError, match=rf"^{re.escape(key)}=.* is not allowed"):
        read(config(valid + [f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]))


# --- 4. kill during write -----------------------------------------------------------------------
FAULT_POINTS = ("state_written", "actor_written", "fsynced", "renamed", "tracker_written")


class _Progress:
    """Tracker stand-in: appends 'trained <step>' after every optimizer step (before its save)."""

    def __init__(self, path):
        self.path = path

    def log(self, data, step):
        with open(self.path, "a") as f:
            f.write(f"trained {step} {time.monotonic()}\n")


TOTAL_STEPS = 36  # room for 15 kills: a random kill lands within ~1.5 steps of the segment's first


def _child(cfg, progress, fault):
    from recipe.ta_opd.cpu import checkpoint
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    torch.set_num_threads(1)
    if fault is not None:  # SIGKILL ourselves at this point of the first save of this segment
        seen = []

        def die(point):
            if point == fault:
                seen.append(point)
                if len(seen) == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._fault = die
    CPUTrainer(cfg, tracker=_Progress(progress), **QUIET).fit()


def _trained(progress: Path) -> list[int]:
    lines = progress.read_text().splitlines() if progress.exists() else []
    start = max(i for i, ln in enumerate(lines) if ln == "start") if "start" in lines else 0
    steps = [int(ln.split()[1]) for ln in lines[start:] if ln.startswith("trained")]
    return [st for st in steps if st != 0]


def _step_seconds(progress: Path, default: float = 0.3) -> float:
    """Median time between consecutive optimizer steps of one segment so far (how long a step
    takes on this machine now), so that a random kill lands inside the next step or two whatever
    the machine's speed."""
    gaps, last = [], None
    for ln in progress.read_text().splitlines() if progress.exists() else []:
        if ln == "start":
            last = None
        elif ln.startswith("trained") and len(ln.split()) == 3:
            t = float(ln.split()[2])
            if last is not None:
                gaps.append(t - last)
            last = t
    return sorted(gaps)[len(gaps) // 2] if gaps else default


def kill_campaign(cache: str, out: str, random_kills: int, seed: int) -> dict:
    """Run a short training to the end while SIGKILLing it: ``random_kills`` at random times after
    the segment's first step, plus one kill at each FAULT_POINTS inside a checkpoint write. Then
    the same run uninterrupted. Returns the evidence as JSON-able numbers."""
    from recipe.ta_opd.cpu import checkpoint
    from recipe.ta_opd.cpu.trainer import CPUTrainer
    from ta_opd.tools.toy.build import ToySpec, load_or_build

    torch.set_num_threads(1)
    pair = load_or_build(cache, ToySpec(**TINY), log=lambda *_: None)
    out = Path(out)
    small = dict(total_steps=TOTAL_STEPS, save_freq=1, test_freq=0, eval_size=4, max_response_length=8)
    cfg = run_config(pair, out / "killed", **small)
    rng = random.Random(seed)
    plan = [("time", None)] * random_kills + [("fault", p) for p in FAULT_POINTS]
    rng.shuffle(plan)
    ctx = multiprocessing.get_context("fork")
    progress = out / "progress.txt"
    kills, lost, failed, segments = [], [], 0, 0
    for kind, point in plan + [("finish", None)]:
        segments += 1
        with open(progress, "a") as f:  # marks the segment before the child can log anything
            f.write("start\n")
        child = ctx.Process(target=_child, args=(cfg, progress, point))
        child.start()
        if kind == "time":
            while child.is_alive() and not _trained(progress):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5 * _step_seconds(progress)))
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
        child.join(300)
        done = _trained(progress)
        if child.exitcode == -signal.SIGKILL:
            step = checkpoint.read_tracker(out / "killed" / "checkpoints") or 0
            kills.append(f"{kind}:{point or ''}@{max(done, default=0)}")
            lost.append(max(done, default=step) - step)
        elif child.exitcode != 0:
            failed += 1
        if child.exitcode == 0:
            break
    resumed = CPUTrainer(cfg, **QUIET)
    resumed.maybe_resume()
    reference = CPUTrainer(run_config(pair, out / "reference", **small), **QUIET)
    reference.fit()
    diff = max(float((a - b).abs().max()) for a, b in
               zip(reference.student.state_dict().values(), resumed.student.state_dict().values()))

    def metrics(t):
        return [{k: v for k, v in h.items() if not k.startswith("ta_opd/timing/")} for h in t.history]

    leftovers = [p.name for p in (out / "killed" / "checkpoints").iterdir() if p.name.startswith(".")]
    return {"kills": kills, "lost_steps": lost, "failed_segments": failed, "segments": segments,
            "final_step": resumed.step, "max_abs_weight_diff": diff,
            "metrics_equal": json.dumps(metrics(reference)) == json.dumps(metrics(resumed)), "leftovers": leftovers}


@pytest.mark.slow
def test_sigkill_during_training_and_checkpoint_writes(tiny_pair, tmp_path):
    cache, _ = tiny_pair
    code = ("import json, sys; from tests.test_reliability import kill_campaign; "
            f"print('RESULT ' + json.dumps(kill_campaign({str(cache)!r}, {str(tmp_path)!r}, 10, 0)))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    print(r)
    assert len(r["kills"]) >= 10 + len(FAULT_POINTS) - 1, r  # a kill may land after the run finished
    assert r["failed_segments"] == 0, r  # every resume after a kill started cleanly
    assert max(r["lost_steps"]) <= 1, r
    assert r["final_step"] == TOTAL_STEPS and r["max_abs_weight_diff"] == 0.0 and r["metrics_equal"], r
    assert r["leftovers"] == [], r


# --- issue 20: links, the rollout folder, Ctrl-C -------------------------------------------------
def test_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    """Before: the link was taken for a stale lock and the lock JSON written through it."""
    from recipe.ta_opd import runlock

    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    run = tmp_path / "run"
    run.mkdir()
    (run / runlock.LOCK_NAME).symlink_to(victim)
    for attempt in (lambda: runlock.acquire(run), lambda: runlock.check_free(run)):
        with pytest.raises(TAConfigError, match=r"lock file .*\.ta_opd\.lock is a symbolic link .*Delete"):
            attempt()
    (run / "dangling").symlink_to(tmp_path / "nowhere")
    os.replace(run / "dangling", run / runlock.LOCK_NAME)  # a dangling link would be created by O_CREAT
    with pytest.raises(TAConfigError, match="symbolic link"):
        runlock.acquire(run)
    assert victim.read_text() == "someone else's file" and not (tmp_path / "nowhere").exists()
    assert not runlock._held


def test_rollout_folder_is_locked_with_its_own_key(tmp_path):
    from recipe.ta_opd import runlock

    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(TAConfigError, match=rf"trainer.rollout_data_dir={tmp_path} is in use by another run: "
                                                rf"pid {holder.pid}.*choose another trainer.rollout_data_dir"):
            runlock.acquire(tmp_path, key="trainer.rollout_data_dir")
    finally:
        done.set()
        holder.join(30)


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped_and_the_rerun_resumes(tiny_pair, tmp_path):
    """Before: a KeyboardInterrupt traceback and exit 1. Now one line naming the last checkpoint,
    exit 130, the checkpoint intact (no temporary folder left), and the same command resumes it."""
    from recipe.ta_opd.cpu import checkpoint

    cache, _ = tiny_pair
    ck = tmp_path / "checkpoints"
    args = ["trainer.total_training_steps=400", "trainer.save_freq=1", "trainer.test_freq=0"]  # 400: on an idle machine 40 steps (~4 s) could finish before the signal landed
    first = _entry(args, cache, tmp_path)
    try:
        deadline = time.time() + 240
        while checkpoint.read_tracker(ck) is None:
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("[ta-opd] interrupted: ")]
    step = checkpoint.read_tracker(ck)
    assert lines == [f"[ta-opd] interrupted: the last checkpoint is {ck / f'global_step_{step}'} (step {step}); "
                     "rerun the same command (trainer.resume_mode=auto) to resume from it"]
    checkpoint.load(ck / f"global_step_{step}")  # intact: size, hash and state.json hash verify
    again = _entry([f"trainer.total_training_steps={step + 1}", *args[1:]], cache, tmp_path)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"resumed from {ck / f'global_step_{step}'} at step {step}" in out
    assert checkpoint.read_tracker(ck) == step + 1
    assert not [p for p in ck.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]


def test_interrupt_line_without_a_checkpoint(tmp_path):
    from recipe.ta_opd.messages import where_stopped
    from tests.cli_inprocess import config

    cfg = config([f"trainer.default_local_dir={tmp_path}"])
    assert where_stopped(cfg) == f"no checkpoint was written in {tmp_path} yet; rerunning the same command starts over"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")  # verl's layout: checkpoints in the folder
    assert where_stopped(cfg).startswith(f"the last checkpoint is {tmp_path / 'global_step_7'} (step 7)")


def test_resume_mode_auto_finds_a_renamed_copy_of_the_data_file(tmp_path):
    """The identity compares content: a byte-identical data file under a new name is the same input."""
    from recipe.ta_opd.run_identity import fingerprint

    a = tmp_path / "train.parquet"
    a.write_bytes(b"PAR1 same bytes PAR1")
    b = tmp_path / "moved" / "renamed.parquet"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert fingerprint(a) == fingerprint(b)
    b.write_bytes(b"PAR1 other bytes PAR1")
    assert fingerprint(a) != fingerprint(b)


def test_min_keep_equal_to_the_response_length_warns(tiny_pair, capsys):
    from recipe.ta_opd.cpu.plan import _sizes

    _, pair = tiny_pair
    v = dict(max_response_length=8, prompts_per_step=4, n_samples=2, student_path=str(pair.student),
             teacher_path=str(pair.teacher))
    _sizes(v, TAConfig(min_keep_per_sequence=7))
    assert "warning" not in capsys.readouterr().out
    _sizes(v, TAConfig(min_keep_per_sequence=8))
    assert "[ta-opd] warning: ta_opd.min_keep_per_sequence=8 equals data.max_response_length" in capsys.readouterr().out
    with pytest.raises(TAConfigError, match="min_keep_per_sequence=9 is not allowed .*must be <= 8"):
        _sizes(v, TAConfig(min_keep_per_sequence=9))


def test_memory_estimate_refuses_with_the_numbers():
    from recipe.ta_opd.cpu import preflight
    from ta_opd.errors import TAInputError

    need = preflight.step_bytes(sequences=8, response_length=16, vocab=1000, student_weights=10, teacher_weights=5)
    assert need == 4 * 8 * 16 * 1000 * 4 + 4 * 10 + 5
    preflight.check_memory(need, "x", available=need)
    with pytest.raises(TAInputError, match=r"x needs at least 0\.0 GiB of memory per step, but 0\.0 GiB is available"):
        preflight.check_memory(need, "x", available=need - 1)


def test_verl_entry_applies_the_folder_resume_and_min_keep_rules(tiny_pair, tmp_path, capsys):
    from recipe.ta_opd.verl_backend.entry import check_run_folders
    from tests.cli_inprocess import config

    _, pair = tiny_pair
    base = [f"actor_rollout_ref.model.path={pair.student}", f"ta_opd.teacher_model_path={pair.teacher}",
            f"data.train_files={pair.train_file}", f"data.val_files={pair.val_file}", "data.max_response_length=8"]
    check_run_folders(config(base + [f"trainer.default_local_dir={tmp_path / 'run'}"]), TAConfig())
    cases = [([f"trainer.default_local_dir={pair.student}"], "trainer.default_local_dir=.* is the model folder"),
             ([f"trainer.rollout_data_dir={pair.train_file.parent}"], "trainer.rollout_data_dir=.* is the folder of "
                                                                      "data.train_files"),
             ([f"trainer.default_local_dir={pair.root}"], "contains the model folder"),
             (["trainer.resume_from_path=/nonexistent/global_step_3"], "resume_from_path=/nonexistent/global_step_3 "
                                                                       "does not exist"),
             (["ta_opd.min_keep_per_sequence=9"], "min_keep_per_sequence=9 is not allowed .*must be <= 8")]
    for extra, msg in cases:
        cfg = config(base + [f"trainer.default_local_dir={tmp_path / 'run'}"] + extra)
        with pytest.raises((TAConfigError, TAInputError), match=msg):
            check_run_folders(cfg, TAConfig(min_keep_per_sequence=9) if "min_keep" in msg else TAConfig())
    check_run_folders(config(base + [f"trainer.resume_from_path={tmp_path}"]), TAConfig())
    assert f"trainer.resume_from_path={tmp_path} is ignored with trainer.resume_mode=auto" in capsys.readouterr().out
