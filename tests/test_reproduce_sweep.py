"""The paper sweep launcher (launch/sweep_paper.py): every Table 3 / 4 run, names the aggregation parses,
and overrides that compose with the experiment configs into the named run folder."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.ta_opd.reproduce import results as R

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sweep_paper", ROOT / "launch/sweep_paper.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["sweep_paper"] = sweep  # dataclasses look their module up while the file executes
spec.loader.exec_module(sweep)


def test_grid_covers_tables_3_and_4_once():
    runs = sweep.grid()
    assert len(runs) == len(set(runs)) == 4 * 6 + 2 * 4 * 3  # Table 4's 10 % runs are Table 3's
    t3 = sweep.grid((3,))
    assert {(r.setting, r.method) for r in t3} == {(s, m) for s in R.SETTINGS for m in sweep.TABLE3_METHODS}
    assert all(r.budget == 0.10 for r in t3 if r.method != "full")
    t4 = sweep.grid((4,))
    assert {(r.setting, r.method, r.budget) for r in t4} == {
        (s, m, b) for s in R.TABLE4_SETTINGS for m in R.TABLE4_METHODS for b in R.TABLE4_BUDGETS}
    for r in runs:  # the aggregation reads the cell back from the run name
        rid = R.parse_run_name(r.name)
        assert (rid.setting, rid.method, rid.budget, rid.seed) == (r.setting, r.method, r.budget, 0)


def test_seed_is_in_every_run_name():
    """seed 1 must not resume seed 0's folder: every run name, and so every folder, differs by seed."""
    s0, s1 = sweep.grid(seed=0), sweep.grid(seed=1)
    assert not {r.name for r in s0} & {r.name for r in s1}
    assert all(R.parse_run_name(r.name).seed == 1 and "ta_opd.seed=1" in r.overrides() for r in s1)


def test_commands_and_slurm_array(tmp_path, capsys):
    assert sweep.main(["--emit", "commands", "--tables", "4", "--settings", "qwen3_14b_to_qwen3_4b"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 16
    assert lines[0] == ("EXPERIMENT=qwen3_14b_to_qwen3_4b bash launch/single_node.sh ta_opd.selector=entropy "
                        "ta_opd.budget=0.05 ta_opd.seed=0 trainer.experiment_name=qwen3_14b_to_qwen3_4b__entropy__rho0.05__seed0")
    assert sweep.main(["--emit", "slurm", "--out", str(tmp_path)]) == 0
    tsv = (tmp_path / "runs.tsv").read_text().splitlines()
    assert len(tsv) == 48 and tsv[0].split("\t")[:3] == ["0", "qwen3_4b_to_qwen3_1p7b", "qwen3_4b_to_qwen3_1p7b__full__seed0"]
    script = (tmp_path / "array.sbatch").read_text()
    assert "#SBATCH --array=0-47%4" in script and "#SBATCH --nodes=8" in script
    subprocess.run(["bash", "-n", str(tmp_path / "array.sbatch")], check=True)
    with pytest.raises(SystemExit, match="setting 'qwen3_4b' is unknown"):
        sweep.grid((3,), ["qwen3_4b"])


def test_run_overrides_compose_into_the_named_folder(monkeypatch):
    from hydra import compose, initialize_config_dir

    for var in ("TRAIN_FILES", "VAL_FILES", "CKPT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)
    run = next(r for r in sweep.grid() if r.method == "teachability_entropy" and r.budget == 0.3)
    with initialize_config_dir(config_dir=str(ROOT / "recipe/ta_opd/config"), version_base=None):
        cfg = compose("ta_opd_trainer", overrides=[f"+experiment={run.setting}", *run.overrides()])
    assert cfg.trainer.experiment_name == run.name
    assert cfg.trainer.default_local_dir == f"runs/ta_opd/{run.name}"
    assert (cfg.ta_opd.selector, cfg.ta_opd.budget) == ("teachability_entropy", 0.3)
    # the paper settings read the data command's output by default
    assert (cfg.data.train_files, cfg.data.val_files) == ("data/dapo/train.parquet", "data/dapo/val.parquet")


def test_gpu_hour_estimate_formula(capsys):
    e = dict(sweep.EST, gpus=10, trainer_gpus=1, teacher_gpus=1, steps=360, prompts=1, samples=1, prompt_len=0,
             mean_resp=1000, max_resp=100, decode_tok_s=10.0, peak=1e12, mfu=1.0)
    est = sweep.estimate_gpu_hours("qwen3_4b_to_qwen3_1p7b", n_train_runs=2, n_eval_ckpts=0, e=e)
    # rollout 100 / 10 = 10 s; teacher 2 * 4e9 * 1000 / 1e12 = 8 s; student 10 * 1.7e9 * 1000 / 1e12 = 17 s
    assert est["step_s"] == pytest.approx(35.0)
    assert est["train_gpu_h_per_run"] == pytest.approx(10 * 360 * 35 / 3600) and est["total_gpu_h"] == pytest.approx(70.0)
    assert sweep.main(["--emit", "estimate"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "| qwen3_14b_to_qwen3_4b | 18 |" in out
