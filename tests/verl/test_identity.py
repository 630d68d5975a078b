"""A verl run resumes only itself (recipe/ta_opd/verl_backend/identity.py): a folder holding a
checkpoint of another run, or one without a run identity, is refused (exit 2) before Ray starts,
naming each difference; one launch per folder (run lock)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recipe.ta_opd import runlock
from recipe.ta_opd.verl_backend import identity as I
from ta_opd.errors import TAConfigError

ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = str(ROOT / "recipe/ta_opd/config")
PY = os.environ.get("TA_OPD_TEST_PYTHON", str(ROOT / ".venv" / "bin" / "python"))


@pytest.fixture
def inputs(tmp_path):
    """Stand-in model folders and data files: the identity reads their bytes, nothing loads them."""
    for name in ("student", "teacher", "student2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"name": name}))
    (tmp_path / "train.parquet").write_bytes(b"train rows")
    (tmp_path / "val.parquet").write_bytes(b"val rows")
    yield tmp_path
    runlock.release_all()
    I._claimed.clear()


def cfg_of(root: Path, *overrides):
    with initialize_config_dir(config_dir=RECIPE_DIR, version_base=None):
        return compose("ta_opd_trainer", overrides=[
            f"actor_rollout_ref.model.path={root / 'student'}", f"ta_opd.teacher_model_path={root / 'teacher'}",
            f"data.train_files={root / 'train.parquet'}", f"data.val_files={root / 'val.parquet'}",
            "trainer.experiment_name=run", f"trainer.default_local_dir={root / 'ckpt' / 'run'}", *overrides])


def checkpointed(root: Path, *overrides) -> Path:
    """A folder as a finished launch leaves it: identity written, global_step_2 stamped, lock released."""
    cfg = cfg_of(root, *overrides)
    I.check_and_claim(cfg, log=lambda s: None)
    I.stamp_checkpoint(cfg.trainer.default_local_dir, 2)
    (Path(cfg.trainer.default_local_dir) / "global_step_2" / "actor").mkdir()
    (Path(cfg.trainer.default_local_dir) / "latest_checkpointed_iteration.txt").write_text("2")
    runlock.release_all()
    I._claimed.clear()
    return Path(cfg.trainer.default_local_dir)


def test_same_run_resumes_and_safe_keys_may_change(inputs):
    folder = checkpointed(inputs)
    assert json.loads((folder / "global_step_2" / I.IDENTITY_FILE).read_text())["identity"] == \
        json.loads((folder / I.IDENTITY_FILE).read_text())["identity"]
    lines = []
    I.check_and_claim(cfg_of(inputs, "trainer.total_training_steps=500", "trainer.save_freq=7",
                             "trainer.logger=[console]", "ta_opd.dry_run=true"), log=lines.append)
    assert "1 checkpoint(s) of this run, newest global_step_2" in lines[-1]


def test_a_new_name_or_smaller_micro_batches_resume_the_same_run(inputs):
    """verl interpolates trainer.experiment_name into rollout.trace.*: renaming (a safe key) must not
    make the run look different; nor must memory knobs (the usual fix after an out-of-memory crash)."""
    folder = checkpointed(inputs)
    lines = []
    I.check_and_claim(cfg_of(inputs, "trainer.experiment_name=renamed", f"trainer.default_local_dir={folder}",
                             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                             "ta_opd.teacher.micro_batch_size=1", "ta_opd.dry_run=true"), log=lines.append)
    assert "1 checkpoint(s) of this run, newest global_step_2" in lines[-1]
    cfg = cfg_of(inputs, "trainer.experiment_name=renamed")
    assert cfg.actor_rollout_ref.rollout.trace.experiment_name == "renamed"  # the interpolation is real


def test_a_relative_resume_path_is_checked_and_loaded_as_one_absolute_path(inputs, monkeypatch):
    folder = checkpointed(inputs)
    monkeypatch.chdir(folder)
    cfg = cfg_of(inputs, "trainer.resume_mode=resume_path", "trainer.resume_from_path=global_step_2",
                 "ta_opd.dry_run=true")
    I.check_and_claim(cfg, dry_run=True, log=lambda s: None)
    assert cfg.trainer.resume_from_path == str(folder / "global_step_2")


@pytest.mark.parametrize("override, key", [
    ("ta_opd.seed=1", "ta_opd.seed: 0 in the checkpoint, 1 now"),
    ("ta_opd.budget=0.3", "ta_opd.budget: 0.1 in the checkpoint, 0.3 now"),
    ("ta_opd.teacher_topk=32", "ta_opd.teacher_topk: 64 in the checkpoint, 32 now"),
    ("actor_rollout_ref.actor.optim.lr=2e-6", "actor_rollout_ref.actor.optim.lr"),
    ("ta_opd.loss=topk_forward_kl", "ta_opd.loss: 'pg_opd' in the checkpoint, 'topk_forward_kl' now"),
])
def test_a_changed_knob_is_refused_naming_it(inputs, override, key):
    checkpointed(inputs)
    for dry_run in (True, False):
        with pytest.raises(TAConfigError) as e:
            I.check_and_claim(cfg_of(inputs, override), dry_run=dry_run, log=lambda s: None)
        msg = str(e.value)
        assert "holds checkpoint global_step_2 of a different run" in msg and key in msg
        # the way out that overwrites nothing comes first; the one that deletes says so
        assert msg.index("trainer.experiment_name=run_") < msg.index("DELETES")


def test_a_changed_model_is_refused_even_at_the_same_path(inputs):
    checkpointed(inputs)
    with pytest.raises(TAConfigError, match=r"actor_rollout_ref.model.path: .*student \(content [0-9a-f]{8}\) in the "
                                            r"checkpoint, .*student2 \(content"):
        I.check_and_claim(cfg_of(inputs, f"actor_rollout_ref.model.path={inputs / 'student2'}"), log=lambda s: None)
    # the teacher is never checkpointed by verl: new weights behind the same path are still noticed
    (inputs / "teacher" / "config.json").write_text(json.dumps({"name": "another teacher"}))
    with pytest.raises(TAConfigError, match="ta_opd.teacher_model_path: "):
        I.check_and_claim(cfg_of(inputs), dry_run=True, log=lambda s: None)


def test_a_checkpoint_without_identity_is_refused(inputs):
    folder = Path(cfg_of(inputs).trainer.default_local_dir)
    (folder / "global_step_25" / "actor").mkdir(parents=True)  # what verl itself writes
    (folder / "latest_checkpointed_iteration.txt").write_text("25")
    with pytest.raises(TAConfigError, match="holds checkpoint global_step_25 with no readable TA-OPD run identity"):
        I.check_and_claim(cfg_of(inputs), log=lambda s: None)
    assert not (folder / I.IDENTITY_FILE).exists()  # refused before anything is written


def test_hub_ids_are_identified_by_name(inputs):
    lines = []
    now = I.check_and_claim(cfg_of(inputs, "ta_opd.teacher_model_path=SomeOrg/never-downloaded-model",
                                   "ta_opd.dry_run=true"), dry_run=True, log=lines.append)
    assert now["ta_opd.teacher_model_path"]["fingerprint"] == "name:SomeOrg/never-downloaded-model@unresolved"
    assert any("SomeOrg/never-downloaded-model is not a local folder" in s for s in lines)
    assert not Path(cfg_of(inputs).trainer.default_local_dir).exists()  # the dry run writes nothing


def test_two_launches_into_one_folder(inputs):
    folder = Path(cfg_of(inputs).trainer.default_local_dir)
    holder = subprocess.Popen([PY, "-c", "import sys, time; from recipe.ta_opd import runlock; "
                               f"runlock.acquire({str(folder)!r}); print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        for dry_run in (True, False):
            with pytest.raises(TAConfigError, match="is in use by another run: pid"):
                I.check_and_claim(cfg_of(inputs), dry_run=dry_run, log=lambda s: None)
    finally:
        holder.kill()
        holder.wait()
    I.check_and_claim(cfg_of(inputs), log=lambda s: None)  # the holder died: the folder is free


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("smoke")
    subprocess.run([PY, str(ROOT / "launch/make_smoke_pair.py"), str(d)], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return d


@pytest.mark.parametrize("dry_run", ["true", "false"])
def test_entry_point_refuses_a_foreign_checkpoint_with_exit_2_before_ray(smoke_dir, dry_run):
    """The 1-GPU smoke command (its folder: SMOKE_DIR/run) over a folder holding verl's own
    checkpoint: exit 2 from the identity check, Ray never started, nothing written."""
    folder = smoke_dir / "run"
    (folder / "global_step_3" / "actor").mkdir(parents=True, exist_ok=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("3")
    out = subprocess.run(["bash", "launch/smoke_1gpu.sh", f"ta_opd.dry_run={dry_run}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600,
                         env={**os.environ, "SMOKE_DIR": str(smoke_dir), "PYTHON": PY, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"trainer.default_local_dir={folder} holds checkpoint global_step_3 with no readable TA-OPD run " \
           "identity" in out.stderr
    assert "ray init kwargs" not in out.stdout and "Ray" not in out.stderr.replace("before Ray", "")
    assert sorted(p.name for p in folder.iterdir()) == ["global_step_3", "latest_checkpointed_iteration.txt"]


def test_pair_the_teacher_cannot_embed_is_refused_at_startup(smoke_dir):
    """The smoke pair with roles swapped: a 416-row student over a teacher with 399 embedding rows."""
    from recipe.ta_opd.verl_backend.validate import model_vocab

    assert model_vocab(str(smoke_dir / "student"), str(smoke_dir / "teacher")) == 399  # the shipped order is safe
    with pytest.raises(TAConfigError, match="the student has 416 logit rows .* the teacher embeds only 399 ids"):
        model_vocab(str(smoke_dir / "teacher"), str(smoke_dir / "student"))
