"""launch/toy_sweep.py: its table from run summaries and metrics.csv (no training here)."""

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("toy_sweep", ROOT / "launch" / "toy_sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def _metrics(path: Path, rows: list[dict]) -> Path:
    keys = ["step", "val/student_accuracy", "ta_opd/kept/neg_adv_fraction"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def test_curve_reads_first_evaluation_after_step_0_and_mean_negative_share(tmp_path):
    m = _metrics(tmp_path / "metrics.csv", [
        {"step": 0, "val/student_accuracy": 0.5, "ta_opd/kept/neg_adv_fraction": ""},
        {"step": 1, "val/student_accuracy": "", "ta_opd/kept/neg_adv_fraction": 0.2},
        {"step": 2, "val/student_accuracy": 0.75, "ta_opd/kept/neg_adv_fraction": 0.4},
        {"step": 4, "val/student_accuracy": 0.9, "ta_opd/kept/neg_adv_fraction": 0.6}])
    c = sweep._curve(m)
    assert c["early_step"] == 2 and c["early_accuracy"] == 0.75
    assert abs(c["kept_neg_adv"] - 0.4) < 1e-12
    assert sweep._curve(tmp_path / "missing.csv") == {"early_step": None, "early_accuracy": None, "kept_neg_adv": None}


def test_tabulate_groups_by_selector_budget_and_loss():
    base = dict(student_accuracy_before=0.7, heldout_kl_after=0.5, kept_ratio=0.05, wall_seconds=40.0,
                early_step=20, kept_neg_adv=0.5)
    results = [{**base, "selector": "teachability", "budget": 0.05, "loss": "pg_opd", "student_accuracy_after": a,
                "early_accuracy": a} for a in (0.9, 1.0)]
    results.append({**base, "selector": "teachability", "budget": 0.05, "loss": "topk_forward_kl",
                    "student_accuracy_after": 0.5, "early_accuracy": None, "kept_neg_adv": None})
    rows = {(r["selector"], r["loss"]): r for r in sweep.tabulate(results)}
    assert len(rows) == 2
    pg = rows[("teachability", "pg_opd")]
    assert pg["seeds"] == 2 and pg["accuracy_after"] == "95.0 ± 7.1" and pg["kept_neg_adv"] == "50 ± 0"
    topk = rows[("teachability", "topk_forward_kl")]
    assert topk["accuracy_after"] == "50.0 ± 0.0" and topk["accuracy_early"] == "–" and topk["kept_neg_adv"] == "–"


def test_an_output_folder_is_claimed_by_its_settings(tmp_path):
    sweep._claim(tmp_path, ["actor_rollout_ref.actor.optim.lr=1e-5"])
    sweep._claim(tmp_path, ["actor_rollout_ref.actor.optim.lr=1e-5"])  # same settings: fine, runs are reused
    try:
        sweep._claim(tmp_path, [])
    except SystemExit as e:
        assert "holds runs made with" in str(e) and "use another --out" in str(e)
    else:
        raise AssertionError("a sweep with other overrides reused the folder")


def test_the_first_run_goes_alone_only_when_asked(tmp_path, monkeypatch):
    """The toy sweep's first run goes alone (it may build the toy pair); launch/real_lm.py builds its
    pair before the sweep and asks for all runs in parallel (``first_alone=False``)."""
    import threading
    import time

    grid = [("full", 0.10, "pg_opd"), ("random", 0.10, "pg_opd")]

    def run(first_alone: bool) -> list[str]:
        events, lock = [], threading.Lock()

        def fake_train(out, selector, budget, loss, seed, overrides):
            with lock:
                events.append(f"start {selector}")
            time.sleep(0.3)
            with lock:
                events.append(f"end {selector}")
            return {"selector": selector, "budget": budget, "loss": loss, "student_accuracy_before": 0.0,
                    "student_accuracy_after": 0.0, "heldout_kl_after": 1.0, "kept_ratio": 0.1, "wall_seconds": 1.0,
                    "teacher_accuracy": 1.0, "eval_problems": 1, "trained_now": True, "early_step": None,
                    "early_accuracy": None, "kept_neg_adv": None}

        monkeypatch.setattr(sweep, "_train", fake_train)
        monkeypatch.setattr(sweep, "_claim", lambda *a, **k: None)
        out = tmp_path / f"alone{first_alone}"
        out.mkdir()
        sweep.main(["--seeds", "0", "--jobs", "2", "--out", str(out)], grid=grid, first_alone=first_alone)
        return events

    assert run(True)[:2] == ["start full", "end full"]
    assert sorted(run(False)[:2]) == ["start full", "start random"]
