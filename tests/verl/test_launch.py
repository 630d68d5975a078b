"""Launch scripts: valid shell, every variable documented in the header, and the 1-GPU smoke and
single-node commands validate end to end (tokenizers, pools, verl options) with ta_opd.dry_run."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sbatch"))
PY = os.environ.get("TA_OPD_TEST_PYTHON", str(ROOT / ".venv" / "bin" / "python"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_shell_and_documents_its_variables(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for var in sorted(set(re.findall(r"\$\{(\w+):-", text))):
        assert var in header, f"{script.name} reads ${var} but does not document it at the top"


def _run(cmd, env):
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("smoke")
    _run([PY, "launch/make_smoke_pair.py", str(d)], {})
    return d


def test_smoke_script_validates_without_a_gpu(smoke_dir):
    out = _run(["bash", "launch/smoke_1gpu.sh", "ta_opd.dry_run=true"], {"SMOKE_DIR": str(smoke_dir), "PYTHON": PY})
    assert "trainer pool [1], teacher fsdp (colocated with the trainer), loss ta_opd_pg_opd, shared vocabulary 399" in out
    assert "dry run: configuration valid" in out


def test_single_node_script_validates_a_paper_config(smoke_dir):
    env = {"PYTHON": PY, "STUDENT_MODEL": str(smoke_dir / "student"), "TEACHER_MODEL": str(smoke_dir / "teacher"),
           "TRAIN_FILES": str(smoke_dir / "data" / "train.parquet"), "VAL_FILES": str(smoke_dir / "data" / "val.parquet"),
           "NODE_GPUS": "8", "TEACHER_GPUS": "2"}
    out = _run(["bash", "launch/single_node.sh", "ta_opd.dry_run=true", "ta_opd.budget=0.05"], env)
    assert ("allocation 1 x 8 GPUs (trainer.nnodes x n_gpus_per_node) -> trainer pool [6], teacher fsdp (pool [2]), "
            "loss ta_opd_pg_opd, shared vocabulary 399, K=16, K'=64, rho=0.05") in out


def test_slurm_script_refuses_node_count_overrides():
    """The allocation decides the node counts; a user's trainer.nnodes used to win silently."""
    out = subprocess.run(["bash", "launch/slurm_ta_opd.sbatch", "trainer.nnodes=8"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "'trainer.nnodes=8' is set by this script from the allocation" in out.stderr


@pytest.mark.parametrize("overrides, message", [
    ([], "the verl backend needs actor_rollout_ref.model.path (student) and ta_opd.teacher_model_path"),
    (["actor_rollout_ref.model.path=/nonexistent/student", "ta_opd.teacher_model_path=/nonexistent/teacher",
      "data.train_files=a.parquet", "data.val_files=b.parquet"],
     "actor_rollout_ref.model.path='/nonexistent/student': cannot load its tokenizer and config"),
])
def test_entry_point_rejects_bad_verl_settings_with_exit_2(overrides, message):
    out = subprocess.run([PY, "-m", "recipe.ta_opd.main", "ta_opd.backend=verl", *overrides], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
