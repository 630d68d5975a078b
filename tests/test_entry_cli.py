"""``python -m recipe.ta_opd.main`` as a user runs it, from a folder outside the repository: a shipped
experiment composes and reaches the verl backend's checks (never the toy), and a mistake Hydra finds
while composing (unknown experiment, misspelt key) is one ``[ta-opd] error:`` line with exit 2."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest

from tests.cli_inprocess import ROOT

EXPERIMENTS = sorted(p.stem for p in (ROOT / "recipe/ta_opd/config/experiment").glob("*.yaml"))


def _start(args: list[str], cwd, **env) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "recipe.ta_opd.main", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=400)
    return proc.returncode, out, err


@pytest.mark.slow
def test_shipped_experiment_from_another_folder_reaches_the_verl_checks(tmp_path):
    pair = runpy.run_path(str(ROOT / "launch/make_smoke_pair.py"))["build"](tmp_path / "pair", n_train=8, n_val=4)
    cwd, cache = tmp_path / "elsewhere", tmp_path / "toy_cache"
    cwd.mkdir()
    status, out, err = _wait(_start(
        ["+experiment=qwen3_4b_to_qwen3_1p7b", "ta_opd.dry_run=true"], cwd, TA_OPD_CACHE=str(cache),
        STUDENT_MODEL=pair["student"], TEACHER_MODEL=pair["teacher"], TRAIN_FILES=pair["train"], VAL_FILES=pair["val"]))
    assert status == 0, err[-3000:]
    assert "[ta-opd] backend: verl (requested with ta_opd.backend)" in out
    assert "shared vocabulary 399, K=16, K'=64, rho=0.1, selector teachability" in out  # the experiment's knobs
    assert "[ta-opd] dry run: configuration valid; not starting Ray" in out
    assert "toy" not in out + err and not cache.exists()  # the toy pair is neither built nor loaded
    assert list(cwd.iterdir()) == []  # a dry run writes nothing into the working directory


@pytest.mark.slow
def test_composition_mistakes_are_one_line_and_exit_2(tmp_path):
    cases = {  # overrides -> what the one error line must say
        ("+experiment=nope",): "experiment=nope is not allowed: there is no such experiment; choose one of: "
                               + ", ".join(EXPERIMENTS),
        ("data.max_respons_length=64",): "data.max_respons_length is not a key of the configuration (did you mean "
                                         "data.max_response_length?); to add a new key write +data.max_respons_length=64",
        ("ta_opd.budget=[0.1,",): "cannot parse the override 'ta_opd.budget=[0.1,'",
    }
    procs = {args: _start(list(args), tmp_path) for args in cases}
    helped = _start(["--help"], tmp_path)
    for args, expected in cases.items():
        status, out, err = _wait(procs[args])
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert status == 2 and len(lines) == 1, (args, status, err[-2000:])
        assert lines[0].startswith(f"[ta-opd] error: {expected}"), lines[0]
        assert "[ta-opd] backend" not in out  # nothing ran
    status, out, err = _wait(helped)  # Hydra's own CLI still works
    assert status == 0 and "Powered by Hydra" in out, err[-2000:]
    assert list(tmp_path.iterdir()) == []
