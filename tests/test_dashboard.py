"""The dashboard as code (``python -m recipe.ta_opd.dashboard``): the W&B workspace built offline,
never saved; every panel names a metric some backend logs (``recipe/ta_opd/logged.py``, itself held
to the logged runs by the W&B read-back tests of both backends)."""

import re

import pytest

from recipe.ta_opd import dashboard as D
from recipe.ta_opd import logged as L

SECTIONS = ["Kept ratio and budget", "D, C, H quantiles", "Kept vs dropped D^L / D^I", "Held-out KL", "Accuracy",
            "Loss and clip", "Timing", "What was kept"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def test_every_panel_names_a_metric_some_backend_logs():
    known = L.every_metric()
    named = D.metrics_named()
    assert named and [m for m in named if m not in known] == []


def test_the_names_come_from_the_core():
    from ta_opd.config import TAConfig

    cpu, verl = set(L.step_metrics("cpu")), set(L.step_metrics("verl"))
    assert {"ta_opd/kept_ratio", "ta_opd/DL/kept_mean", "ta_opd/D/p95", "ta_opd/loss/pg_opd"} <= cpu
    assert "actor/ta_opd/loss/pg_opd" in verl and "ta_opd/loss/pg_opd" not in verl
    assert "ta_opd/C_bound/mean_width" not in L.selection_names(TAConfig(compatibility="lower_bound"))
    assert "ta_opd/loss/topk_forward_kl" in L.step_metrics("cpu", TAConfig(loss="topk_forward_kl"))
    assert "ta_opd/teacher/sampled_missing_fraction" in L.step_metrics("verl", teacher_backend="vllm")
    with pytest.raises(ValueError, match="backend 'gpu' is unknown; backends: cpu, verl"):
        L.step_metrics("gpu")


def test_workspace_builds_offline_with_the_sections_grouping_and_kept_token_panel():
    w = D.build("my-team", "ta_opd")
    assert [s.name for s in w.sections] == SECTIONS
    view = w._to_model().model_dump(by_alias=True, exclude_none=True)  # what save() would send
    assert (view["entity"], view["project"], view["displayName"]) == ("my-team", "ta_opd", "TA-OPD")
    spec = view["spec"]
    grouping = spec["section"]["runSets"][0]["grouping"]
    assert [(g["section"], g["name"]) for g in grouping] == [("config", "ta_opd.value.selector"),
                                                             ("config", "ta_opd.value.budget")]
    panels = {p["config"].get("chartTitle"): p for s in spec["section"]["panelBankConfig"]["sections"]
              for p in s["panels"]}
    assert panels["kept tokens"]["viewType"] == "Media Browser"
    assert panels["kept tokens"]["config"]["mediaKeys"] == [L.KEPT_TOKENS]
    assert panels["kept ratio"]["config"]["metrics"] == ["ta_opd/kept_ratio"]
    assert panels["selector score (histogram)"]["config"]["metrics"] == [L.SCORE_HIST]
    verl_acc = panels["validation accuracy (verl, per data source)"]["config"]
    assert verl_acc["useMetricRegex"] and verl_acc["metricRegex"] == L.VERL_VAL_ACCURACY
    assert re.fullmatch(L.VERL_VAL_ACCURACY, "val-core/ta_opd_toy/acc/mean@1")
    assert not re.fullmatch(L.VERL_VAL_ACCURACY, "val-aux/ta_opd_toy/acc/std@1")
    # every Line/Media panel of the spec reached the workspace, each with its metrics
    for s, spec_s in zip(spec["section"]["panelBankConfig"]["sections"], D.SECTIONS):
        assert len(s["panels"]) == len(spec_s.panels)


def test_command_prints_the_spec_without_saving(capsys):
    assert D.main(["--entity", "e", "--project", "p"]) == 0
    out = capsys.readouterr().out
    assert "TA-OPD workspace 'TA-OPD' for e/p: 8 sections, runs grouped by ta_opd.selector, ta_opd.budget" in out
    assert all(f"- {name} (" in out for name in SECTIONS) and "not saved (add --save" in out


def test_save_without_network_or_key_is_a_clear_error(monkeypatch, tmp_path, capsys):
    assert D.main(["--entity", "e", "--project", "p", "--save"]) == 2  # WANDB_MODE=offline (the fixture)
    assert "[ta-opd] error: --save needs W&B online, but WANDB_MODE=offline; unset it" in capsys.readouterr().err
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings: no key anywhere
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    assert D.main(["--entity", "e", "--project", "p", "--save"]) == 2
    assert "[ta-opd] error: --save needs a W&B API key: run `wandb login` or set WANDB_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [(["--entity", " ", "--project", "p"], "--entity=' ' is not allowed"),
                                       (["--entity", "e", "--project", ""], "--project='' is not allowed")])
def test_empty_names_are_refused(args, msg, capsys):
    assert D.main(args) == 2
    assert msg in capsys.readouterr().err
