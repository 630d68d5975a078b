"""The recipe YAML composes against the installed verl; overrides reach TAConfig."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recipe.ta_opd.main import choose_backend, ta_config
from ta_opd.errors import TAConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "recipe" / "ta_opd" / "config")


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("ta_opd_trainer", overrides=list(overrides))


def test_composes_with_verl_defaults_and_overrides_reach_the_config():
    cfg = _compose("ta_opd.budget=0.05", "ta_opd.topk=8", "ta_opd.clip_high=0.3")
    ta = ta_config(cfg.ta_opd)
    assert (ta.budget, ta.topk, ta.clip_high) == (0.05, 8, 0.3)
    assert cfg.actor_rollout_ref.actor.clip_ratio_high == 0.3  # verl key follows ta_opd.clip_high
    assert "critic" in cfg and "algorithm" in cfg  # verl's ppo_trainer defaults are there


def test_unknown_keys_and_backends_are_rejected():
    with pytest.raises(TAConfigError, match=r"unknown key\(s\) ta_opd.budgett"):
        ta_config(_compose("+ta_opd.budgett=0.1").ta_opd)
    with pytest.raises(TAConfigError, match="ta_opd.backend='tpu' is not allowed"):
        choose_backend("tpu")
    assert choose_backend("cpu") == ("cpu", "requested with ta_opd.backend")
