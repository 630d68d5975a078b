"""W&B for real: the CPU backend with ``trainer.logger=[console,wandb]`` in W&B offline mode, the
offline run read back from its ``.wandb`` file (``tests/wandb_offline.py``) and held to what
``recipe/ta_opd/logged.py`` says the CPU backend logs (the verl backend's run is read back the same
way in ``tests/verl/test_fit_shipped.py``), and the run folder's kept-token pages and token export
checked against the same numbers."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.wandb_offline import ENV, check_run, read_run

ROOT = Path(__file__).resolve().parents[1]
GROUP = "wandb_test_sweep"


def _run(tmp_path, cache, args):
    env = {**os.environ, **ENV, "TA_OPD_CACHE": str(cache), "WANDB_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_RUN_GROUP", None)  # the group must come from ta_opd.wandb_group
    spec = [f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()]
    return subprocess.run([sys.executable, "-m", "recipe.ta_opd.main", *spec, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_histogram_kept_tokens_and_config(tiny_pair, tmp_path):
    from recipe.ta_opd import logged
    from recipe.ta_opd.main import ta_config
    from recipe.ta_opd.naming import run_name
    from tests.cli_inprocess import config

    cache, _ = tiny_pair
    out = tmp_path / "run"
    args = [f"trainer.default_local_dir={out}", "trainer.total_training_steps=3", "trainer.test_freq=2",
            "trainer.logger=[console,wandb]", "trainer.project_name=ta_opd_wandb_test", "ta_opd.cpu.eval_size=8",
            "data.train_batch_size=4", "ta_opd.topk=8", "ta_opd.budget=0.1", "ta_opd.token_export=true",
            f"ta_opd.wandb_group={GROUP}"]
    res = _run(tmp_path, cache, args)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = config([f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()] + args)
    ta = ta_config(cfg.ta_opd)
    name = run_name(cfg, ta)  # what the run is named when experiment_name is null

    wb = read_run(tmp_path)
    assert (wb.run.display_name, wb.run.project, wb.run.run_group) == (name, "ta_opd_wandb_test", GROUP)

    # the config: the Hydra config (rho, K, the group) and the resolved pair
    conf = wb.config
    assert conf["ta_opd"]["budget"] == 0.1 and conf["ta_opd"]["topk"] == 8 and conf["ta_opd"]["token_export"]
    assert conf["ta_opd"]["wandb_group"] == GROUP
    assert conf["pair"]["name"] == "the CPU toy"
    assert Path(conf["pair"]["student"]).name == "student" and Path(conf["pair"]["teacher"]).name == "teacher"

    # every training step: exactly the ta_opd/* names logged.py lists for the CPU backend, the score
    # histogram, the kept-token page at test_freq and the last step; the evaluations before, at 2 and at 3
    hist = wb.history
    expected = logged.step_metrics("cpu", ta)
    evals = logged.cpu_eval_names()
    check_run(wb, steps=[1, 2, 3], expected=expected, page_steps=[2, 3], occasional=evals)
    for step in (0, 2, 3):
        assert all(isinstance(hist[step][k], (int, float)) for k in evals), (step, set(evals) - set(hist[step]))

    # every ta_opd/* metric of metrics.csv, at every step, with the same value
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(float(r["step"])) >= 1]
    assert [int(float(r["step"])) for r in rows] == [1, 2, 3]
    names = [k for k in rows[0] if k.startswith("ta_opd/") and rows[0][k] not in ("", None)]
    assert len(names) >= 30, names  # the issue counts ~36
    assert set(names) <= set(expected) | set(evals)
    for r in rows:
        step = int(float(r["step"]))
        for k in names:
            assert k in hist[step], (step, k)
            assert math.isclose(hist[step][k], float(r[k]), rel_tol=1e-6, abs_tol=1e-9), (step, k)

        # the score histogram counts every valid position of the step
        h = hist[step]["ta_opd/score_hist"]
        assert sum(h["values"]) == int(float(r["ta_opd/valid_count"])) and len(h["bins"]) == len(h["values"]) + 1

        # the token export: one row per valid position, the kept ones as many as the selection kept
        import pandas as pd

        tok = pd.read_parquet(out / "tokens" / f"step_{step}.parquet")
        assert len(tok) == int(float(r["ta_opd/valid_count"]))
        assert int(tok["kept"].sum()) == int(float(r["ta_opd/kept_count"]))
        assert set(tok["step"]) == {step}

    # the kept-token page: every test_freq steps and at the end, in the run folder and as a W&B panel
    assert sorted(p.name for p in (out / "kept_tokens").iterdir()) == ["step_2.html", "step_3.html"]
    assert "ta_opd/kept_tokens" not in hist[1]
    for step in (2, 3):
        panel = hist[step]["ta_opd/kept_tokens"]
        assert panel["_type"] == "html-file"
        page = (out / "kept_tokens" / f"step_{step}.html").read_text(encoding="utf-8")
        assert (wb.folder / "files" / panel["path"]).read_text(encoding="utf-8") == page
        assert f"step {step}" in page and "ρ = 0.1" in page and 'class="tok kept"' in page
