"""The W&B group of a run (``ta_opd.wandb_group``, ``recipe/ta_opd/wandb_run.py``): checked, put where
``wandb.init`` (inside verl's ``Tracking``) reads it, and set once per sweep by launch/toy_sweep.py.
The group reaching the logged run is read back offline for both backends (``tests/test_wandb_offline.py``,
``tests/verl/test_fit_shipped.py``)."""

import importlib.util
from pathlib import Path

import pytest

from recipe.ta_opd.wandb_run import GROUP_ENV, apply_group, wandb_group
from ta_opd.errors import TAConfigError
from tests.cli_inprocess import config

ROOT = Path(__file__).resolve().parents[1]


def test_default_is_no_group_and_a_users_env_stays(monkeypatch):
    monkeypatch.setenv(GROUP_ENV, "mine")
    assert config([]).ta_opd.wandb_group is None
    assert apply_group(config([])) is None
    import os

    assert os.environ[GROUP_ENV] == "mine"


def test_the_key_wins_over_the_env(monkeypatch):
    import os

    monkeypatch.setenv(GROUP_ENV, "mine")
    assert apply_group(config(["ta_opd.wandb_group=sweep_a"])) == "sweep_a"
    assert os.environ[GROUP_ENV] == "sweep_a"


@pytest.mark.parametrize("value", ["''", "' '", "[a,b]", "true", "1.5"])
def test_bad_groups_are_refused_naming_the_value(value):
    with pytest.raises(TAConfigError, match=r"ta_opd.wandb_group=.* is not allowed; give a non-empty group name"):
        wandb_group(config([f"ta_opd.wandb_group={value}"]))


def test_entry_point_refuses_a_bad_group_with_exit_2(capsys, tmp_path, monkeypatch):
    from recipe.ta_opd.main import guarded

    monkeypatch.setenv("TA_OPD_CACHE", str(tmp_path))  # refused before any pair or folder is touched
    assert guarded(config(["ta_opd.backend=cpu", f"trainer.default_local_dir={tmp_path / 'run'}",
                           "ta_opd.wandb_group=''"])) == 2
    assert "[ta-opd] error: ta_opd.wandb_group='' is not allowed" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def _toy_sweep():
    spec = importlib.util.spec_from_file_location("toy_sweep", ROOT / "launch" / "toy_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_toy_sweep_runs_share_the_out_folders_group_and_are_named_after_their_folders(tmp_path):
    sweep = _toy_sweep()
    out = tmp_path / "lr1e-5"
    names = [sweep.run_name("full", 0.1, "pg_opd", 0), sweep.run_name("full", 0.1, "topk_forward_kl", 0)]
    cfgs = [config(sweep.wandb_overrides(out, n, [])) for n in names]
    assert [c.ta_opd.wandb_group for c in cfgs] == ["lr1e-5", "lr1e-5"]
    assert [c.trainer.experiment_name for c in cfgs] == [f"toy_{n}" for n in names]  # the loss tells them apart
    assert sweep.wandb_overrides(out, names[0], ["ta_opd.wandb_group=mine"]) == [f"trainer.experiment_name=toy_{names[0]}"]
