"""The real verl step on one GPU (vLLM rollout, FSDP engines, teacher group, statistics hook in
verl's actor forward, checkpoint, resume). Skips without CUDA; run it on a GPU machine with
``pytest -m gpu tests/verl/test_gpu_smoke.py`` (needs ``pip install -e .[gpu,test]``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
@pytest.mark.slow
def test_one_gpu_smoke_run_trains_checkpoints_and_resumes(tmp_path):
    env = {**os.environ, "SMOKE_DIR": str(tmp_path), "PYTHON": sys.executable, "STEPS": "2"}
    first = subprocess.run(["bash", "launch/smoke_1gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=3600)
    assert first.returncode == 0, first.stderr[-5000:]
    assert "ta_opd/kept_ratio" in first.stdout
    tracker = tmp_path / "run" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text().strip() == "2"
    # resume: two more steps continue from the step-2 checkpoint instead of starting over
    again = subprocess.run(["bash", "launch/smoke_1gpu.sh", "trainer.total_training_steps=4"], cwd=ROOT,
                           env={**env, "STEPS": "4"}, capture_output=True, text=True, timeout=3600)
    assert again.returncode == 0, again.stderr[-5000:]
    assert tracker.read_text().strip() == "4"
    assert "step:3" in again.stdout and "step:1 " not in again.stdout
