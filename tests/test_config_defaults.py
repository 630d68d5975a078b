"""TAConfig's defaults live in two places, the dataclass and the recipe YAML: they must agree."""

from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ta_opd.config import TAConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "recipe" / "ta_opd" / "config")


@pytest.fixture(scope="module")
def yaml_ta_opd() -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("ta_opd_trainer")
    return OmegaConf.to_container(cfg.ta_opd, resolve=True)


@pytest.mark.parametrize("field", [f.name for f in fields(TAConfig)])
def test_yaml_default_equals_the_dataclass_default(yaml_ta_opd, field):
    f = next(f for f in fields(TAConfig) if f.name == field)
    assert f.default is not MISSING, f"TAConfig.{field} has no default; the recipe YAML gives {yaml_ta_opd.get(field)!r}"
    assert field in yaml_ta_opd, f"ta_opd.{field} is missing from ta_opd_trainer.yaml (dataclass default {f.default!r})"
    got = yaml_ta_opd[field]
    assert got == f.default and type(got) is type(f.default), (
        f"ta_opd.{field}: YAML {got!r} ({type(got).__name__}) != TAConfig default {f.default!r} "
        f"({type(f.default).__name__})")


def test_the_composed_yaml_builds_the_default_config(yaml_ta_opd):
    ta = TAConfig.from_mapping({f.name: yaml_ta_opd[f.name] for f in fields(TAConfig)})
    assert ta == TAConfig()
